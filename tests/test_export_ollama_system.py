"""The Ollama export for chat templates with no system turn of their own (Gemma's folds the system
prompt into the first user turn): the TEMPLATE puts Ollama's system prompt where the tokenizer's
template puts it, and the Modelfile carries the training data's system prompt as SYSTEM.

Templates are rendered as Ollama renders them: tests/go_template.py, Go's text/template with the
values Ollama's template.Execute passes (.System: the system messages' text; .Messages: all of
them, consecutive ones of a role merged). A SYSTEM line reaches the template as a system message
put first when the request has none (ollama/server/routes.go).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from go_template import render

# Written for this test in the shape of Gemma 3's template: BOS, the system text and a blank line
# at the start of the first user turn, the assistant as "model", roles checked to alternate,
# contents trimmed.
GEMMA_STYLE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' + (prefix if loop.first else '') }}"
    "{{ m['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# The same idea with text on both sides of the system prompt (as Llama 2's <<SYS>> block).
MARKED_FOLD = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}{{ '<|user|>\\n' }}"
    "{% if loop.first and sys %}{{ '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ m['content'] + '</s>\\n' }}{% else %}{{ '<|assistant|>\\n' + m['content'] + '</s>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# The system prompt in the LAST user turn (Mistral's templates): neither a head nor the first turn.
SYSTEM_IN_LAST_TURN = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if loop.last and sys %}{{ sys + '\\n\\n' }}{% endif %}{{ m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}"
)

SYSTEM = "You answer questions about Python.\nOne sentence."
CONVERSATIONS = [
    [{"role": "user", "content": "What does len do?"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does len do?"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does len do?"},
     {"role": "assistant", "content": "It counts."}, {"role": "user", "content": "And zip?"}],
    [{"role": "user", "content": "What does len do?"}, {"role": "assistant", "content": "It counts."},
     {"role": "user", "content": "And zip?"}],
]


def _tokenizer(template: str):
    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=False)
    tok.chat_template = template
    return tok


def _hf(tok, conv) -> str:
    """The tokenizer's rendering, less the BOS that llama.cpp and Ollama put in front themselves."""
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    return text[len(tok.bos_token):] if text.startswith(tok.bos_token) else text


@pytest.mark.parametrize("template", [GEMMA_STYLE, MARKED_FOLD], ids=["gemma-style", "marked"])
def test_a_system_prompt_folded_into_the_first_user_turn_lands_there_in_the_ollama_template(template):
    from core.export import go_from_chat_template

    tok = _tokenizer(template)
    go, system_ok, _ = go_from_chat_template(tok)
    assert system_ok, go
    assert "$.System" in go  # inside the range over messages, where `.System` would be an error
    for conv in CONVERSATIONS:
        assert render(go, conv) == _hf(tok, conv), conv
    # the system text is in the first user turn only, once, with the template's separator
    two = render(go, CONVERSATIONS[2])
    assert two.count("One sentence.") == 1
    assert ("<start_of_turn>user\n" + SYSTEM + "\n\nWhat does len do?" in two) == (template is GEMMA_STYLE)


def test_a_system_prompt_the_probes_cannot_place_is_still_left_out():
    """Mistral's layout renders [system, user] like a first-turn fold; the longer check tells it apart."""
    from core.export import Template, go_from_chat_template, modelfile_text

    tok = _tokenizer(SYSTEM_IN_LAST_TURN)
    go, system_ok, end = go_from_chat_template(tok)
    assert not system_ok
    assert "System" not in go
    text = modelfile_text("model.gguf", Template(None, go, ["</s>"], None, system_ok), SYSTEM)
    assert "SYSTEM" not in text  # a SYSTEM line the template would drop is not written


