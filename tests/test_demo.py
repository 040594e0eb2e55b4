"""The offline demo: built-in names, the shipped dataset and tokenizer, the locally built model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import demo
from core.config import DataConfig
from core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_builtin_names():
    assert demo.is_builtin("builtin:tiny-llama") and not demo.is_builtin("Qwen/Qwen2.5-0.5B")
    assert not demo.is_builtin(None)
    with pytest.raises(UserError, match=r"unknown built-in name 'builtin:nope'; known: builtin:tiny-llama, builtin:python-docs-qa"):
        demo.resolve_builtin("builtin:nope")


def test_demo_dataset_loads_as_instruction_data():
    from core.data import check_records, detect_format, load_records

    path = demo.resolve_builtin("builtin:python-docs-qa")
    assert Path(path) == demo.DATA_FILE and demo.DATA_FILE.is_file()
    records = load_records(DataConfig(path="builtin:python-docs-qa"))
    assert 300 <= len(records) <= 1000
    fmt = detect_format(records, DataConfig(path="builtin:python-docs-qa"))
    assert fmt.kind == "instruction" and set(fmt.columns) == {"instruction", "input", "output"}
    check_records(records, fmt)
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)


def test_demo_tokenizer_covers_the_data():
    tok = demo.demo_tokenizer()
    assert len(tok) == demo.VOCAB_SIZE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.chat_template and "<|assistant|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    text = demo.DATA_FILE.read_text(encoding="utf-8")
    ids = tok(text[:5000])["input_ids"]
    assert tok.decode(ids) == text[:5000]  # byte-level: lossless, no unknown tokens
    assert len(ids) < 5000 / 2.5  # and it compresses the demo text (merges were learned on it)


def test_asset_generator_runs(tmp_path):
    data, tok_path = demo.regenerate_data(tmp_path)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 300 and all(set(r) == {"instruction", "input", "output"} for r in rows)
    assert all(r["output"] and r["instruction"] for r in rows)
    assert json.loads(tok_path.read_text(encoding="utf-8"))["model"]["type"] == "BPE"


def test_tiny_model_is_built_once_offline(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SNUGTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = Path(demo.resolve_builtin("builtin:tiny-llama"))
    assert path.parent == tmp_path / "cache" / "demo"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert Path(demo.resolve_builtin("builtin:tiny-llama")) == path  # reused, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left behind
    model = AutoModelForCausalLM.from_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n < 6_000_000, n
    assert model.config.model_type == "llama" and model.config.vocab_size == demo.VOCAB_SIZE
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "</s>" and tok.chat_template == demo.CHAT_TEMPLATE


def test_tiny_llama_config_overrides():
    cfg = demo.tiny_llama_config(hidden_size=64, num_hidden_layers=1, vocab_size=300)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 1, 300)
    assert demo.tiny_llama_config().num_hidden_layers == 4


@pytest.mark.slow
def test_demo_model_learns_in_4bit_on_cpu():
    """The demo's promise, in small: the 4-bit demo model with LoRA lowers its loss on the demo
    data within a few CPU steps (the full `snugtune train demo` lives in the engine's tests)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from core.data import build_datasets, collate, load_tokenizer

    # The session's cache (conftest): the model is built there once for the whole suite; its
    # building is test_tiny_model_is_built_once_offline's subject (a fresh cache cost 5-15 s here).
    path = demo.resolve_builtin("builtin:tiny-llama")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32, device_map="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    tok = load_tokenizer("builtin:tiny-llama")
    rows, _, _ = build_datasets(DataConfig(path="builtin:python-docs-qa", max_seq_len=256, eval_fraction=0), tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    torch.manual_seed(0)
    losses = []
    for step in range(12):
        batch = collate(rows[(step * 4) % len(rows):][:4], tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


def test_regenerate_command_help():
    proc = subprocess.run([sys.executable, "-m", "core.demo", "--help"], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=600)
    assert proc.returncode == 0 and "--regenerate-data" in proc.stdout
