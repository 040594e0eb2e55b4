"""Real-world dataset shapes (issue 12): the files users of LLaMA-Factory, axolotl and OpenAI's
fine-tuning already have. Each shape is a small file written here from the format's documentation;
each inspects and trains on the demo model, or is refused with its one message (exit 2).

Rendering is checked against a real chat template string with tool support, written below in the
style of Qwen2.5's (tools in the system turn, <tool_call> JSON in the assistant turn, tool results
as <tool_response> in a user turn), and against the built-in rendering where a template has none.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from conftest import make_tiny_config
from core.config import DataConfig
from core.data import (
    IGNORE_INDEX,
    build_datasets,
    check_records,
    detect_format,
    inspect,
    load_records,
    render,
    template_name,
    template_supports_tools,
)
from core.errors import UserError

DEMO = "builtin:tiny-llama"

# Qwen2.5-style, with tools. transformers renders templates with trim_blocks, so every newline is
# an explicit '\n' inside an expression.
TOOL_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools><|im_end|>\\n' }}"
    "{% elif messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}{{ fn['arguments'] | tojson }}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WEATHER_TOOL = {"name": "get_weather", "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CITIES = [("Paris", "21 C, sunny"), ("Oslo", "4 C, rain"), ("Rome", "25 C, clear"), ("Lima", "18 C, cloudy")]

# ---- the shapes, one small file each -----------------------------------------------------------


def _glaive(city, result):  # LLaMA-Factory's glaive_toolcall demo: sharegpt + a `tools` JSON string
    return {"conversations": [
        {"from": "human", "value": f"What is the weather in {city}?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
        {"from": "observation", "value": result},
        {"from": "gpt", "value": f"It is {result} in {city}."},
    ], "system": "You are a weather assistant.", "tools": json.dumps([WEATHER_TOOL])}


def _openai_tools(city, result):  # OpenAI's fine-tuning format for function calling
    return {"messages": [
        {"role": "system", "content": "You are a weather assistant."},
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
        {"role": "assistant", "content": f"It is {result} in {city}."},
    ], "tools": [{"type": "function", "function": WEATHER_TOOL}]}


def _weights(city, result):  # OpenAI's per-message weight, axolotl's train flag, LLaMA-Factory's loss_weight
    return {"messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": "Let me guess: cold.", "weight": 0},
        {"role": "user", "content": "Really?"},
        {"role": "assistant", "content": "Sorry, a guess is no help.", "train": False},
        {"role": "user", "content": "So?"},
        {"role": "assistant", "content": "I cannot look it up.", "loss_weight": 0.0},
        {"role": "user", "content": "Fine."},
        {"role": "assistant", "content": f"It is {result} in {city}.", "weight": 1},
    ]}


ACCEPTED = {
    "glaive_toolcall.json": ("json", [_glaive(c, r) for c, r in CITIES]),
    "openai_tools.jsonl": ("jsonl", [_openai_tools(c, r) for c, r in CITIES]),
    "content_parts.jsonl": ("jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": f"Capital of {c}"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "value": f"The capital is {c}."}]}]} for c, _ in CITIES]),
    "weights.jsonl": ("jsonl", [_weights(c, r) for c, r in CITIES]),
    "sharegpt_system.jsonl": ("jsonl", [{"conversations": [{"from": "human", "value": f"Hi from {c}"},
                                                           {"from": "gpt", "value": "Hello!"}],
                                         "system": "Answer like a pirate."} for c, _ in CITIES]),
    "alpaca_history.json": ("json", [{"instruction": f"And in {c}?", "input": "", "output": f"{r}.",
                                      "system": "You report weather.",
                                      "history": [["Weather in Bergen?", "Rain."], ["And tomorrow?", "More rain."]]}
                                     for c, r in CITIES]),
    "upper_case.csv": ("csv", [{"INSTRUCTION": f"Describe {c}.", "RESPONSE": f"{c} is a city."} for c, _ in CITIES]),
    "camel.jsonl": ("jsonl", [{"role_1": "Physicist", "topic": "weather", "message_1": f"Why does it rain in {c}?",
                               "message_2": "Clouds cool and water falls."} for c, _ in CITIES]),
    "summaries.jsonl": ("jsonl", [{"article": f"{c} had weather today: {r}. " * 3, "summary": f"{c}: {r}."}
                                  for c, r in CITIES]),
    "segments.jsonl": ("jsonl", [{"segments": [{"label": False, "text": f"<s>Q: weather in {c}?\n"},
                                               {"label": True, "text": f"A: {r}</s>"}]} for c, r in CITIES]),
    "kto_mapped.jsonl": ("jsonl", [{"prompt": f"Weather in {c}?", "completion": r, "label": i % 2 == 0}
                                   for i, (c, r) in enumerate(CITIES)]),
    "wiki_lines.txt": ("txt", "".join(f"{c} is a city where the weather today is {r}.\n" for c, r in CITIES * 2)),
}
# The KTO file is accepted once its columns are mapped (SFT on the answers labelled true).
MAPPED = {"kto_mapped.jsonl": {"instruction": "prompt", "output": "completion"}}

REFUSED = {
    "dpo_messages.jsonl": ("jsonl", [{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                                      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}],
                           r"preference \(DPO\) data: columns 'chosen' and 'rejected'.*each a whole conversation",
                           "--column messages=chosen"),
    "dpo_sharegpt.json": ("json", [{"conversations": [{"from": "human", "value": "Hi"}],
                                    "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "No."}}],
                          r"preference \(DPO\) data.*the last reply of a shared conversation",
                          "--column messages=conversations --column reply=chosen"),
    "dpo_prompt.jsonl": ("jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}],
                         r"preference \(DPO\) data.*an answer to a prompt", "--column instruction=prompt --column output=chosen"),
    "kto.jsonl": ("jsonl", [{"prompt": "Hi", "completion": "Hello!", "label": True},
                            {"prompt": "Hi", "completion": "Go away.", "label": False}],
                  r"KTO data: column 'label' marks each answer", "--column instruction=prompt --column output=completion"),
    "images.json": ("json", [{"messages": [{"role": "user", "content": "<image>What is this?"},
                                           {"role": "assistant", "content": "A cat."}], "images": ["cat.jpg"]}],
                    r"multimodal data: snugtune trains text-only models \(column 'images' holds image data\)", None),
    "placeholder.jsonl": ("jsonl", [{"instruction": "<image>Describe it.", "output": "A cat."}],
                          r"multimodal data: snugtune trains text-only models \(an <image> placeholder", None),
    "image_part.jsonl": ("jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                     {"type": "image_url", "image_url": {"url": "https://x/cat.jpg"}}]},
        {"role": "assistant", "content": "A cat."}]}],
                         r"multimodal data: snugtune trains text-only models \(an 'image_url' content part", None),
}


def _write(path: Path, kind: str, content) -> Path:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    elif kind == "csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(content[0]))
            w.writeheader()
            w.writerows(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shapes")
    for name, (kind, content) in ACCEPTED.items():
        _write(d / name, kind, content)
    for name, (kind, content, _, _) in REFUSED.items():
        _write(d / name, kind, content)
    return d


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


@pytest.fixture(scope="module")
def tool_tokenizer():
    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=False)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def _texts(segments):
    return [(s.text, s.trained) for s in segments]


def _learned(segments):
    return "".join(s.text for s in segments if s.trained)


def _read(segments):
    return "".join(s.text for s in segments if not s.trained)


def _one(shapes, name, **kw):
    records = load_records(cfg(shapes / name, **kw))
    fmt = check_records(records, detect_format(records, cfg(shapes / name, **kw)))
    return records, fmt


# ---- tool calling ------------------------------------------------------------------------------


def test_openai_tool_calls_through_a_template_with_tools(shapes, tool_tokenizer):
    assert template_supports_tools(tool_tokenizer)
    records, fmt = _one(shapes, "openai_tools.jsonl")
    assert fmt.kind == "chat" and fmt.tools and fmt.columns == {"messages": "messages", "tools": "tools"}
    segs = render(records[0], fmt, tool_tokenizer, cfg("x"))
    assert template_name(fmt, tool_tokenizer, cfg("x")) == "chat_template"
    assert _texts(segs)[1:] == [
        # the call is learned, with its arguments as JSON (not a JSON string quoted again)
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n', True),
        # the tool's result is read, not learned
        ("<|im_start|>user\n<tool_response>\n21 C, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("It is 21 C, sunny in Paris.<|im_end|>\n", True),
        ("</s>", True),  # the template ends turns with <|im_end|>; generation stops at EOS: both taught
    ]
    prompt = segs[0]
    assert not prompt.trained and "You are a weather assistant." in prompt.text
    assert '"name": "get_weather", "description": "Current weather in a city"' in prompt.text  # tools, read
    # Exactly what transformers renders for the same conversation.
    conv = records[0]["messages"]
    assert "".join(s.text for s in segs[:-1]) == tool_tokenizer.apply_chat_template(
        [{**m, "content": m["content"] or ""} if m["role"] != "assistant" or not m.get("tool_calls") else
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
             "name": "get_weather", "arguments": {"city": "Paris"}}}]} for m in conv],
        tools=records[0]["tools"], tokenize=False)


def test_sharegpt_function_call_and_observation_render_like_openai(shapes, tool_tokenizer, tiny_tokenizer):
    glaive, gfmt = _one(shapes, "glaive_toolcall.json")
    openai, ofmt = _one(shapes, "openai_tools.jsonl")
    assert gfmt.columns == {"messages": "conversations", "system": "system", "tools": "tools"} and gfmt.tools
    for tok in (tool_tokenizer, tiny_tokenizer):
        assert render(glaive[1], gfmt, tok, cfg("x")) == render(openai[1], ofmt, tok, cfg("x"))


def test_builtin_rendering_where_the_template_has_no_tools(shapes, tiny_tokenizer):
    assert not template_supports_tools(tiny_tokenizer)  # renders role/content only: tools would vanish
    records, fmt = _one(shapes, "openai_tools.jsonl")
    assert template_name(fmt, tiny_tokenizer, cfg("x")) == "builtin"
    assert _texts(render(records[2], fmt, tiny_tokenizer, cfg("x"))) == [
        ("### System:\nYou are a weather assistant.\n\n### Tools:\n" + json.dumps(WEATHER_TOOL)
         + "\n\n### User:\nWhat is the weather in Rome?\n\n### Assistant:\n", False),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call></s>', True),
        ("\n\n### Tool result:\n25 C, clear\n\n### Assistant:\n", False),
        ("It is 25 C, clear in Rome.</s>", True),
    ]


def test_tools_column_can_be_mapped(tool_tokenizer):
    rows = [{"dialogue": _openai_tools("Oslo", "4 C")["messages"], "functions": json.dumps([WEATHER_TOOL])}]
    fmt = check_records(rows, detect_format(rows, cfg("x", columns={"messages": "dialogue", "tools": "functions"})))
    assert fmt.columns == {"messages": "dialogue", "tools": "functions"} and fmt.tools
    assert "get_weather" in render(rows[0], fmt, tool_tokenizer, cfg("x"))[0].text


# ---- content parts, weights, system, history ---------------------------------------------------


def test_content_parts_are_joined(shapes, tiny_tokenizer):
    records, fmt = _one(shapes, "content_parts.jsonl")
    assert _texts(render(records[0], fmt, tiny_tokenizer, cfg("x"))) == [
        ("<|user|>\nCapital of Paris?</s>\n<|assistant|>\n", False), ("The capital is Paris.</s>\n", True)]


def test_per_turn_weights_are_honoured_in_the_mask(shapes, tiny_tokenizer, tool_tokenizer):
    records, fmt = _one(shapes, "weights.jsonl")
    for tok in (tiny_tokenizer, tool_tokenizer):
        segs = render(records[0], fmt, tok, cfg("x"))
        learned, read = _learned(segs), _read(segs)
        assert "It is 21 C, sunny in Paris." in learned
        for unlearned in ("Let me guess: cold.", "Sorry, a guess is no help.", "I cannot look it up."):
            assert unlearned in read and unlearned not in learned
    report = inspect(cfg(shapes / "weights.jsonl"), tiny_tokenizer, n=1)
    assert report["samples"][0]["context"] == {"earlier_turns": 3, "not_learned": 3}


def test_sharegpt_system_column_is_rendered(shapes, tiny_tokenizer):
    records, fmt = _one(shapes, "sharegpt_system.jsonl")
    assert fmt.columns == {"messages": "conversations", "system": "system"}
    assert render(records[0], fmt, tiny_tokenizer, cfg("x"))[0] == \
        ("<|system|>\nAnswer like a pirate.</s>\n<|user|>\nHi from Paris</s>\n<|assistant|>\n", False)


def test_alpaca_system_and_history_are_rendered(shapes, tiny_tokenizer, tiny_tokenizer_no_template):
    records, fmt = _one(shapes, "alpaca_history.json")
    assert fmt.columns == {"instruction": "instruction", "input": "input", "output": "output",
                           "system": "system", "history": "history"}
    assert _texts(render(records[0], fmt, tiny_tokenizer_no_template, cfg("x"))) == [
        ("You report weather.\n\n### Instruction:\nWeather in Bergen?\n\n### Response:\n", False),
        ("Rain.</s>", True),
        ("\n\n### Instruction:\nAnd tomorrow?\n\n### Response:\n", False),
        ("More rain.</s>", True),
        ("\n\n### Instruction:\nAnd in Paris?\n\n### Response:\n", False),
        ("21 C, sunny.</s>", True),
    ]
    segs = render(records[0], fmt, tiny_tokenizer, cfg("x"))
    assert segs[0].text.startswith("<|system|>\nYou report weather.</s>\n<|user|>\nWeather in Bergen?")
    assert _learned(segs) == "Rain.</s>\nMore rain.</s>\n21 C, sunny.</s>\n"


def test_empty_instruction_leaves_no_blank_lines(tiny_tokenizer, tiny_tokenizer_no_template):
    rows = [{"instruction": "", "input": "Translate: chat", "output": "cat"}]
    fmt = detect_format(rows, cfg("x"))
    assert render(rows[0], fmt, tiny_tokenizer, cfg("x"))[0].text == "<|user|>\nTranslate: chat</s>\n<|assistant|>\n"
    assert render(rows[0], fmt, tiny_tokenizer_no_template, cfg("x"))[0].text == \
        "### Instruction:\nTranslate: chat\n\n### Response:\n"


def test_a_number_as_output_is_read_as_its_text_and_a_boolean_refused(tiny_tokenizer):
    rows = [{"question": "2+3?", "answer": 5}, {"question": "Half of 7?", "answer": 3.5}]
    fmt = check_records(rows, detect_format(rows, cfg("x")))
    assert _learned(render(rows[1], fmt, tiny_tokenizer, cfg("x"))) == "3.5</s>\n"
    with pytest.raises(UserError, match=r"q\.jsonl: 1 of 1 samples .* row 1: field 'output' \(column 'answer'\) is not text: true"):
        check_records([{"question": "Yes?", "answer": True}], fmt, source="q.jsonl")


# ---- preference, KTO, multimodal: refused by name ----------------------------------------------


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_shapes_say_what_they_are_and_what_works(name, shapes, capsys):
    from tui.cli import main

    _, _, message, inspect_hint = REFUSED[name]
    rc = main(["data", "inspect", "--path", str(shapes / name), "--model", DEMO])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("snugtune: error:") == 1
    assert re.search(message, err), err
    if inspect_hint:
        assert inspect_hint in err  # data inspect's syntax, not train's
        # ... and the mapping it suggests works: SFT on the chosen side
        columns = [a for pair in inspect_hint.split("--column ")[1:] for a in ("--column", pair.strip())]
        assert main(["data", "inspect", "--path", str(shapes / name), "--model", DEMO, "--json", *columns]) == 0
        assert json.loads(capsys.readouterr().out)["samples"][0]["trained_tokens"] > 0


def test_kto_rows_labelled_false_are_never_learned(shapes, tiny_tokenizer):
    data_cfg = cfg(shapes / "kto_mapped.jsonl", columns=MAPPED["kto_mapped.jsonl"], eval_fraction=0.0, packing=False)
    train, _, info = build_datasets(data_cfg, tiny_tokenizer)
    learned = [tiny_tokenizer.decode([t for t in r["labels"] if t != IGNORE_INDEX]) for r in train]
    assert sorted(learned) == ["21 C, sunny</s>\n", "25 C, clear</s>\n"]  # Paris, Rome: label true
    assert info["counts"]["filtered"] == 2 and info["samples"] == 4 and info["train_samples"] == 2
    assert "2 left out (KTO label false: never learned)" in info["dropped_and_cut"]


def test_hints_use_the_syntax_of_each_command(shapes):
    from core.data import hint_syntax

    records = load_records(cfg(shapes / "dpo_prompt.jsonl"))
    with pytest.raises(UserError) as exc:
        detect_format(records, cfg("x"))
    assert """--set "data.columns={instruction='prompt', output='chosen'}\"""" in str(exc.value)  # train
    with hint_syntax("wizard"), pytest.raises(UserError, match="type instruction=prompt, output=chosen in the Columns box"):
        detect_format(records, cfg("x"))


