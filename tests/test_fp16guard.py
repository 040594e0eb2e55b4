"""The fp16 guard: which models get it, what it keeps finite, and what a diverged run says.

The numerics run on the CPU in fp16 (torch has CPU fp16 kernels). The model is a tiny random
Gemma 3 whose post-norm weights are raised so that its residual stream grows the way real
Gemma 3 270M's does (bench/results/fp16_overflow_gemma3_270m.json: 104,000 at block 14 while
every operation inside a block stays far below fp16's 65,504): here 39k, 64k, 88k, 103k.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from core import fp16guard
from core.catalog import catalog_lookup

FP16_MAX = 65504.0


def test_the_decision_is_by_family_and_can_be_forced():
    assert fp16guard.needs_fp16_guard("gemma3_text")[0]
    assert fp16guard.needs_fp16_guard(catalog_lookup("google/gemma-2-2b"))[0]
    on, why = fp16guard.needs_fp16_guard(catalog_lookup("google/gemma-3-1b-pt"))
    assert on and "104,000" in why
    off, why = fp16guard.needs_fp16_guard(catalog_lookup("Qwen/Qwen2.5-0.5B"))
    assert not off and "qwen2" in why
    assert fp16guard.needs_fp16_guard("llama", "on") == (True, "forced on (model.fp16_guard = 'on')")
    forced_off, why = fp16guard.needs_fp16_guard("gemma2", "off")
    assert not forced_off and "expect NaN" in why


def test_the_decision_does_not_import_torch():
    code = ("import sys, core.fp16guard as g; g.needs_fp16_guard('gemma3_text'); g.extra_bytes(18, 1024, 640); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_extra_memory_is_two_bytes_a_kept_stream_element_plus_four_live_fp32_copies():
    e = fp16guard.extra_bytes(layers=18, tokens=1024, hidden=640)
    assert e["kept_inputs"] == 18 * 1024 * 640 * 2 and e["transient"] == 4 * 1024 * 640 * 4 and e["host"] == 0
    off = fp16guard.extra_bytes(layers=18, tokens=1024, hidden=640, offloaded=True)
    assert off["kept_inputs"] == 0 and off["host"] == 18 * 1024 * 640 * 2


def test_loss_scaler_skips_are_not_divergence_but_nan_losses_are():
    h = fp16guard.StepHealth(fp16=True, diverged_after=3, skipped_limit=5)
    assert [h.update(2.0, float("inf")) for _ in range(4)] == [None] * 4  # the scale is still falling
    assert h.update(2.0, 1.0) is None  # a normal step resets the count
    msgs = [h.update(2.0, float("nan")) for _ in range(5)]
    assert msgs[:4] == [None] * 4 and "overflowed in 5 steps in a row" in msgs[4]
    h = fp16guard.StepHealth(fp16=True)
    assert [h.update(float("nan"), None) for _ in range(3)][-1] == "the loss is not a number for 3 steps in a row"
    bf16 = fp16guard.StepHealth(fp16=False)
    assert [bf16.update(1.0, float("inf")) for _ in range(3)][-1] == "the gradient norm is not a number for 3 steps in a row"


def test_the_hint_says_what_to_change():
    assert "model.fp16_guard = 'on'" in fp16guard.divergence_hint("fp16", guarded=False)
    assert "compute_dtype = 'fp32'" in fp16guard.divergence_hint("fp16", guarded=True)
    assert "learning_rate" in fp16guard.divergence_hint("bf16", guarded=False)


# ---- numerics ---------------------------------------------------------------------------------------


def gemma3_overflowing(vocab: int = 256, seed: int = 0):
    """A tiny random Gemma 3 whose residual stream exceeds fp16's range (post-norm weights raised)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                           sliding_window=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           layer_types=["sliding_attention"] * 3 + ["full_attention"])
    torch.manual_seed(seed)
    m = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for lyr in m.model.layers:
            lyr.post_attention_layernorm.weight.fill_(10000.0)
            lyr.post_feedforward_layernorm.weight.fill_(10000.0)
    return m.eval()


