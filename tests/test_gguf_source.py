"""A local GGUF file as a model source: read, listed, converted, and used by every command.

CI downloads nothing: the GGUF is written here from the demo model with the `gguf` package
(core.gguf_source.write_llama_gguf, llama.cpp's layout), then read back by transformers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core import gguf_source
from core.catalog import resolve_model, scan_gguf, spec_from_dir
from core.errors import UserError

SNUGTUNE = Path(sys.executable).parent / "snugtune"
CMD = [str(SNUGTUNE)] if SNUGTUNE.exists() else [sys.executable, "-m", "tui.cli"]
LONG = 600  # a ceiling for one command on a busy 2-core machine, not a timing assertion


def snugtune(*args, timeout=LONG, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def demo_dir():
    from core.demo import ensure_tiny_llama

    return ensure_tiny_llama()


@pytest.fixture(scope="module")
def demo_gguf(demo_dir, tmp_path_factory) -> Path:
    return gguf_source.write_llama_gguf(demo_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf")


def header_only_gguf(path: Path, name: str, arch: str = "llama", hidden: int = 64) -> Path:
    """A small GGUF with a model's metadata and one tensor (enough for listing, not for training)."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_block_count(2)
    w.add_feed_forward_length(4 * hidden)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_tensor("token_embd.weight", np.zeros((100, hidden), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- reading -----------------------------------------------------------------------------------------


def test_the_header_gives_the_same_shape_as_the_model_directory(demo_gguf, demo_dir):
    g, d = resolve_model(str(demo_gguf)), spec_from_dir(demo_dir)
    assert g.source == "gguf" and g.id == str(demo_gguf.resolve())
    for f in ("model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(g, f) == getattr(d, f), f
    assert g.params_total == d.params_total and "GGUF" in g.note


def test_files_that_are_not_gguf_models_are_one_clear_error(demo_gguf, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a GGUF model"):
        resolve_model(str(text))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(demo_gguf.read_bytes()[:1000])  # an interrupted download
    with pytest.raises(UserError, match="not a readable GGUF file"):
        resolve_model(str(cut))
    with pytest.raises(UserError, match="no such file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    from core.model import resolve_model_source

    with pytest.raises(UserError, match="no such GGUF file"):
        resolve_model_source(str(tmp_path / "missing.gguf"))


def test_folders_ollama_and_lm_studio_are_listed(tmp_path, monkeypatch):
    home = tmp_path / "home"
    lms = home / ".lmstudio" / "models" / "someone" / "Some-Model-GGUF"
    lms.mkdir(parents=True)
    header_only_gguf(lms / "some-model-Q4_K_M.gguf", "Some Model")
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    header_only_gguf(mine / "sub" / "a.gguf", "Model A", hidden=128)
    header_only_gguf(mine / "big-00001-of-00002.gguf", "Big")
    header_only_gguf(mine / "big-00002-of-00002.gguf", "Big")  # a later shard is no model of its own
    (mine / "readme.gguf").write_text("not really")  # wrong magic: skipped
    ollama = tmp_path / "ollama"
    man = ollama / "manifests" / "registry.ollama.ai" / "library" / "gemma3"
    man.mkdir(parents=True)
    (ollama / "blobs").mkdir()
    header_only_gguf(ollama / "blobs" / "sha256-abc123", "Gemma 3 270m", arch="gemma3")
    layers = [{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:fff"},
              {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:abc123"}]
    (man / "270m").write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    (man / "gone").write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                      "digest": "sha256:deleted"}]}))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))

    found = gguf_source.find_gguf_models([mine])
    assert [(f.where, f.label) for f in found] == [
        ("folder", "big-00001-of-00002.gguf"), ("folder", "a.gguf"),
        ("ollama", "gemma3:270m"), ("lmstudio", "some-model-Q4_K_M.gguf")]
    specs = {s.note.split(" (")[0]: s for s in scan_gguf([mine])}
    assert specs["Ollama gemma3:270m; Gemma 3 270m"].model_type == "gemma3_text"
    assert specs["Ollama gemma3:270m; Gemma 3 270m"].id == str((ollama / "blobs" / "sha256-abc123").resolve())
    assert specs["a.gguf; Model A"].hidden_size == 128
    # an Ollama blob has no extension: it is still a model source by its content
    assert resolve_model(str(ollama / "blobs" / "sha256-abc123")).source == "gguf"

    out = snugtune("models", "--source", "gguf", "--gguf", str(mine), "--json",
                   env={**os.environ, "HOME": str(home), "OLLAMA_MODELS": str(ollama)})
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)["models"]
    assert {m["source"] for m in listed} == {"gguf"} and len(listed) == 4


# ---- conversion --------------------------------------------------------------------------------------