# ---- column detection --------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind, columns", [
    ("upper_case.csv", "instruction", {"instruction": "INSTRUCTION", "output": "RESPONSE"}),
    ("camel.jsonl", "instruction", {"instruction": "message_1", "output": "message_2"}),
    ("summaries.jsonl", "instruction", {"instruction": "article", "output": "summary"}),
    ("segments.jsonl", "segments", {"segments": "segments"}),
])
def test_more_column_names_are_detected(shapes, name, kind, columns):
    _, fmt = _one(shapes, name)
    assert (fmt.kind, fmt.columns) == (kind, columns)


def test_axolotl_segments_learn_only_labelled_text(shapes, tiny_tokenizer):
    records, fmt = _one(shapes, "segments.jsonl")
    assert _texts(render(records[0], fmt, tiny_tokenizer, cfg("x"))) == [
        ("<s>Q: weather in Paris?\n", False), ("A: 21 C, sunny</s>", True)]


# ---- plain text: lines, paragraphs, long samples -----------------------------------------------


def test_txt_one_sample_a_line_without_blank_lines_else_a_paragraph(tmp_path):
    lines = tmp_path / "wiki.txt"
    lines.write_text("First document.\nSecond document.\n\nThird.\n", encoding="utf-8")
    assert [r["text"] for r in load_records(cfg(lines))] == ["First document.\nSecond document.", "Third."]
    lines.write_text("First document.\nSecond document.\nThird.\n", encoding="utf-8")
    assert [r["text"] for r in load_records(cfg(lines))] == ["First document.", "Second document.", "Third."]
    assert [r["text"] for r in load_records(cfg(lines, text_split="document"))] == ["First document.\nSecond document.\nThird."]
    lines.write_text("a\nb\n\nc\n", encoding="utf-8")
    assert [r["text"] for r in load_records(cfg(lines, text_split="line"))] == ["a", "b", "c"]
    assert [r["text"] for r in load_records(cfg(lines, text_split="paragraph"))] == ["a\nb", "c"]


