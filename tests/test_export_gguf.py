"""Export to GGUF and Ollama, checked by running the result in llama.cpp (issue 13, item 6).

The run exported is the built-in demo model (builtin:tiny-llama, a 4-layer Llama, hidden 256)
with a LoRA adapter of random, non-zero weights written with peft: a trained-for-a-few-steps
demo adapter answers every prompt with one repeated token, which would make "the same tokens"
say nothing, while random A and B give the merge real work and the model varied output.

llama.cpp runs through its Python binding (the `gguf` extra). Outside CI a missing binding
skips these tests; in CI (CI=true) it fails them, so the path is never silently untested.
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("CI"):
    import gguf  # noqa: F401
    import llama_cpp  # noqa: F401
else:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")

PROMPTS = ["What does len do?", "What does sorted do?", "How do I read a file line by line?"]
N_NEW = 16


def _write_run(tmp_path: Path, *, model_dir: str, data_path: Path, name: str = "demo-export",
               checkpoint_only: bool = False, seed: int = 7) -> Path:
    """A run directory as training leaves it: config.toml, events.jsonl and an adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.config import RunConfig
    from core.events import EventWriter
    from core.runs import create_run_dir

    cfg = RunConfig.from_dict({
        "gpu": {"profile": "cpu"},
        "model": {"name_or_path": model_dir},
        "data": {"path": str(data_path), "max_seq_len": 128},
        "lora": {"r": 8, "alpha": 16},
        "train": {"max_steps": 2},
        "output": {"runs_dir": str(tmp_path / "runs"), "name": name},
    })
    run_dir = create_run_dir(cfg)
    from core.model import resolve_model_source

    base = AutoModelForCausalLM.from_pretrained(resolve_model_source(model_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"],
                      init_lora_weights=False)  # random B as well as A: a merge that changes the model
    peft_model = get_peft_model(base, lora)
    where = run_dir / ("checkpoints/checkpoint-2" if checkpoint_only else "adapter")
    peft_model.save_pretrained(str(where))
    ev = EventWriter(run_dir / "events.jsonl")
    ev.emit("run_started", model={"compute_dtype": "fp32"})
    ev.emit("data_prepared", format="instruction")
    ev.close()
    return run_dir


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("export-data")
    p = d / "qa.jsonl"
    with open(p, "w", encoding="utf-8") as fh:
        for q in PROMPTS * 4:
            fh.write(json.dumps({"system": "You answer questions about Python.", "instruction": q,
                                 "output": "It does what its name says."}) + "\n")
    return p


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_data) -> Path:
    return _write_run(tmp_path_factory.mktemp("export-run"), model_dir="builtin:tiny-llama", data_path=demo_data)


@pytest.fixture(scope="module")
def exported(demo_run, tmp_path_factory):
    """The demo run exported once to f16, q8_0 and q4_k_m GGUF, an Ollama folder and merged weights."""
    from core.export import export

    out = tmp_path_factory.mktemp("exported")
    printed: list[str] = []
    files = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        files[quant] = out / f"demo-{quant}.gguf"
        export(demo_run, gguf=str(files[quant]), quant=quant, ollama=str(out / "ollama") if quant == "q8_0" else None,
               merged=str(out / "merged") if quant == "f16" else None, out=printed.append, progress=printed.append)
    return out, files, printed


@pytest.fixture(scope="module")
def reference(demo_run):
    """The prompts as the run trained (text and ids) and the merged model's greedy tokens in transformers."""
    import torch

    from core.chat import render_prompt
    from core.export import load_merged

    m = load_merged(demo_run, progress=lambda _: None, full_precision=True)
    model = m.model.float().eval()
    prompts, greedy = [], []
    for p in PROMPTS:
        text = render_prompt(m.tokenizer, m.cfg, p, kind=m.kind)
        ids = m.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                                 eos_token_id=None, pad_token_id=m.tokenizer.pad_token_id)
        prompts.append((text, ids))
        greedy.append(out[0, len(ids):].tolist())
    return prompts, greedy, m.tokenizer


def _agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
    return same / sum(len(r) for r in ref)


def test_f16_gguf_answers_token_for_token_like_the_merged_model(exported, reference):
    from core.gguf_export import llama_cpp_greedy

    _, files, _ = exported
    prompts, greedy, _ = reference
    # answers that differ between prompts and change within themselves, so agreement means something
    assert len({tuple(g) for g in greedy}) == len(greedy) and len({t for g in greedy for t in g}) >= 6, greedy
    results = llama_cpp_greedy(files["f16"], prompts, N_NEW)
    for (text, ids), ref, (theirs, got) in zip(prompts, greedy, results):
        assert theirs == ids, f"llama.cpp tokenizes {text!r} differently: {theirs} vs {ids}"
        assert got == ref, f"{text!r}: llama.cpp f16 {got} vs transformers {ref}"