def test_conversion_keeps_weights_tokenizer_and_template_and_happens_once(demo_gguf, demo_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = gguf_source.ensure_converted(demo_gguf)
    stamp = (out / "config.json").stat().st_mtime_ns
    assert gguf_source.ensure_converted(demo_gguf) == out and (out / "config.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "snugtune-gguf.json").read_text())["architecture"] == "llama"
    a, b = AutoModelForCausalLM.from_pretrained(demo_dir), AutoModelForCausalLM.from_pretrained(out)
    ta, tb = AutoTokenizer.from_pretrained(demo_dir), AutoTokenizer.from_pretrained(out)
    text = "What does zip do? It pairs up items from several iterables."
    assert ta(text).input_ids == tb(text).input_ids
    assert tb.chat_template == ta.chat_template and tb.eos_token == ta.eos_token and tb.pad_token is not None
    ids = ta(text, return_tensors="pt").input_ids
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    # the file is fp32, the cached copy bf16: equal to bf16's rounding
    assert (la - lb).abs().max() < 0.05 * la.abs().max()
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean() > 0.9


def test_a_conversion_parses_the_file_once(demo_gguf, tmp_path, monkeypatch):
    """transformers parses the whole header at each of its three loads (19 s each on Gemma 3 270M)."""
    import shutil

    import gguf

    made = []

    class Counting(gguf.GGUFReader):
        def __init__(self, *a, **k):
            made.append(a[0] if a else k.get("path"))
            super().__init__(*a, **k)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    copy = shutil.copy(demo_gguf, tmp_path / "again.gguf")  # another path: not converted yet
    out = gguf_source.ensure_converted(copy)
    assert (out / "config.json").is_file() and len(made) == 1
    assert gguf.GGUFReader is Counting  # put back afterwards


def test_a_tokenizer_alone_is_read_from_the_file_without_converting_it(demo_gguf, demo_dir, tmp_path):
    from transformers import AutoTokenizer

    from core.data import load_tokenizer

    copy = tmp_path / "fresh.gguf"
    shutil.copyfile(demo_gguf, copy)
    tok = load_tokenizer(str(copy))  # what `snugtune data inspect --model X.gguf` does
    assert not gguf_source.converted_dir(copy).exists()
    text = "What does sorted do?"
    assert tok(text).input_ids == AutoTokenizer.from_pretrained(demo_dir)(text).input_ids
    assert tok.chat_template and tok.pad_token is not None


# ---- every command -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_estimate_inspect_train_chat_and_export_take_a_gguf_path(demo_gguf, runs_dir, tmp_path):
    est = snugtune("estimate", "--model", str(demo_gguf), "--gpu", "gtx-1650", "--json")
    assert est.returncode == 0, est.stderr
    e = json.loads(est.stdout)
    assert e["model"]["source"] == "gguf" and e["model"]["hidden_size"] == 256 and e["total_gib"] > 0

    ins = snugtune("data", "inspect", "--path", "builtin:python-docs-qa", "--model", str(demo_gguf), "--json", "-n", "1")
    assert ins.returncode == 0, ins.stderr
    report = json.loads(ins.stdout)
    assert report["template"] == "chat_template"  # the file's chat template is the one applied
    assert report["samples"][0]["tokens"] > 0

    train = snugtune("train", "demo", "--set", f"model.name_or_path='{demo_gguf}'", "--set", "train.max_steps=2",
                     "--set", "train.eval_steps=2", "--set", "gpu.profile='cpu'")
    assert train.returncode == 0, train.stdout + train.stderr
    run_dir = Path([ln for ln in train.stdout.splitlines() if ln.startswith("run directory: ")][0].split(": ", 1)[1])
    from core.events import read_events

    events = read_events(run_dir)
    started = next(ev for ev in events if ev["event"] == "run_started")
    assert started["model"]["source"].startswith(str(gguf_source.converted_dir(demo_gguf)))
    assert events[-1]["event"] == "run_finished" and events[-1]["steps"] == 2

    chat = subprocess.run([sys.executable, "-m", "core.chat", str(run_dir)], capture_output=True, text=True,
                          input=json.dumps({"prompt": "What does len do?", "max_new_tokens": 4, "id": 1}) + "\n",
                          timeout=LONG)
    lines = [json.loads(x) for x in chat.stdout.splitlines()]
    assert lines[0]["event"] == "ready" and lines[1]["event"] == "reply" and isinstance(lines[1]["response"], str)

    merged = tmp_path / "merged"
    exp = snugtune("export", run_dir.name, "--merged", str(merged))
    assert exp.returncode == 0, exp.stderr
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (merged / "tokenizer.json").is_file()


def test_old_transformers_is_refused_for_sentencepiece_gguf_tokenizers(tmp_path, monkeypatch):
    """transformers < 5.24 splits a GGUF SentencePiece vocabulary's words (Gemma 3: '_In st ru ct ion')."""
    import gguf
    import transformers

    from core.errors import UserError
    from core.gguf_source import _check_transformers_for

    def write(name, tokenizer_model):
        w = gguf.GGUFWriter(str(tmp_path / name), "gemma3")
        w.add_string("tokenizer.ggml.model", tokenizer_model)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    spm, bpe = write("spm.gguf", "llama"), write("bpe.gguf", "gpt2")
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(UserError) as err:
        _check_transformers_for(spm)
    assert "transformers>=5.24" in err.value.hint and "5.17.0" in str(err.value)
    _check_transformers_for(bpe)  # byte-level BPE vocabularies are read right
    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    _check_transformers_for(spm)