def test_long_text_is_split_into_windows_and_counted(tmp_path, tiny_tokenizer):
    path = tmp_path / "long.jsonl"
    long = " ".join(f"What does {w} do?" for w in ["len", "zip", "sum", "max"] * 12)
    path.write_text(json.dumps({"text": long}) + "\n" + json.dumps({"text": "Short one."}) + "\n", encoding="utf-8")
    full = len(tiny_tokenizer(long + "</s>", add_special_tokens=False)["input_ids"])
    assert full > 3 * 32
    train, _, info = build_datasets(cfg(path, max_seq_len=32, eval_fraction=0.0, packing=False), tiny_tokenizer)
    windows = -(-full // 32) - (full % 32 == 1)
    assert info["counts"]["split"] == 1 and info["counts"]["windows"] == windows and info["truncated"] == 0
    assert info["train_samples"] == windows + 1
    assert sum(len(r["input_ids"]) for r in train) >= full - 1  # nothing thrown away
    assert f"1 longer than max_seq_len=32 split into {windows} windows" in info["dropped_and_cut"]
    _, _, cut = build_datasets(cfg(path, max_seq_len=32, eval_fraction=0.0, long_samples="truncate"), tiny_tokenizer)
    assert cut["train_samples"] == 2 and cut["truncated"] == 1
    assert "1 cut at max_seq_len=32 (the rest is not trained on)" in cut["dropped_and_cut"]
    report = inspect(cfg(path, max_seq_len=32), tiny_tokenizer, n=1)
    assert report["samples"][0]["windows"] == windows and not report["samples"][0]["truncated"]


# ---- small things: where errors point ----------------------------------------------------------


def test_row_errors_name_the_file(tmp_path):
    from core.data import prepare

    path = tmp_path / "half.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n",
                    encoding="utf-8")
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}: 1 of 2 samples cannot be used as instruction data: row 2"):
        prepare(cfg(path))