def test_quantized_ggufs_run_and_mostly_agree(exported, reference, capsys):
    from core.gguf_export import llama_cpp_greedy

    _, files, _ = exported
    prompts, greedy, _ = reference
    measured = {}
    for quant in ("q8_0", "q4_k_m"):
        got = [g for _, g in llama_cpp_greedy(files[quant], prompts, N_NEW)]
        assert all(len(g) == N_NEW for g in got)
        measured[quant] = _agreement(greedy, got)
    with capsys.disabled():
        print(f"\n  demo model, greedy agreement with transformers over {len(PROMPTS)}x{N_NEW} tokens: "
              + ", ".join(f"{q} {a:.0%}" for q, a in measured.items()))
    # q8_0 is within a rounding of f16; the first token (the least accumulated difference) must agree
    first = [g[0] for _, g in llama_cpp_greedy(files["q8_0"], prompts, 1)]
    assert first == [g[0] for g in greedy]
    assert measured["q8_0"] >= 0.5


def test_gguf_sizes_types_and_the_k_quant_fallback(exported):
    import gguf

    _, files, _ = exported
    sizes = {q: f.stat().st_size for q, f in files.items()}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(files["q4_k_m"]).tensors}
    # 704-wide rows (the demo's feed-forward down projection) cannot be k-quants (256 a block):
    # llama.cpp's fallback type instead; 256-wide ones are k-quants
    assert types["blk.0.ffn_down.weight"] in ("Q5_0", "Q5_1", "Q8_0", "Q4_0", "Q4_1"), types
    assert types["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    assert types["blk.0.attn_norm.weight"] == "F32"
    _, _, printed = exported
    assert any("fallback quantization" in line for line in printed), printed  # and the user is told
    assert {os.stat(f).st_mode & 0o777 for f in files.values()} == {0o666 & ~_umask()}


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_gguf_carries_the_trained_chat_template_and_stop_token(exported, reference):
    import gguf

    _, files, _ = exported
    _, _, tok = reference
    r = gguf.GGUFReader(files["f16"])
    fields = {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.") and "tokens" not in k
              and k not in ("tokenizer.ggml.token_type", "tokenizer.ggml.merges")}
    assert fields["tokenizer.chat_template"] == tok.chat_template  # the demo tokenizer's own, which training used
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"


def _go_render(template: str, messages: list[dict]) -> str:
    """The prompt Ollama renders from a Modelfile TEMPLATE (tests/go_template.py: Go's
    text/template with the values Ollama passes)."""
    from go_template import render

    return render(template, messages)


def test_ollama_folder_has_the_gguf_and_a_modelfile_matching_training(exported, reference, demo_run):
    out, _, printed = exported
    _, _, tok = reference
    folder = out / "ollama"
    assert (folder / "model.gguf").is_file()
    text = (folder / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./model.gguf" in text
    assert 'PARAMETER stop "</s>"' in text
    assert 'SYSTEM """You answer questions about Python."""' in text  # every training sample had it
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    conv = [{"role": "system", "content": "You answer questions about Python."},
            {"role": "user", "content": "What does len do?"}, {"role": "assistant", "content": "It counts."},
            {"role": "user", "content": "And sorted?"}]
    assert _go_render(template, conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert any(f"ollama create {demo_run.name}" in line and str(folder / "Modelfile") in line for line in printed)


def test_merged_weights_are_16_bit_with_normal_file_modes(exported):
    from safetensors import safe_open

    out, _, printed = exported
    merged = out / "merged"
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"BF16"}
    want = 0o666 & ~_umask()
    assert {p.stat().st_mode & 0o777 for p in merged.iterdir()} == {want}
    assert any(line.startswith("merged model:") and line.endswith("(bf16)") for line in printed)


# ---- the built-in template, as Jinja and as an Ollama template ----------------------------------


@pytest.mark.parametrize("kind", ["instruction", "chat"])
def test_builtin_template_renders_as_training_did(kind, tiny_tokenizer_no_template):
    from jinja2 import Environment

    from core.config import DataConfig
    from core.data import render_prompt
    from core.gguf_export import builtin_go_template, builtin_jinja

    tok = tiny_tokenizer_no_template
    data_cfg = DataConfig(path="x.jsonl", format=kind)
    jinja = Environment().from_string(builtin_jinja(kind, tok.eos_token))
    go = builtin_go_template(kind, tok.eos_token)
    for msgs in ([{"role": "user", "content": "What does len do?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does zip do?"}]):
        want = render_prompt(tok, data_cfg, msgs, kind=kind)
        assert jinja.render(messages=msgs, add_generation_prompt=True) == want
        assert _go_render(go, msgs) == want
    if kind == "chat":  # with history: the chat layout, the trained reply ended by EOS
        msgs = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b."}, {"role": "user", "content": "c?"}]
        want = render_prompt(tok, data_cfg, msgs, kind=kind)
        assert jinja.render(messages=msgs, add_generation_prompt=True) == want == _go_render(go, msgs)


# ---- bad input --------------------------------------------------------------------------------------


def test_an_unfinished_run_exports_its_newest_checkpoint_and_says_so(tmp_path, demo_data):
    from core.export import export

    run_dir = _write_run(tmp_path, model_dir="builtin:tiny-llama", data_path=demo_data, name="stopped",
                         checkpoint_only=True)
    said: list[str] = []
    export(run_dir, gguf=str(tmp_path / "stopped.gguf"), quant="f16", progress=said.append, out=said.append)
    assert (tmp_path / "stopped.gguf").stat().st_size > 1_000_000
    assert any("has not finished" in s and "checkpoint-2" in s for s in said), said


def test_unconvertible_architecture_and_missing_llama_cpp_are_one_message_each(monkeypatch):
    from core.errors import UserError
    from core.gguf_export import check_convertible, require_llama_cpp

    with pytest.raises(UserError, match=r"cannot convert a 'gpt2' model to GGUF \(it converts gemma2, gemma3, llama"):
        check_convertible({"model_type": "gpt2"})
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` meets when it is not installed
    with pytest.raises(UserError, match=r"pip install 'snugtune\[gguf\]'"):
        require_llama_cpp()


SNUGTUNE = [sys.executable, "-m", "tui.cli"]


@pytest.mark.slow  # two CLI processes that load torch
def test_cli_refuses_an_existing_output_and_leaves_nothing_when_the_disk_fills(demo_run, tmp_path):
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    out = subprocess.run([*SNUGTUNE, "export", str(demo_run), "--gguf", str(taken)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 2 and "already exists" in out.stderr and taken.read_bytes() == b"mine"

    # A real write failure: the export's process may not write files over 1 MB (RLIMIT_FSIZE), so
    # the GGUF write fails part-way as on a full disk; no temporary file may be left behind.
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    target = tmp_path / "full"
    target.mkdir()
    out = subprocess.run([*SNUGTUNE, "export", str(demo_run), "--gguf", str(target / "x.gguf"), "--quant", "f16"],
                         capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert out.returncode == 4, out.stderr  # a write the disk (here: the size limit) refused, as for training
    assert "snugtune: error: cannot write" in out.stderr and "Traceback" not in out.stderr
    assert "larger than this system lets a file be (1 MB, `ulimit -f`)" in out.stderr, out.stderr
    assert list(target.iterdir()) == []


def test_merged_weights_on_a_full_disk_are_one_message_and_nothing_left(demo_run, tmp_path):
    # safetensors writes from Rust and raises its own SafetensorError, not an OSError: this was a
    # traceback and exit code 1
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    target = tmp_path / "full"
    target.mkdir()
    out = subprocess.run([*SNUGTUNE, "export", str(demo_run), "--merged", str(target / "merged")],
                         capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert out.returncode == 4, out.stderr
    assert "Traceback" not in out.stderr and "SafetensorError" not in out.stderr, out.stderr
    assert f"cannot write {target / 'merged'}: the file is larger than this system lets a file be" in out.stderr
    assert "nothing was left behind" in out.stderr
    assert list(target.iterdir()) == []


def test_the_disk_error_reads_a_full_disk_from_any_writer(tmp_path):
    import errno

    from core.export import DiskFullError, _disk_error

    class SafetensorError(Exception):  # the name safetensors' Rust error has; its message as it prints it
        pass

    full = _disk_error(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                       tmp_path / "merged")
    assert isinstance(full, DiskFullError) and full.exit_code == 4
    assert f"the disk holding {tmp_path / 'merged'} is full (" in str(full) and "MB free)" in str(full)
    other = _disk_error(OSError(errno.EACCES, "Permission denied"), tmp_path / "x.gguf")
    assert other.exit_code == 2 and "(Permission denied); nothing was left behind" in str(other)


# ---- a tokenizer's own chat template, as an Ollama template -------------------------------------

# The shapes of the common families' templates (written for this test): ChatML with a default
# system prompt (Qwen 2.5, SmolLM2), header blocks after BOS (Llama 3), and a system prompt folded
# into the first user turn (Gemma), which the Ollama template puts into its first user message.
CHATML_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
HEADERS_AFTER_BOS = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content']"
    " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SYSTEM_IN_FIRST_TURN = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set first = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n'"
    " + (first if loop.first else '') + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@pytest.mark.parametrize("template,system_ok", [(CHATML_DEFAULT_SYSTEM, True), (HEADERS_AFTER_BOS, True),
                                                (SYSTEM_IN_FIRST_TURN, True)])
def test_a_tokenizers_chat_template_becomes_an_equivalent_ollama_template(template, system_ok):
    from conftest import build_tiny_tokenizer
    from core.export import go_from_chat_template

    tok = build_tiny_tokenizer(chat_template=False)
    tok.chat_template = template
    go, ok, end_of_turn = go_from_chat_template(tok)
    assert ok is system_ok
    assert "{{ .Content }}" in go and end_of_turn.strip()
    conv = [{"role": "user", "content": "What does len do?"}, {"role": "assistant", "content": "It counts."},
            {"role": "user", "content": "And zip?"}]
    convs = [conv[:1], conv] + ([[{"role": "system", "content": "Be brief."}] + conv] if system_ok else [])
    for c in convs:
        want = tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        if want.startswith(tok.bos_token):
            want = want[len(tok.bos_token):]  # llama.cpp / Ollama add BOS themselves
        assert _go_render(go, c) == want
