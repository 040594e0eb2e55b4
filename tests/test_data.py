"""core.data: loading, format detection, rendering, masking, packing, length stats, inspect, and
the `snugtune data inspect` command. Tiny tokenizer and models from conftest; no network."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.config import DataConfig
from core.data import (
    IGNORE_INDEX,
    DataFormat,
    Segment,
    build_datasets,
    check_records,
    collate,
    detect_format,
    inspect,
    length_stats,
    load_records,
    pack,
    render,
    render_prompt,
    tokenize,
)
from core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]


def cfg(path="x.jsonl", **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Name a colour.", "input": "", "output": "Blue."}]


# ---- loading: each file type -------------------------------------------------------------------


def test_jsonl_loads(tiny_data_dir):
    records = load_records(cfg(tiny_data_dir / "instruction.jsonl"))
    assert len(records) == 64 and set(records[0]) == {"instruction", "input", "output"}


def test_json_array_and_data_object_and_jsonl_saved_as_json(tmp_path, tiny_data_dir):
    assert len(load_records(cfg(tiny_data_dir / "instruction.json"))) == 16
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ALPACA}), encoding="utf-8")
    assert load_records(cfg(wrapped)) == ALPACA
    lines = write_jsonl(tmp_path / "lines.json", ALPACA)  # JSON lines under a .json name
    assert load_records(cfg(lines)) == ALPACA


def test_csv_and_tsv_load(tmp_path, tiny_data_dir):
    records = load_records(cfg(tiny_data_dir / "instruction.csv"))
    assert len(records) == 16 and records[0]["instruction"] == "What does len do?"
    tsv = tmp_path / "d.tsv"
    with tsv.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "response"], delimiter="\t")
        w.writeheader()
        w.writerow({"prompt": "Hi, there", "response": "Hello"})
    assert load_records(cfg(tsv)) == [{"prompt": "Hi, there", "response": "Hello"}]


def test_parquet_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ALPACA), path)
    assert load_records(cfg(path)) == ALPACA


def test_txt_loads_one_sample_per_paragraph(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("First paragraph,\nstill first.\n\n\n  \nSecond one.\n", encoding="utf-8")
    assert load_records(cfg(path)) == [{"text": "First paragraph,\nstill first."}, {"text": "Second one."}]


def test_max_samples(tiny_data_dir):
    assert len(load_records(cfg(tiny_data_dir / "instruction.jsonl", max_samples=5))) == 5
    assert len(load_records(cfg(tiny_data_dir / "instruction.csv", max_samples=3))) == 3
    assert len(load_records(cfg(tiny_data_dir / "instruction.json", max_samples=4))) == 4


# ---- loading: bad input says what and where ----------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"missing\.jsonl: file not found"):
        load_records(cfg(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="file not found"):
        load_records(cfg("./data/nothing-here"))  # path-like, not a Hub id


def test_unknown_extension_and_directory(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(UserError, match=r"unknown file type '\.xlsx'.*\.jsonl.*\.parquet"):
        load_records(cfg(path))
    with pytest.raises(UserError, match="a directory with no data files in it"):
        load_records(cfg(tmp_path))  # a directory is read as its data files: here it has none


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "missing quote}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_records(cfg(path))
    path.write_text('{"text": "ok"}\n["a list"]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 2: expected a JSON object"):
        load_records(cfg(path))


def test_malformed_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json, line 3: not valid JSON"):
        load_records(cfg(path))
    path.write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(UserError, match=r"expected a list of samples or \{\"data\": \[...\]\}.*'rows'"):
        load_records(cfg(path))


def test_unreadable_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_records(cfg(path))
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        load_records(cfg(damaged))


def test_empty_dataset(tmp_path):
    for name, content in [("e.jsonl", "\n\n"), ("e.txt", "  \n\n"), ("e.json", "[]"), ("e.csv", "")]:
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        with pytest.raises(UserError, match="no samples found"):
            load_records(cfg(path))


# ---- loading from the Hub (a local fake Hub; the real one is never contacted) ---------------------

HUB_SHA = "a" * 40
HUB_FILES = {"data/train.jsonl": b"".join(json.dumps(r).encode() + b"\n" for r in ALPACA * 3)}


class _FakeHub(BaseHTTPRequestHandler):
    """Answers the endpoints huggingface_hub and datasets call to load one small dataset,
    `someone/tiny-qa`; `someone/gated` is gated; everything else does not exist."""

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", headers=None):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = self.path.split("?")[0]
        repo = "someone/tiny-qa"
        if path.startswith("/api/datasets/someone/gated"):
            return self._send(401, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"})
        if re.fullmatch(rf"/api/datasets/{repo}(/revision/[^/]+)?", path):
            info = {"id": repo, "sha": HUB_SHA, "private": False, "siblings": [{"rfilename": f} for f in HUB_FILES]}
            return self._send(200, json.dumps(info).encode())
        m = re.fullmatch(rf"/api/datasets/{repo}/tree/[^/]+(?:/(.*))?", path)
        if m:
            sub = m.group(1) or ""
            items = []
            for f, body in HUB_FILES.items():
                rest = f[len(sub):].lstrip("/") if f.startswith(sub) else None
                if rest is None:
                    continue
                if "/" in rest:
                    items.append({"type": "directory", "path": f"{sub}/{rest}".strip("/").rsplit("/", 1)[0], "oid": "0" * 40, "size": 0})
                else:
                    items.append({"type": "file", "path": f, "size": len(body), "oid": hashlib.sha1(body).hexdigest()})
            return self._send(200, json.dumps(items).encode())
        m = re.fullmatch(rf"/datasets/{repo}/resolve/[^/]+/(.+)", path)
        if m and m.group(1) in HUB_FILES:
            body = HUB_FILES[m.group(1)]
            return self._send(200, body, {"X-Repo-Commit": HUB_SHA, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'})
        code = "RepoNotFound" if path.startswith("/api/") else "EntryNotFound"
        self._send(404, b'{"error": "not found"}', {"X-Error-Code": code})


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


HUB_SCRIPT = """
import json, sys
from core.config import DataConfig
from core.data import load_records
from core.errors import UserError
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = {"rows": load_records(DataConfig(path=name, max_samples=4))}
    except UserError as exc:
        out[name] = {"error": str(exc)}