def test_not_utf8_names_the_line_and_byte_anywhere_in_the_file(tmp_path):
    path = tmp_path / "late.jsonl"
    good = (json.dumps({"text": "x" * 100}) + "\n").encode()
    body = good * 200  # ~21 KB: past the decoder's first chunks
    path.write_bytes(body + b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"late\.jsonl, line 201: not UTF-8 text \(byte {len(body) + 13} of the file, column 14"):
        load_records(cfg(path))


def test_a_csv_field_over_131072_characters_reads(tmp_path):
    path = tmp_path / "big.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text"])
        w.writerow(["word " * 40_000])  # 200,000 characters
    assert len(load_records(cfg(path))[0]["text"]) == 200_000


# ---- every shape: inspect, and train a couple of steps on the demo model -------------------------


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_each_shape_inspects_on_the_demo(name, shapes, capsys):
    from tui.cli import main

    args = ["data", "inspect", "--path", str(shapes / name), "--model", DEMO, "-n", "1"]
    for f, c in MAPPED.get(name, {}).items():
        args += ["--column", f"{f}={c}"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "--- sample 1:" in out and "dropped or cut" in out
    if name in ("glaive_toolcall.json", "openai_tools.jsonl"):
        # the preview shows the system prompt and the tool call (the demo's template has no tools)
        assert "[system prompt; tools get_weather; 1 tool call (learned); 1 tool result (read, not learned)]" in out
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in out
        assert "snugtune's built-in template (the tokenizer's chat template cannot render tools" in out
    if name == "alpaca_history.json":
        assert "[system prompt; 2 earlier turns]" in out and "Weather in Bergen?" in out
    if name == "kto_mapped.jsonl":
        assert "2 left out (KTO label false: never learned)" in out


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_each_shape_gives_rows_to_learn_from_with_the_demo_tokenizer(name, shapes):
    from core.demo import demo_tokenizer

    data_cfg = cfg(shapes / name, columns=MAPPED.get(name, {}), max_seq_len=512, eval_fraction=0.0)
    train, _, info = build_datasets(data_cfg, demo_tokenizer())
    assert train and all(any(t != IGNORE_INDEX for t in r["labels"][1:]) for r in train)
    assert info["counts"]["no_target"] == 0 and info["counts"]["truncated"] == 0


# Two-step runs cost ~8 s each on 2 shared cores (model load, 4-bit quantisation, two steps, the
# adapter's save), so the engine runs once per distinct path through the data code: tools in
# sharegpt with a system column (built-in rendering), per-turn weights, axolotl segments, a .txt of
# one document a line. All twelve shapes train this way in bench/data_shapes_train.py
# (results in bench/results/); the test above shows every shape gives the engine rows to learn from.
TRAINED_SHAPES = ["glaive_toolcall.json", "weights.jsonl", "segments.jsonl", "wiki_lines.txt"]


@pytest.mark.slow
def test_shapes_train_two_steps_on_the_demo_and_a_refusal_fails_the_run(shapes, tmp_path):
    """One test for the shapes: each a two-step run of the demo model (in-process engine)."""
    from core import runs
    from core.events import read_events
    from core.train import Engine

    for name in TRAINED_SHAPES:
        sets = [f"data.path='{shapes / name}'", "train.max_steps=2", "data.eval_fraction=0.0", "train.micro_batch=2",
                "data.max_seq_len=512"]
        if name in MAPPED:
            inner = ", ".join(f"{f}='{c}'" for f, c in MAPPED[name].items())
            sets.append(f"data.columns={{{inner}}}")
        run_dir = runs.create_run_dir(make_tiny_config(DEMO, shapes / name, tmp_path / "runs", *sets))
        assert Engine(run_dir).run() == 0, (name, read_events(run_dir)[-1])
        events = read_events(run_dir)
        assert events[-1]["event"] == "run_finished" and events[-1]["steps"] == 2, name
    # A refused shape fails the run before the model loads: a user error naming --set for train.
    run_dir = runs.create_run_dir(make_tiny_config(DEMO, shapes / "dpo_prompt.jsonl", tmp_path / "runs"))
    assert Engine(run_dir).run() == 2
    last = read_events(run_dir)[-1]
    assert last["kind"] == "user" and "preference (DPO) data" in last["error"]
    assert """--set "data.columns={instruction='prompt', output='chosen'}\"""" in last["error"]


def test_train_console_prints_what_was_dropped_or_cut():
    import io

    from tui.cmd_runs import Printer

    stream = io.StringIO()
    printer = Printer(stream)
    printer.event({"event": "data_prepared", "train_samples": 2, "eval_samples": 0, "format": "instruction",
                   "info": {"dropped_and_cut": ["2 left out (KTO label false: never learned)"]}})
    assert "data dropped or cut: 2 left out (KTO label false: never learned)" in stream.getvalue()


def test_a_true_false_label_beside_text_alone_is_not_kto():
    rows = [{"text": "Nice film.", "label": True}, {"text": "Dull.", "label": False}]
    fmt = detect_format(rows, cfg("x"))
    assert (fmt.kind, fmt.label_column) == ("text", None)  # nothing left out


def test_forcing_a_format_does_not_slip_preference_data_through(shapes):
    with pytest.raises(UserError, match=r"preference \(DPO\) data"):
        detect_format(load_records(cfg(shapes / "dpo_messages.jsonl")), cfg("x", format="chat"))


def test_legacy_function_call_and_structured_tool_results(tiny_tokenizer):
    rows = [{"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"role": "function", "name": "get_weather", "content": {"temp": 4, "sky": "rain"}},
        {"role": "assistant", "content": "4 C and rain."}]}]
    fmt = check_records(rows, detect_format(rows, cfg("x")))
    segs = render(rows[0], fmt, tiny_tokenizer, cfg("x"))
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in _learned(segs)
    assert '### Tool result:\n{"temp": 4, "sky": "rain"}' in _read(segs)