def _gemma_style_run(tmp_path: Path) -> Path:
    """A run as training leaves it, on a tiny Llama whose tokenizer has the Gemma-style template,
    trained on chat data where every sample has the same system prompt."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_model_dir
    from core.config import RunConfig
    from core.events import EventWriter
    from core.runs import create_run_dir

    model_dir = build_tiny_model_dir(tmp_path / "model", _tokenizer(GEMMA_STYLE))
    data = tmp_path / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for q, a in [("What does len do?", "It counts."), ("What does zip do?", "It pairs.")] * 3:
            fh.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]}) + "\n")
    cfg = RunConfig.from_dict({
        "gpu": {"profile": "cpu"}, "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data), "max_seq_len": 128}, "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 1},
        "output": {"runs_dir": str(tmp_path / "runs"), "name": "gemma-style"},
    })
    run_dir = create_run_dir(cfg)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(run_dir / "adapter"))
    ev = EventWriter(run_dir / "events.jsonl")
    ev.emit("run_started", model={"compute_dtype": "fp32"})
    ev.emit("data_prepared", format="chat")
    ev.close()
    return run_dir


def test_ollama_export_of_a_gemma_style_run_keeps_the_trained_system_prompt(tmp_path):
    pytest.importorskip("gguf")
    from core.config import RunConfig
    from core.data import detect_format, load_records, render_prompt, to_messages
    from core.export import export

    run_dir = _gemma_style_run(tmp_path)
    export(run_dir, ollama=str(tmp_path / "ollama"), quant="f16", progress=lambda _: None, out=lambda _: None)
    text = (tmp_path / "ollama" / "Modelfile").read_text(encoding="utf-8")
    assert f'SYSTEM """{SYSTEM}"""' in text  # every training sample had it
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system_line = re.search(r'SYSTEM """(.*?)"""', text, re.S).group(1)

    # what training saw before the first answer: the sample's system prompt and question
    cfg = RunConfig.from_toml(run_dir / "config.toml")
    records = load_records(cfg.data)
    sample = to_messages(records[0], detect_format(records, cfg.data))
    tok = _tokenizer(GEMMA_STYLE)
    trained = render_prompt(tok, cfg.data, sample[:-1], kind="chat")
    trained = trained[len(tok.bos_token):] if trained.startswith(tok.bos_token) else trained
    assert SYSTEM in trained

    # `ollama run` with the Modelfile's SYSTEM: a system message put first, as Ollama does
    question = [sample[1]]
    assert render(template, [{"role": "system", "content": system_line}] + question) == trained
    # a request with a system prompt of its own: that one, in the same place
    own = [{"role": "system", "content": "Answer in French."}] + question
    assert render(template, own) == _hf(tok, own)


# ---- the same renderings by Go's own text/template ----------------------------------------------


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    """tests/ollama_render built with Go, where Go is installed (not in CI: there the Python
    interpreter above stands in for it, and this check says it renders as Go does)."""
    import shutil
    import subprocess

    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed")
    where = tmp_path_factory.mktemp("go")
    exe = where / "ollama_render"
    # its own build cache, and never a toolchain download (no network in CI): the program has no deps
    env = {**os.environ, "GOCACHE": str(where / "cache"), "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod",
           "GOPATH": str(where / "gopath")}
    subprocess.run([go, "build", "-o", str(exe), "."], cwd=Path(__file__).parent / "ollama_render", check=True,
                   capture_output=True, timeout=300, env=env)

    def run(template: str, messages: list[dict]) -> str:
        out = subprocess.run([str(exe)], input=json.dumps({"template": template, "messages": messages}),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    return run


@pytest.mark.parametrize("template", [GEMMA_STYLE, MARKED_FOLD, SYSTEM_IN_LAST_TURN],
                         ids=["gemma-style", "marked", "last-turn"])
def test_go_itself_renders_the_ollama_templates_as_the_tests_do(template, go_renderer):
    from core.export import go_from_chat_template

    tok = _tokenizer(template)
    go, system_ok, _ = go_from_chat_template(tok)
    for conv in CONVERSATIONS + [[{"role": "system", "content": "A."}, {"role": "system", "content": "B."},
                                  {"role": "user", "content": "Hi"}]]:
        got = go_renderer(go, conv)
        assert got == render(go, conv), conv
        if system_ok or not any(m["role"] == "system" for m in conv):
            want = conv if len([m for m in conv if m["role"] == "system"]) < 2 else (
                [{"role": "system", "content": "A.\n\nB."}] + conv[2:])  # Ollama joins system messages
            assert got == _hf(tok, want), conv
