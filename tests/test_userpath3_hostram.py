"""Host RAM (round 3, item 8): a 7-8B plan on a small card keeps the 16-bit embedding and head
(and offloaded activations) in pinned CPU memory; the pre-run check compares that with the RAM
the machine has, before anything loads: refused when it cannot fit, a warning when it is tight."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import RunConfig
from core.errors import UserError


@pytest.fixture(scope="module")
def llama8b_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A local folder with Llama-3.1-8B's config.json (no weights: the check reads the shape only) and a
    small tokenizer, as a model folder on disk."""
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("llama8b")
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                tie_word_embeddings=False, head_dim=128).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def a_gpu_here(monkeypatch):
    """This machine has no GPU; the check of a card profile asks NVML whether one is there (a run
    planned for a card cannot train on a GPU-less machine). Say one is: the RAM check is what is tested."""
    import core.gpu

    monkeypatch.setattr(core.gpu, "detect_gpus", lambda: ["a card"])
    monkeypatch.setenv("SNUGTUNE_KERNELS", "off")  # planned as the 7-8B runs were measured (test_bigsavers)


def _cfg(model_dir: Path, data: Path, runs: Path) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data), "max_seq_len": 16384},
        "lora": {"r": 32, "alpha": 64},
        "train": {"micro_batch": 1, "grad_accum": 1, "max_steps": 2},
        "gpu": {"profile": "rtx-4060-ti-16gb", "vram_budget_gib": 8.0},
        "output": {"runs_dir": str(runs)},
    })


def _pinned(cfg: RunConfig, model_dir: Path) -> float:
    from core.catalog import spec_from_config
    from core.estimate import estimate
    from core.gpu import resolve_gpu

    spec = spec_from_config(json.loads((model_dir / "config.json").read_text()), id=str(model_dir))
    return estimate(spec, cfg, resolve_gpu("rtx-4060-ti-16gb", 8.0)).knobs["host_pinned_gib"]


def test_pinned_host_memory_that_cannot_fit_is_refused_before_loading(llama8b_dir, tiny_instruction_jsonl,
                                                                      tmp_path, monkeypatch, a_gpu_here):
    from core import preflight

    cfg = _cfg(llama8b_dir, tiny_instruction_jsonl, tmp_path / "runs")
    pinned = _pinned(cfg, llama8b_dir)
    # the embedding and the head, 2 x 0.98 GiB, at least (the plan at 16,384 tokens on 8 GiB)
    assert pinned > 1.9
    # a machine with less RAM available than that: said before any weight loads, with the numbers
    monkeypatch.setattr(preflight, "available_ram_gib", lambda: pinned / 2)
    with pytest.raises(UserError) as err:
        preflight.check(cfg)
    msg = str(err.value)
    assert "pinned CPU memory" in msg and f"{pinned:.2f} GiB" in msg and "available" in msg
    assert "max_seq_len" in (err.value.hint or "")
    assert not (tmp_path / "runs").exists()  # nothing made


def test_tight_host_memory_is_a_warning_and_plenty_is_silent(llama8b_dir, tiny_instruction_jsonl, tmp_path,
                                                            monkeypatch, a_gpu_here):
    from core import preflight

    cfg = _cfg(llama8b_dir, tiny_instruction_jsonl, tmp_path / "runs")
    need = _pinned(cfg, llama8b_dir) + preflight.HOST_BASE_GIB
    monkeypatch.setattr(preflight, "available_ram_gib", lambda: need * 1.1)
    info = preflight.check(cfg)
    assert len(info["warnings"]) == 1 and "tight" in info["warnings"][0]
    monkeypatch.setattr(preflight, "available_ram_gib", lambda: need * 4)
    assert preflight.check(cfg)["warnings"] == []


def test_a_small_model_pins_nothing_and_is_not_checked(tiny_run_config, monkeypatch):
    from core import preflight

    cfg = tiny_run_config()
    monkeypatch.setattr(preflight, "available_ram_gib", lambda: 0.01)  # would refuse anything pinned
    assert preflight.check(cfg)["warnings"] == []


def test_available_ram_reads_this_machine():
    from core.preflight import available_ram_gib

    got = available_ram_gib()
    assert got is not None and got > 0