def test_other_hints_use_the_command_syntax_too(tmp_path, tiny_tokenizer):
    from core.data import hint_syntax

    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": "word " * 80, "output": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"--set data.max_seq_len=64"):
        build_datasets(cfg(path, max_seq_len=32), tiny_tokenizer)
    with hint_syntax("inspect"), pytest.raises(UserError, match=r"raise max_seq_len \(--seq 64\)"):
        build_datasets(cfg(path, max_seq_len=32), tiny_tokenizer)


def test_the_wizard_preview_shows_context_and_counts():
    from tui.screens.data import render_samples

    text = render_samples([{"context": {"system": "Be brief.", "earlier_turns": 2, "tool_calls": 1},
                            "segments": [{"text": "Hi", "trained": False}, {"text": "Hello", "trained": True}]}])
    assert "[system prompt; 2 earlier turns; 1 tool call (learned)]" in text.plain


def test_the_wizard_lengths_panel_shows_what_is_dropped_or_cut(shapes, tiny_tokenizer):
    from types import SimpleNamespace

    from tui.screens.data import DataScreen

    report = inspect(cfg(shapes / "kto_mapped.jsonl", columns=MAPPED["kto_mapped.jsonl"]), tiny_tokenizer)
    screen = SimpleNamespace(app=SimpleNamespace(get_value=lambda key, default=None: default))
    assert "2 left out (KTO label false: never learned)" in DataScreen.lengths_text(screen, report).plain