@pytest.fixture(scope="module")
def overflowing():
    import torch

    m = gemma3_overflowing()
    ids = torch.randint(4, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    peaks = []
    hooks = [lyr.register_forward_hook(lambda mod, i, o: peaks.append(float(o[0].abs().max() if isinstance(o, tuple)
                                                                                else o.abs().max())))
             for lyr in m.model.layers]
    with torch.no_grad():
        ref = m(ids).logits
    for h in hooks:
        h.remove()
    return m, ids, ref, peaks


def test_plain_fp16_overflows_where_the_residual_stream_does(overflowing):
    import torch

    m, ids, ref, peaks = overflowing
    assert max(peaks) > FP16_MAX and peaks[0] < FP16_MAX  # grows past the range, like real Gemma 3
    half = copy.deepcopy(m).half()
    with torch.no_grad():
        assert not torch.isfinite(half(ids).logits).all()


def test_guarded_fp16_matches_fp32_and_uninstalls(overflowing):
    import torch

    from core import savers

    m, ids, ref, _ = overflowing
    half = copy.deepcopy(m).half()
    applied = fp16guard.install(half, torch.float16)
    assert "4 blocks" in applied["fp16_guard"] and fp16guard.installed(half)
    with torch.no_grad():
        got = half(ids).logits.float()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    savers.uninstall_savers(half)  # the savers' undo removes the guard's patches too
    assert not fp16guard.installed(half)
    with torch.no_grad():
        assert not torch.isfinite(half(ids).logits).all()


def test_the_guard_leaves_attention_and_mlp_in_fp16(overflowing):
    import torch

    m, ids, _, _ = overflowing
    half = copy.deepcopy(m).half()
    fp16guard.install(half, torch.float16)
    seen = {}
    lyr = half.model.layers[2]
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (i[0].dtype, (o[0] if isinstance(o, tuple) else o).dtype)))
             for n, mod in (("q", lyr.self_attn.q_proj), ("down", lyr.mlp.down_proj), ("block", lyr))]
    with torch.no_grad():
        half(ids)
    for h in hooks:
        h.remove()
    assert seen["q"] == (torch.float16, torch.float16) and seen["down"] == (torch.float16, torch.float16)
    assert seen["block"][1] == torch.float32  # the stream between blocks


# ---- through the engine -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("gemma3-overflow") / "model"
    m = gemma3_overflowing(vocab=len(tiny_tokenizer))
    m.config.pad_token_id = tiny_tokenizer.pad_token_id
    m.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("guard", ["auto", "off"])
def test_fp16_training_is_finite_with_the_guard_and_says_what_to_change_without(guard, gemma_dir, tiny_instruction_jsonl,
                                                                               tmp_path):
    from conftest import make_tiny_config
    from core import runs
    from core.events import read_events
    from core.train import Engine

    cfg = make_tiny_config(gemma_dir, tiny_instruction_jsonl, tmp_path / "runs", "model.compute_dtype='fp16'",
                           "model.load_in_4bit=false", f"model.fp16_guard='{guard}'", "train.max_steps=3",
                           "train.learning_rate=1e-4", "data.eval_fraction=0.0")
    run_dir = runs.create_run_dir(cfg)
    rc = Engine(run_dir, install_signal_handlers=False).run()
    events = read_events(run_dir)
    started = next(e for e in events if e["event"] == "run_started")
    losses = [e["loss"] for e in events if e["event"] == "step_logged"]
    if guard == "auto":
        assert rc == 0, events[-1]
        assert started["model"]["fp16_guard"] and "residual stream fp32" in started["savers"]["fp16_guard"]
        assert len(losses) == 3 and all(isinstance(x, float) and x == x and abs(x) < 1e4 for x in losses)
    else:
        assert rc == 2 and not started["model"]["fp16_guard"]
        err = events[-1]["error"]
        assert events[-1]["event"] == "run_failed" and "diverged at step 3" in err
        assert "model.fp16_guard = 'on'" in err  # what to change, not only that it failed


