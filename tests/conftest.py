"""Shared fixtures: a tiny tokenizer, a tiny Llama model, tiny data files, isolated user dirs.

Everything is built locally (the Hub is never reached): a byte-level BPE tokenizer trained in
milliseconds on a few sentences, a 2-layer Llama with hidden size 64 saved with save_pretrained,
and instruction / chat / text data files. Session-scoped, so the suite builds each once.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

# ---- isolation: no test touches the user's real config, runs or cache -------------------------

_ISOLATED_ENV = ("SNUGTUNE_CONFIG_DIR", "SNUGTUNE_RUNS_DIR", "SNUGTUNE_CACHE")


@pytest.fixture(scope="session", autouse=True)
def _isolated_user_dirs(tmp_path_factory):
    """Point snugtune's config, runs and cache directories into a session temp dir.

    Tests that need a clean directory of their own set the variable again with monkeypatch.
    """
    base = tmp_path_factory.mktemp("snugtune-home")
    old = {k: os.environ.get(k) for k in _ISOLATED_ENV}
    os.environ["SNUGTUNE_CONFIG_DIR"] = str(base / "config")
    os.environ["SNUGTUNE_RUNS_DIR"] = str(base / "runs")
    os.environ["SNUGTUNE_CACHE"] = str(base / "cache")
    yield base
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    """A fresh, empty runs directory for one test (SNUGTUNE_RUNS_DIR points at it)."""
    d = tmp_path / "runs"
    monkeypatch.setenv("SNUGTUNE_RUNS_DIR", str(d))
    return d


@pytest.fixture
def config_dir(tmp_path, monkeypatch) -> Path:
    """A fresh, empty config directory for one test (SNUGTUNE_CONFIG_DIR points at it)."""
    d = tmp_path / "config"
    monkeypatch.setenv("SNUGTUNE_CONFIG_DIR", str(d))
    return d


# ---- text the tiny tokenizer and the data files are made of ------------------------------------

QA = [
    ("What does len do?", "It returns the number of items in a container."),
    ("What does sorted do?", "It returns a new sorted list from the items of an iterable."),
    ("What does zip do?", "It pairs up items from several iterables into tuples."),
    ("What does range do?", "It makes an immutable sequence of integers."),
    ("What does print do?", "It writes text to standard output."),
    ("What does open do?", "It opens a file and returns a file object."),
    ("What does sum do?", "It adds up the numbers of an iterable."),
    ("What does max do?", "It returns the largest item of an iterable."),
]

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    lines = []
    for q, a in QA:
        lines += [q, a, f"### Instruction:\n{q}\n\n### Response:\n{a}", f"<|user|>\n{q}</s>\n<|assistant|>\n{a}</s>"]
    return lines


def build_tiny_tokenizer(chat_template: bool = True):
    """A byte-level BPE of about 400 tokens with <pad>, <s>, </s> and role markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,  # bytes (256) + specials + ~140 merges: small enough for a 64-wide model
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None,
        additional_special_tokens=specials[3:],
    )
    if chat_template:
        fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A tiny byte-level BPE tokenizer with a chat template (role markers, '</s>' ends a turn)."""
    return build_tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="session")
def tiny_tokenizer_no_template():
    """The same tokenizer without a chat template (the data's built-in template applies)."""
    return build_tiny_tokenizer(chat_template=False)


def build_tiny_model_dir(directory: Path, tokenizer, seed: int = 0) -> Path:
    """Save a random-init 2-layer Llama (hidden 64) and the tokenizer into `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like the real small models
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A local model directory (config.json, safetensors, tokenizer): a tiny random Llama."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model", tiny_tokenizer)


# ---- data files ------------------------------------------------------------------------------


def instruction_records(n: int = 64) -> list[dict]:
    return [{"instruction": q, "input": "", "output": a} for q, a in (QA * (n // len(QA) + 1))[:n]]


def chat_records(n: int = 32) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (QA * (n // len(QA) + 1))[:n]
    ]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """instruction.jsonl (64 rows), chat.jsonl (32), sharegpt.jsonl (16), instruction.csv (16),
    instruction.json (16, a JSON array) and text.txt (blank-line separated paragraphs)."""
    d = tmp_path_factory.mktemp("tiny-data")
    with open(d / "instruction.jsonl", "w", encoding="utf-8") as fh:
        for r in instruction_records(64):
            fh.write(json.dumps(r) + "\n")
    with open(d / "chat.jsonl", "w", encoding="utf-8") as fh:
        for r in chat_records(32):
            fh.write(json.dumps(r) + "\n")
    with open(d / "sharegpt.jsonl", "w", encoding="utf-8") as fh:
        for q, a in (QA * 2)[:16]:
            fh.write(json.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}) + "\n")
    with open(d / "instruction.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(instruction_records(16))
    (d / "instruction.json").write_text(json.dumps(instruction_records(16)), encoding="utf-8")
    (d / "text.txt").write_text("\n\n".join(f"{q} {a}" for q, a in QA * 2) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tiny_instruction_jsonl(tiny_data_dir) -> Path:
    return tiny_data_dir / "instruction.jsonl"


def make_tiny_config(model_dir, data_path, runs_dir, *overrides: str):
    """RunConfig for the tiny model and data: CPU, 6 steps of 4 x 64 tokens; overrides as --set strings."""
    from core.config import RunConfig

    base = RunConfig.from_dict({
        "gpu": {"profile": "cpu"},
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data_path), "max_seq_len": 64, "eval_fraction": 0.1},
        "lora": {"r": 8, "alpha": 16},
        "train": {"micro_batch": 4, "grad_accum": 1, "max_steps": 6, "learning_rate": 1e-2,
                  "warmup_ratio": 0.0, "save_steps": 3, "logging_steps": 1},
        "output": {"runs_dir": str(runs_dir)},
    })
    return base.with_overrides(list(overrides)) if overrides else base


@pytest.fixture
def tiny_run_config(tiny_model_dir, tiny_instruction_jsonl, tmp_path):
    """A factory: make_tiny_config(...) with runs under this test's tmp_path."""

    def make(*overrides: str):
        return make_tiny_config(tiny_model_dir, tiny_instruction_jsonl, tmp_path / "runs", *overrides)

    return make


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs mounted in the test's temp dir (a disk that fills up), unmounted afterwards; the
    test is skipped where mounting needs rights this machine lacks (CI runs as root). `fill(dir)` writes
    a filler file until the disk is full."""
    import shutil
    import subprocess

    where = tmp_path / "tmpfs"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount (CI runs as root)")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(where) -> None:
    """Write a filler file into `where` until its disk has no byte left."""
    with open(Path(where) / "filler", "ab", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