def test_trl_conversational_preference_maps_to_prompt_plus_chosen(tiny_tokenizer):
    from core.data import hint_syntax

    rows = [{"prompt": [{"role": "user", "content": "Sky colour?"}],
             "chosen": [{"role": "assistant", "content": "Blue."}],
             "rejected": [{"role": "assistant", "content": "Green."}]}]
    with hint_syntax("inspect"), pytest.raises(UserError, match="--column messages=prompt --column reply=chosen"):
        detect_format(rows, cfg("x"))
    fmt = check_records(rows, detect_format(rows, cfg("x", columns={"messages": "prompt", "reply": "chosen"})))
    assert _texts(render(rows[0], fmt, tiny_tokenizer, cfg("x"))) == [
        ("<|user|>\nSky colour?</s>\n<|assistant|>\n", False), ("Blue.</s>\n", True)]


def test_a_csv_of_json_message_lists_is_chat(tmp_path, tiny_tokenizer):
    path = tmp_path / "chat.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "messages"])
        w.writerow(["1", json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])])
    records = load_records(cfg(path))
    fmt = check_records(records, detect_format(records, cfg(path)))
    assert fmt.kind == "chat" and _learned(render(records[0], fmt, tiny_tokenizer, cfg(path))) == "Hello.</s>\n"