# ---- CPU: unquantized or 4-bit -------------------------------------------------------------------------


def test_cpu_auto_picks_unquantized_for_real_models_where_ram_allows(tmp_path, monkeypatch):
    from core import model as cm
    from core.config import RunConfig

    def cfg(v):
        return RunConfig.from_dict({"model": {"name_or_path": "x", "load_in_4bit": v}, "data": {"path": "x"}})

    cpu, gpu = {"type": "cpu"}, {"type": "cuda"}
    assert cm.use_4bit(cfg(False), gpu)[0] is False and cm.use_4bit(cfg(True), cpu)[0] is True
    assert cm.use_4bit(cfg("auto"), gpu) == (True, "auto: 4-bit NF4 on the GPU (QLoRA)")
    monkeypatch.setattr(cm, "_available_ram_bytes", lambda: 16 * 2**30)
    monkeypatch.setattr(cm, "_param_count", lambda source: 268_000_000)  # Gemma 3 270M: 1 GiB in fp32
    q, why = cm.use_4bit(cfg("auto"), cpu, "somewhere")
    assert q is False and "unquantized" in why
    monkeypatch.setattr(cm, "_param_count", lambda source: 8_000_000_000)  # 32 GiB in fp32: no room
    q, why = cm.use_4bit(cfg("auto"), cpu, "somewhere")
    assert q is True and "would take 29.8 GiB" in why
    monkeypatch.setattr(cm, "_param_count", lambda source: 3_500_000)  # the demo: the fused 4-bit path is faster
    assert cm.use_4bit(cfg("auto"), cpu, "somewhere")[0] is True


def test_the_estimator_counts_the_guard_on_fp16_cards_only():
    from core.config import RunConfig
    from core.estimate import estimate
    from core.gpu import resolve_gpu

    spec = catalog_lookup("google/gemma-3-1b-pt")
    cfg = RunConfig.from_dict({"model": {"name_or_path": spec.id}, "data": {"path": "x", "max_seq_len": 2048}})
    off = cfg.with_overrides(["model.fp16_guard='off'"])
    t4, l4 = resolve_gpu("t4"), resolve_gpu("l4")  # Turing: fp16 only; Ada: bf16
    guarded, plain16 = estimate(spec, cfg, t4), estimate(spec, off, t4)
    extra = fp16guard.extra_bytes(spec.num_layers, 2048, spec.hidden_size)["kept_inputs"] / 2**30
    assert guarded.total_gib - plain16.total_gib >= 0.9 * extra
    assert any("fp16 guard on" in n for n in guarded.notes)
    assert estimate(spec, cfg, l4).total_gib == estimate(spec, off, l4).total_gib  # bf16: no guard


def test_the_fp16_loss_scaler_starts_lower_and_keeps_its_other_settings():
    """2^16 skipped Gemma 3's first two fp16 steps (H200 run 2): the engine's scaler starts at 2^12."""
    import types

    import torch

    old = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=77)
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(scaler=old))
    assert fp16guard.set_initial_loss_scale(trainer) == fp16guard.FP16_INIT_SCALE == 4096.0
    new = trainer.accelerator.scaler
    assert new is not old and new.is_enabled()
    assert new.get_scale() == 4096.0 and new.get_growth_interval() == 77
    assert new.get_growth_factor() == old.get_growth_factor() and new.get_backoff_factor() == old.get_backoff_factor()
    # bf16 / CPU runs have no scaler (accelerate leaves it None): nothing is set
    none = types.SimpleNamespace(accelerator=types.SimpleNamespace(scaler=None))
    assert fp16guard.set_initial_loss_scale(none) is None and none.accelerator.scaler is None
