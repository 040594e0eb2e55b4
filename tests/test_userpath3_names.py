"""Chat messages' `name` (round 3, item 1): a multi-speaker chat's speakers, a tool result's
function. Before, every name was dropped silently (the tool role's kept but never rendered by the
built-in layout). Now a name reaches a chat template that renders names, and where the template
has no place for them (or the built-in layout is used) `data inspect`, `snugtune train` and the
wizard's data preview say once how many messages carried a name the model will not see."""
from __future__ import annotations

import copy
import json

import pytest

from core.config import DataConfig
from core.data import build_datasets, dropped_and_cut, inspect

SPEAKERS = [
    {"messages": [
        {"role": "user", "name": "alice", "content": "Who brings the cake?"},
        {"role": "user", "name": "bob", "content": "Not me."},
        {"role": "assistant", "content": "Carol said she would."},
    ]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
]
TOOL = [
    {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "name": "get_weather", "content": "21 C"},
        {"role": "assistant", "content": "It is 21 C."},
    ]},
]
NAMED = 2  # alice and bob

# A template with a place for names, as multi-party chat templates have: "<|user|>alice: text"
NAMED_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m.get('name') %}{{ m['name'] }}: {% endif %}"
    "{{ m['content'] or '' }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_file(tmp_path):
    return _write(tmp_path / "party.jsonl", SPEAKERS)


def _text(report) -> str:
    return "".join(seg["text"] for s in report["samples"] for seg in s["segments"])


def test_a_template_without_names_is_said_once_with_the_count(chat_file, tiny_tokenizer):
    report = inspect(DataConfig(path=str(chat_file)), tiny_tokenizer)
    assert report["template"] == "chat_template"
    assert report["counts"]["names_unseen"] == NAMED
    said = [line for line in report["dropped_and_cut"] if "name" in line]
    assert len(said) == 1 and said[0].startswith(f"{NAMED} messages carry a name") and "will not see" in said[0]
    assert "alice" not in _text(report)


def test_the_built_in_layout_says_it_too_tool_results_included(tmp_path, tiny_tokenizer_no_template):
    path = _write(tmp_path / "mixed.jsonl", SPEAKERS + TOOL)
    report = inspect(DataConfig(path=str(path)), tiny_tokenizer_no_template)
    assert report["template"] == "builtin"
    assert report["counts"]["names_unseen"] == NAMED + 1  # the tool result's get_weather
    assert any("built-in template has no place for names" in line for line in report["dropped_and_cut"])


def test_a_template_that_renders_names_gets_them_and_nothing_is_said(chat_file, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = NAMED_TEMPLATE
    report = inspect(DataConfig(path=str(chat_file)), tok)
    text = _text(report)
    assert "alice: Who brings the cake?" in text and "bob: Not me." in text
    assert not report["counts"].get("names_unseen")
    assert not any("name" in line for line in report["dropped_and_cut"])
    # the speaker's name is prompt (read), the reply after it learned as before
    first = report["samples"][0]["segments"]
    assert any(seg["trained"] and "Carol said she would." in seg["text"] for seg in first)
    assert all(not seg["trained"] for seg in first if "alice" in seg["text"])


def test_train_counts_them_as_data_inspect_does(chat_file, tiny_tokenizer):
    _, _, info = build_datasets(DataConfig(path=str(chat_file), eval_fraction=0.0), tiny_tokenizer)
    assert info["counts"]["names_unseen"] == NAMED
    assert any("carry a name" in line for line in info["dropped_and_cut"])


def test_the_cli_report_prints_it(chat_file, tiny_tokenizer):
    from tui.cmd_data import format_report

    out = format_report(inspect(DataConfig(path=str(chat_file)), tiny_tokenizer))
    assert f"{NAMED} messages carry a name (speaker or tool) that the model will not see" in out


def test_one_name_reads_in_the_singular():
    assert dropped_and_cut({"names_unseen": 1, "template": "builtin"})[0].startswith("1 message carries a name")