def test_system_and_history_columns_can_be_mapped(tiny_tokenizer_no_template):
    rows = [{"q": "And now?", "a": "Sun.", "persona": "You report weather.", "before": [["Rain?", "Yes."]]}]
    mapping = {"instruction": "q", "output": "a", "system": "persona", "history": "before"}
    fmt = check_records(rows, detect_format(rows, cfg("x", columns=mapping)))
    text = "".join(s.text for s in render(rows[0], fmt, tiny_tokenizer_no_template, cfg("x")))
    assert text == ("You report weather.\n\n### Instruction:\nRain?\n\n### Response:\nYes.</s>\n\n"
                    "### Instruction:\nAnd now?\n\n### Response:\nSun.</s>")


def test_the_train_hint_is_a_working_set_option(shapes):
    import shlex

    from core.config import RunConfig

    records = load_records(cfg(shapes / "dpo_sharegpt.json"))
    with pytest.raises(UserError) as exc:
        detect_format(records, cfg("x"))
    hint = str(exc.value).split("map them: ", 1)[1].split(" (in a preset")[0]
    args = shlex.split(hint)
    assert args[0] == "--set"
    run_cfg = RunConfig.from_dict({"model": {"name_or_path": DEMO}, "data": {"path": str(shapes / "dpo_sharegpt.json")}})
    data_cfg = run_cfg.with_overrides([args[1]]).data
    assert data_cfg.columns == {"messages": "conversations", "reply": "chosen"}
    fmt = check_records(records, detect_format(records, data_cfg))
    assert fmt.kind == "chat" and fmt.columns["reply"] == "chosen"