print(json.dumps(out))
"""


def _run_hub(endpoint: str, tmp_path: Path, *names: str) -> dict:
    # A fresh interpreter: huggingface_hub and datasets read HF_ENDPOINT when they are imported.
    env = {"PATH": "/usr/bin:/bin", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
           "HF_TOKEN": "hf_SECRETsecretSECRETsecret1234", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, *names], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "SECRET" not in proc.stdout + proc.stderr  # the token is never shown
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hub_dataset_loads_and_errors_are_clear(fake_hub, tmp_path):
    out = _run_hub(fake_hub, tmp_path, "someone/tiny-qa", "someone/missing", "someone/gated")
    assert out["someone/tiny-qa"]["rows"] == (ALPACA * 2)[:4]  # max_samples honoured
    assert "not found on the Hub, or it is private and needs a token" in out["someone/missing"]["error"]
    assert "HF_TOKEN" in out["someone/missing"]["error"]
    assert "gated" in out["someone/gated"]["error"] and "HF_TOKEN" in out["someone/gated"]["error"]


def test_hub_unreachable(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _run_hub(f"http://127.0.0.1:{port}", tmp_path, "someone/tiny-qa")
    err = out["someone/tiny-qa"]["error"]
    assert "cannot reach the Hugging Face Hub" in err and f"127.0.0.1:{port}" in err and "HF_HUB_OFFLINE" in err


# ---- format detection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, columns",
    [
        ({"instruction": "i", "input": "x", "output": "o"}, {"instruction": "instruction", "input": "input", "output": "output"}),
        ({"prompt": "p", "response": "r"}, {"instruction": "prompt", "output": "response"}),
        ({"question": "q", "answer": "a"}, {"instruction": "question", "output": "answer"}),
        ({"prompt": "p", "completion": "c"}, {"instruction": "prompt", "output": "completion"}),
        ({"instruction": "i", "context": "c", "response": "r"}, {"instruction": "instruction", "input": "context", "output": "response"}),
        ({"system": "s", "instruction": "i", "output": "o"}, {"instruction": "instruction", "output": "output", "system": "system"}),
    ],
)
def test_detect_instruction(row, columns):
    fmt = detect_format([row], cfg())
    assert fmt.kind == "instruction" and fmt.columns == columns and fmt.reason.startswith("detected")


def test_detect_chat_and_sharegpt(tiny_data_dir):
    fmt = detect_format(load_records(cfg(tiny_data_dir / "chat.jsonl")), cfg())
    assert (fmt.kind, fmt.columns, fmt.message_keys) == ("chat", {"messages": "messages"}, ("role", "content"))
    fmt = detect_format(load_records(cfg(tiny_data_dir / "sharegpt.jsonl")), cfg())
    assert (fmt.kind, fmt.columns, fmt.message_keys) == ("chat", {"messages": "conversations"}, ("from", "value"))
    assert "sharegpt" in fmt.reason


def test_detect_text(tiny_data_dir):
    fmt = detect_format(load_records(cfg(tiny_data_dir / "text.txt")), cfg())
    assert (fmt.kind, fmt.columns) == ("text", {"text": "text"})
    fmt = detect_format([{"body_text": "just one column"}], cfg())  # a lone string column is text
    assert (fmt.kind, fmt.columns) == ("text", {"text": "body_text"})


def test_column_mapping_overrides_detection():
    rows = [{"q": "What?", "a": "That.", "text": "ignored"}]
    fmt = detect_format(rows, cfg(columns={"instruction": "q", "output": "a"}))
    assert (fmt.kind, fmt.columns) == ("instruction", {"instruction": "q", "output": "a"})
    assert "data.columns" in fmt.reason
    chats = [{"dialogue": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    assert detect_format(chats, cfg(columns={"messages": "dialogue"})).columns == {"messages": "dialogue"}
    # A forced format wins over detection: these rows would be detected as instruction data.
    assert detect_format(rows, cfg(format="text")).columns == {"text": "text"}
    # A column mapped to one field is not picked again for another.
    fmt = detect_format([{"input": "Why?", "output": "Because."}], cfg(columns={"instruction": "input"}))
    assert fmt.columns == {"instruction": "input", "output": "output"}


def test_column_mapping_to_absent_column_lists_columns():
    with pytest.raises(UserError, match=r"maps 'output' to column 'reply'.*its columns are: q, a"):
        detect_format([{"q": "x", "a": "y"}], cfg(columns={"instruction": "q", "output": "reply"}))
    with pytest.raises(UserError, match=r"unknown field 'answer'; the fields are"):
        detect_format([{"q": "x", "a": "y"}], cfg(columns={"answer": "a"}))
    with pytest.raises(UserError, match=r"maps 'output', which text data does not have"):
        detect_format([{"q": "x", "a": "y"}], cfg(format="text", columns={"text": "q", "output": "a"}))


def test_undetectable_format_lists_columns_and_how_to_map():
    with pytest.raises(UserError, match=r"cannot tell the data's format.*its columns are: id, score") as exc:
        detect_format([{"id": 1, "score": 0.5}], cfg())
    # The hint names the syntax of the command it appears in: train's --set by default.
    assert '--set "data.columns={instruction=\'my_question\', output=\'my_answer\'}"' in str(exc.value)
    assert "--column" not in str(exc.value)
    from core.data import hint_syntax

    with hint_syntax("inspect"), pytest.raises(UserError, match="--column instruction=my_question --column output=my_answer"):
        detect_format([{"id": 1, "score": 0.5}], cfg())
    with hint_syntax("wizard"), pytest.raises(UserError, match="type instruction=my_question, output=my_answer in the Columns box"):
        detect_format([{"id": 1, "score": 0.5}], cfg())
    with pytest.raises(UserError, match=r"needs a column of message lists"):
        detect_format([{"id": 1, "score": 0.5}], cfg(format="chat"))


def test_rows_missing_fields_are_named():
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"instruction": "d", "output": None}]
    fmt = detect_format(rows, cfg())
    with pytest.raises(UserError, match=r"2 of 3 samples cannot be used as instruction data: "
                                        r"row 2: field 'output' \(column 'output'\) is missing; row 3"):
        check_records(rows, fmt)


def test_chat_rows_checked():
    fmt = DataFormat("chat", {"messages": "messages"}, "", ("role", "content"))
    no_answer = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(UserError, match="row 1: 'messages' has no assistant message"):
        check_records(no_answer, fmt)
    odd_role = [{"messages": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    with pytest.raises(UserError, match="row 1: message 1 of 'messages' has unknown role 'narrator'"):
        check_records(odd_role, fmt)


# ---- rendering and masking ---------------------------------------------------------------------


def _texts(segments):
    return [(s.text, s.trained) for s in segments]


def test_instruction_with_chat_template(tiny_tokenizer):
    fmt = detect_format(ALPACA, cfg())
    segs = render(ALPACA[0], fmt, tiny_tokenizer, cfg())
    assert _texts(segs) == [
        ("<|user|>\nAdd the numbers.\n\n2 and 3</s>\n<|assistant|>\n", False),
        ("5</s>\n", True),
    ]


def test_instruction_with_builtin_template(tiny_tokenizer, tiny_tokenizer_no_template):
    fmt = detect_format(ALPACA, cfg())
    expected = [("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n", False), ("5</s>", True)]
    # No chat template -> built-in; or asked for explicitly although the tokenizer has one.
    assert _texts(render(ALPACA[0], fmt, tiny_tokenizer_no_template, cfg())) == expected
    assert _texts(render(ALPACA[0], fmt, tiny_tokenizer, cfg(template="builtin"))) == expected
    # An empty input leaves the Input block out.
    assert render(ALPACA[1], fmt, tiny_tokenizer_no_template, cfg())[0].text == "### Instruction:\nName a colour.\n\n### Response:\n"


MULTI_TURN = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye!"},
]}


def test_multi_turn_chat_trains_every_assistant_turn(tiny_tokenizer, tiny_tokenizer_no_template):
    fmt = detect_format([MULTI_TURN], cfg())
    segs = render(MULTI_TURN, fmt, tiny_tokenizer, cfg())
    assert [s.text for s in segs if s.trained] == ["Hello.</s>\n", "Bye!</s>\n"]
    assert "".join(s.text for s in segs) == tiny_tokenizer.apply_chat_template(MULTI_TURN["messages"], tokenize=False)
    builtin = render(MULTI_TURN, fmt, tiny_tokenizer_no_template, cfg())
    assert _texts(builtin) == [
        ("### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\n", False),
        ("Hello.</s>", True),
        ("\n\n### User:\nBye\n\n### Assistant:\n", False),
        ("Bye!</s>", True),
    ]


def test_sharegpt_renders_like_role_content(tiny_tokenizer, tiny_data_dir):
    share = load_records(cfg(tiny_data_dir / "sharegpt.jsonl"))[0]
    chat = load_records(cfg(tiny_data_dir / "chat.jsonl"))[0]
    assert render(share, detect_format([share], cfg()), tiny_tokenizer, cfg()) == \
        render(chat, detect_format([chat], cfg()), tiny_tokenizer, cfg())


def test_text_is_all_trained_with_eos(tiny_tokenizer):
    fmt = DataFormat("text", {"text": "text"}, "")
    assert _texts(render({"text": "Plain words."}, fmt, tiny_tokenizer, cfg())) == [("Plain words.</s>", True)]


def test_eos_added_when_the_template_ends_turns_otherwise(tiny_tokenizer_no_template):
    import copy

    tok = copy.deepcopy(tiny_tokenizer_no_template)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    segs = render(ALPACA[1], detect_format(ALPACA, cfg()), tok, cfg())
    assert _texts(segs) == [("user: Name a colour.\nassistant: ", False), ("Blue.\n", True), ("</s>", True)]


def test_template_that_rewrites_history_is_refused(tiny_tokenizer_no_template):
    import copy

    tok = copy.deepcopy(tiny_tokenizer_no_template)
    # Renders only the last two messages: earlier text changes as turns are added.
    tok.chat_template = "{% for m in messages[-2:] %}{{ m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(UserError, match="(?s)renders a conversation differently.*--set data.template='builtin'"):
        render(MULTI_TURN, detect_format([MULTI_TURN], cfg()), tok, cfg())


def test_bos_is_prepended_where_the_tokenizer_adds_one(tiny_tokenizer_no_template):
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer_no_template)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # a Llama-like tokenizer
    segs = render(ALPACA[0], detect_format(ALPACA, cfg()), tok, cfg())
    assert segs[0] == Segment("<s>", False)
    ids, _ = tokenize(segs, tok, 512)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_tokenize_masks_the_prompt(tiny_tokenizer):
    segs = [Segment("### Instruction:\nWhat does len do?\n\n### Response:\n", False),
            Segment("It returns the number of items in a container.</s>", True)]
    ids, labels = tokenize(segs, tiny_tokenizer, 512)
    prompt_len = len(tiny_tokenizer(segs[0].text, add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[prompt_len:]) == segs[1].text
    # Loss on everything when asked; truncation keeps the first max_seq_len tokens.
    _, all_labels = tokenize(segs, tiny_tokenizer, 512, train_on_responses_only=False)
    assert all_labels == ids
    short_ids, short_labels = tokenize(segs, tiny_tokenizer, 5)
    assert short_ids == ids[:5] and short_labels == labels[:5]


def test_render_prompt_matches_training_layout(tiny_tokenizer, tiny_tokenizer_no_template):
    fmt = detect_format(ALPACA, cfg())
    msgs = [{"role": "user", "content": "Name a colour."}]
    for tok in (tiny_tokenizer, tiny_tokenizer_no_template):
        trained = render(ALPACA[1], fmt, tok, cfg())
        assert render_prompt(tok, cfg(), msgs, kind="instruction") == trained[0].text
    chat_fmt = detect_format([MULTI_TURN], cfg())
    segs = render(MULTI_TURN, chat_fmt, tiny_tokenizer_no_template, cfg())
    prompt = render_prompt(tiny_tokenizer_no_template, cfg(), MULTI_TURN["messages"][:-1], kind="chat")
    assert prompt == "".join(s.text for s in segs[:3])


# ---- packing: isolation and loss ---------------------------------------------------------------


def _random_examples(lengths, vocab, seed=0, prompt=2):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(7, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_pack_layout():
    examples = _random_examples([30, 10, 25, 5, 18, 12, 40], vocab=100)
    rows = pack(examples, 48)
    assert all(len(r["input_ids"]) <= 48 for r in rows)
    assert len(rows) == 3  # 140 tokens in 3 x 48: best-fit decreasing finds the tightest packing here
    seen = []
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        bounds = starts + [len(r["input_ids"])]
        for s, e in zip(bounds, bounds[1:]):
            assert r["position_ids"][s:e] == list(range(e - s))
            assert r["labels"][s] == IGNORE_INDEX  # no prediction across the boundary
            seen.append(r["input_ids"][s:e])
    assert sorted(map(tuple, seen)) == sorted(tuple(e["input_ids"]) for e in examples)
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        pack(examples, 20)


@pytest.fixture(scope="module")
def fp32_llama():
    import torch
    from transformers import LlamaForCausalLM

    from core.demo import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).float().eval()
    model.config.use_cache = False  # what the engine sets for training (see the trap test below)
    return model


def _segments_of(row):
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return list(zip(starts, starts[1:]))


def test_packed_samples_do_not_attend_to_each_other(fp32_llama):
    import torch

    examples = _random_examples([9, 14, 6, 11, 3], vocab=128, seed=1)
    rows = pack(examples, 64)
    assert len(rows) == 1 and len(_segments_of(rows[0])) == 5
    with torch.no_grad():
        packed = fp32_llama(**collate(rows, pad_token_id=0)).logits[0]
        for s, e in _segments_of(rows[0]):
            alone = fp32_llama(input_ids=torch.tensor([rows[0]["input_ids"][s:e]])).logits[0]
            torch.testing.assert_close(packed[s:e], alone, atol=1e-4, rtol=1e-4)


def test_padded_packed_batch_keeps_rows_isolated(fp32_llama):
    import torch

    rows = pack(_random_examples([20, 12, 7, 16, 5], vocab=128, seed=2), 24)
    batch = collate(rows, pad_token_id=0)
    assert "attention_mask" not in batch and len({len(r["input_ids"]) for r in rows}) > 1
    with torch.no_grad():
        logits = fp32_llama(**batch).logits
        for b, row in enumerate(rows):
            for s, e in _segments_of(row):
                alone = fp32_llama(input_ids=torch.tensor([row["input_ids"][s:e]])).logits[0]
                torch.testing.assert_close(logits[b, s:e], alone, atol=1e-4, rtol=1e-4)


def test_packed_loss_equals_token_weighted_loss_of_samples(fp32_llama):
    import torch

    examples = _random_examples([9, 14, 6, 11], vocab=128, seed=3, prompt=3)
    rows = pack(examples, 64)
    with torch.no_grad():
        packed_loss = fp32_llama(**collate(rows, pad_token_id=0)).loss.item()
        total, count = 0.0, 0
        for ex in examples:
            out = fp32_llama(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
            n = sum(1 for x in ex["labels"][1:] if x != IGNORE_INDEX)  # the model predicts labels 1..n-1
            total += out.loss.item() * n
            count += n
    assert packed_loss == pytest.approx(total / count, abs=1e-5)


def test_trap_a_kv_cache_disables_packed_isolation(fp32_llama):
    """Documents why training must run with use_cache=False: with a cache, transformers builds a
    plain causal mask over the whole row and samples see each other."""
    import torch

    rows = pack(_random_examples([9, 14], vocab=128, seed=4), 64)
    (s, e), (s2, e2) = _segments_of(rows[0])
    with torch.no_grad():
        cached = fp32_llama(**collate(rows, 0), use_cache=True).logits[0]
        alone = fp32_llama(input_ids=torch.tensor([rows[0]["input_ids"][s2:e2]])).logits[0]
    assert not torch.allclose(cached[s2:e2], alone, atol=1e-3)


def test_collate_pads_unpacked_rows_with_an_attention_mask():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]


# ---- build_datasets, length stats, inspect -----------------------------------------------------


def test_build_datasets_packed(tiny_tokenizer, tiny_data_dir):
    data_cfg = cfg(tiny_data_dir / "instruction.jsonl", max_seq_len=64, eval_fraction=0.125)
    train, evl, info = build_datasets(data_cfg, tiny_tokenizer)
    assert (info["samples"], info["train_samples"], info["eval_samples"]) == (64, 56, 8)
    assert info["format"] == "instruction" and info["template"] == "chat_template" and info["packing"]
    assert len(train) == info["train_rows"] < 56 and all(len(r["input_ids"]) <= 64 for r in train)
    assert all("position_ids" in r for r in train)
    assert len(evl) == 8 and not any("position_ids" in r for r in evl)  # eval rows are padded, not packed
    assert 0.5 < info["packing_efficiency"] <= 1.0
    assert info["length_stats"]["count"] == 64
    json.dumps(info)  # goes into the event log as it is
    # Same seed, same split; another seed, another.
    assert build_datasets(data_cfg, tiny_tokenizer)[1] == evl
    assert build_datasets(data_cfg.model_copy(update={"seed": 7}), tiny_tokenizer)[1] != evl


def test_build_datasets_unpacked_groups_by_length(tiny_tokenizer, tiny_data_dir):
    data_cfg = cfg(tiny_data_dir / "chat.jsonl", packing=False, eval_fraction=0.0)
    train, evl, info = build_datasets(data_cfg, tiny_tokenizer)
    assert len(train) == 32 and evl == [] and info["packing_efficiency"] is None
    lengths = [len(r["input_ids"]) for r in train]
    assert lengths == sorted(lengths, reverse=True)  # 32 rows fit in one 64-row window
    batch = collate(train[:4], tiny_tokenizer.pad_token_id)
    assert "attention_mask" in batch


def test_build_datasets_drops_samples_with_no_response_left(tiny_tokenizer, tmp_path):
    rows = [{"instruction": "word " * 80, "output": "x"}] + ALPACA
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    _, _, info = build_datasets(cfg(path, max_seq_len=32, eval_fraction=0.0), tiny_tokenizer)
    assert info["dropped_no_target"] == 1 and info["truncated"] == 1 and info["train_samples"] == 2
    with pytest.raises(UserError, match="none of the 1 samples has any response token within max_seq_len=32"):
        build_datasets(cfg(write_jsonl(tmp_path / "one.jsonl", rows[:1]), max_seq_len=32), tiny_tokenizer)


def test_length_stats():
    st = length_stats([10, 20, 30, 40, 50, 60, 70, 80, 90, 1000], max_seq_len=64)
    assert (st["count"], st["mean"], st["p50"], st["p95"], st["max"]) == (10, 145.0, 50, 1000, 1000)
    assert (st["truncated"], st["truncated_share"]) == (4, 0.4)
    hist = st["histogram"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1 and sum(hist["counts"]) == 10
    assert hist["edges"][0] == 0 and hist["edges"][-1] > 1000 and hist["counts"][0] == 9
    assert length_stats([], 64)["count"] == 0


def test_inspect(tiny_tokenizer, tiny_data_dir):
    report = inspect(cfg(tiny_data_dir / "sharegpt.jsonl", max_seq_len=64), tiny_tokenizer, n=2)
    json.dumps(report)
    assert report["format"]["kind"] == "chat" and report["columns"] == ["conversations"]
    assert len(report["samples"]) == 2 and report["samples_total"] == 16
    first = report["samples"][0]
    assert [s["trained"] for s in first["segments"]] == [False, True]
    assert first["segments"][0]["text"] == "<|user|>\nWhat does len do?</s>\n<|assistant|>\n"
    assert first["segments"][1]["text"] == "It returns the number of items in a container.</s>\n"
    assert first["tokens"] > first["trained_tokens"] > 0


# ---- `snugtune data inspect` -------------------------------------------------------------------


def test_cli_inspect_text(capsys, tiny_model_dir, tiny_data_dir):
    from tui.cli import main

    rc = main(["data", "inspect", "--path", str(tiny_data_dir / "instruction.jsonl"), "--model", str(tiny_model_dir),
               "--template", "builtin", "--seq", "48"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "format:   instruction - detected" in out
    assert "template: snugtune's built-in template" in out
    assert "«### Instruction:\nWhat does len do?\n\n### Response:\n»It returns the number of items in a container.</s>" in out
    assert out.count("--- sample") == 3
    assert "lengths (64 samples, tokens): mean" in out and "max_seq_len=48" in out


def test_cli_inspect_preset_with_columns_json(capsys, tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Why?", "a": "Because."}, {"q": "How?", "a": "Carefully."}])
    preset = tmp_path / "mine.toml"
    preset.write_text(f'[model]\nname_or_path = "{tiny_model_dir}"\n[data]\npath = "{path}"\nmax_seq_len = 32\n',
                      encoding="utf-8")
    from tui.cli import main

    rc = main(["data", "inspect", str(preset), "--column", "instruction=q", "--column", "output=a", "--json", "-n", "1"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["format"]["columns"] == {"instruction": "q", "output": "a"}
    assert report["max_seq_len"] == 32 and len(report["samples"]) == 1
    assert report["samples"][0]["segments"][-1] == {"text": "Because.</s>\n", "trained": True}


def test_cli_inspect_bad_input(capsys, tmp_path, tiny_model_dir):
    from tui.cli import main

    assert main(["data", "inspect", "--path", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir)]) == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Why?", "a": "Because."}])
    assert main(["data", "inspect", "--path", str(path), "--model", str(tiny_model_dir), "--column", "output=answer"]) == 2
    assert "column 'answer', which the data does not have; its columns are: q, a" in capsys.readouterr().err
    assert main(["data", "inspect", "--path", str(path), "--column", "oops"]) == 2
    assert "--column expects FIELD=COLUMN" in capsys.readouterr().err
    assert main(["data", "inspect"]) == 2
    assert "give a preset or --path FILE" in capsys.readouterr().err


def test_cli_inspect_subprocess_json(tiny_model_dir, tiny_data_dir):
    """The wizard's way: a subprocess with --json; stdout is exactly one JSON object."""
    proc = subprocess.run(
        [sys.executable, "-m", "tui.cli", "data", "inspect", "--path", str(tiny_data_dir / "chat.jsonl"),
         "--model", str(tiny_model_dir), "--json"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["format"]["kind"] == "chat" and report["template"] == "chat_template"
    assert report["length_stats"]["count"] == 32