def test_the_windows_of_one_text_are_all_trained_or_all_held_out(tmp_path, tiny_tokenizer):
    path = tmp_path / "docs.jsonl"
    docs = [" ".join([f"What does {w} do?"] * 20) for w in ["len", "zip", "sum", "max", "open", "print"]]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    train, evl, info = build_datasets(cfg(path, max_seq_len=32, eval_fraction=0.3, packing=False), tiny_tokenizer)
    assert info["counts"]["split"] == 6 and evl and train
    words = lambda rows: {w for r in rows for w in ("len", "zip", "sum", "max", "open", "print")  # noqa: E731
                          if f" {w} " in tiny_tokenizer.decode(r["input_ids"])}
    assert not words(train) & words(evl)


async def test_the_wizard_data_step_names_its_own_syntax_and_shows_tool_calls(shapes, tmp_path, monkeypatch):
    """The wizard's data step on a DPO file (the hint is for its Columns box) and on a tool-calling
    file (the preview names the system prompt, tools and tool calls)."""
    from textual.widgets import Input, Static

    from test_tui_helpers import demo_app, status_text, wait_for

    for var, sub in (("SNUGTUNE_RUNS_DIR", "runs"), ("SNUGTUNE_CONFIG_DIR", "config")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = demo_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+b")

        async def show(path):
            box = app.screen.query_one("#path", Input)
            box.focus()
            box.value = str(path)
            await pilot.press("enter")

        await show(shapes / "dpo_prompt.jsonl")
        await wait_for(pilot, lambda: "preference (DPO) data" in str(app.screen.query_one("#samples", Static).render()),
                       timeout=180, what="the preference refusal")  # a subprocess loading transformers
        assert "type instruction=prompt, output=chosen in the Columns box" in str(
            app.screen.query_one("#samples", Static).render())
        assert "--column" not in str(app.screen.query_one("#samples", Static).render())
        await show(shapes / "glaive_toolcall.json")
        await wait_for(pilot, lambda: "tool call" in str(app.screen.query_one("#samples", Static).render()),
                       timeout=180, what="the tool-calling preview")
        preview = str(app.screen.query_one("#samples", Static).render())
        assert "[system prompt; tools get_weather; 1 tool call (learned)" in preview
        assert '"arguments": {"city": "Paris"}' in preview and "chat" in status_text(app)


def test_a_mapping_matches_column_names_whatever_their_case():
    rows = [{"Question": "Why?", "Reply": "Because."}]
    assert detect_format(rows, cfg("x", columns={"instruction": "question", "output": "reply"})).columns == \
        {"instruction": "Question", "output": "Reply"}
