"""Data files as people have them: saved by Excel or Notepad, cut short by a copy, split in
shards, a column name misspelt. Each is read as meant, or refused with one message that says
what, where and how to fix (and, through the CLI, exit code 2)."""
from __future__ import annotations

import codecs
import json
import subprocess
import sys

import pytest

from core.config import DataConfig
from core.data import check_records, detect_format, load_records
from core.errors import UserError

ROWS = [{"instruction": f"Say {i}", "output": f"{i} is the answer"} for i in range(4)]


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def csv_text(sep: str) -> str:
    return f"instruction{sep}output\n" + "".join(f"{r['instruction']}{sep}{r['output']}\n" for r in ROWS)


def jsonl_text() -> str:
    return "".join(json.dumps(r) + "\n" for r in ROWS)


@pytest.mark.parametrize("sep", [";", "|", "\t"])
def test_a_csv_with_semicolons_bars_or_tabs_reads_its_columns(tmp_path, sep):
    # Excel writes ';' where the decimal separator is ','; before, this was one column
    # 'instruction;output', detected as plain text and trained as such, without a word.
    path = tmp_path / "data.csv"
    path.write_text(csv_text(sep), encoding="utf-8")
    records = load_records(cfg(path))
    assert records == ROWS
    assert detect_format(records, cfg(path)).kind == "instruction"


def test_a_csv_with_commas_inside_a_semicolon_header_is_still_commas(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('instruction,output\n"a; b","c; d"\n', encoding="utf-8")
    assert load_records(cfg(path)) == [{"instruction": "a; b", "output": "c; d"}]


def test_a_csv_with_a_bom_crlf_and_quoted_newlines(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(codecs.BOM_UTF8 + b'instruction;output\r\n"two\r\nlines";"a; b"\r\n')
    assert load_records(cfg(path)) == [{"instruction": "two\r\nlines", "output": "a; b"}]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".txt"])
def test_utf16_and_utf32_files_are_read(tmp_path, encoding, ext):
    # Excel's "Unicode text" and Notepad's "Unicode" are UTF-16 (with a BOM); before, the first
    # byte was "not UTF-8", with a hint to convert from latin1.
    path = tmp_path / f"data{ext}"
    text = {".jsonl": jsonl_text(), ".csv": csv_text(","), ".txt": "one sample\ntwo\n"}[ext]
    path.write_text(text, encoding=encoding)
    expected = ROWS if ext != ".txt" else [{"text": "one sample"}, {"text": "two"}]
    assert load_records(cfg(path)) == expected


def test_a_json_array_saved_as_jsonl_is_read(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert load_records(cfg(path)) == ROWS
    path.write_text(json.dumps(ROWS), encoding="utf-8")  # on one line
    assert load_records(cfg(path)) == ROWS
    assert load_records(cfg(path, max_samples=2)) == ROWS[:2]


def test_a_jsonl_of_lists_is_still_refused_by_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('["a", "b"]\n["c"]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.jsonl, line 1: expected a JSON object"):
        load_records(cfg(path))


def test_a_truncated_last_line_says_so_and_how_many_lines_are_whole(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(jsonl_text() + '{"instruction": "Say 9", "outp', encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_records(cfg(path))
    msg = str(err.value)
    assert "data.jsonl, line 5: the last line is cut off" in msg
    assert "at at" not in msg  # json's "Unterminated string starting at" + " at column" read double
    assert "use the 4 lines before it" in err.value.hint


def test_a_bad_line_in_the_middle_is_not_called_truncated(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n{"text": "ok"}', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 2: not valid JSON \(Expecting value at column 10\)"):
        load_records(cfg(path))


def test_a_directory_of_shards_is_one_dataset_and_errors_name_the_shard(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-0.jsonl").write_text(jsonl_text(), encoding="utf-8")
    (shards / "part-1.jsonl").write_text(jsonl_text(), encoding="utf-8")
    (shards / ".hidden.jsonl").write_text("not json\n", encoding="utf-8")
    (shards / "README.md").write_text("# about\n", encoding="utf-8")
    records = load_records(cfg(shards))
    assert records == ROWS + ROWS
    assert load_records(cfg(shards, max_samples=5)) == (ROWS + ROWS)[:5]
    (shards / "part-1.jsonl").write_text(jsonl_text() + '{"instruction": "no answer"}\n', encoding="utf-8")
    records = load_records(cfg(shards))
    fmt = detect_format(records, cfg(shards))
    with pytest.raises(UserError, match=r"part-1\.jsonl, row 5: "):
        check_records(records, fmt, source=str(shards))


def test_a_directory_of_mixed_types_is_refused_by_name(tmp_path):
    (tmp_path / "a.jsonl").write_text(jsonl_text(), encoding="utf-8")
    (tmp_path / "b.csv").write_text(csv_text(","), encoding="utf-8")
    with pytest.raises(UserError, match=r"2 types \(\.csv: b\.csv; \.jsonl: a\.jsonl\)"):
        load_records(cfg(tmp_path))


@pytest.mark.parametrize("column,means,field", [("instrucion", "instruction", "instruction"),
                                                ("Outptu", "output", "output"), ("answr", "answer", "output")])
def test_a_misspelt_column_is_named_with_the_mapping_that_fixes_it(tmp_path, column, means, field):
    # (a misspelt chat column needs no help: message lists are found by what they hold)
    path = tmp_path / "data.jsonl"
    row = {"instruction": "q", "output": "a"}
    row.pop(field)
    row[column] = "q"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        detect_format(load_records(cfg(path)), cfg(path))
    assert f"column {column!r} looks like {means!r} misspelt" in str(err.value)
    assert f"{field}='{column}'" in err.value.hint  # the train syntax: data.columns={field='column'}
    mapped = detect_format(load_records(cfg(path)), cfg(path, columns={field: column}))
    assert mapped.kind == "instruction"  # the hint's mapping is enough


def test_input_and_output_are_not_called_typos_of_each_other(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"input": "q", "label": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        detect_format(load_records(cfg(path)), cfg(path))
    assert "misspelt" not in str(err.value)


def test_a_mapping_to_a_misspelt_column_suggests_the_real_one(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"column 'questoin'.*did you mean 'question'\?"):
        detect_format(load_records(cfg(path)), cfg(path, columns={"instruction": "questoin"}))


def test_the_cli_reads_a_semicolon_csv_and_refuses_a_cut_file_with_exit_2(tmp_path):
    good = tmp_path / "semi.csv"
    good.write_text(csv_text(";"), encoding="utf-8")
    bad = tmp_path / "cut.jsonl"
    bad.write_text(jsonl_text() + '{"instruction": "x', encoding="utf-8")
    def run(p):
        return subprocess.run([sys.executable, "-m", "tui.cli", "data", "inspect", "--path", str(p), "--json"],
                              capture_output=True, text=True, timeout=600, check=False)

    ok = run(good)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["format"]["kind"] == "instruction"
    cut = run(bad)
    assert cut.returncode == 2
    assert "cut.jsonl, line 5: the last line is cut off" in cut.stderr
    assert "Traceback" not in cut.stderr


def test_a_huge_line_is_cut_without_the_tokenizers_indexing_warning(tiny_tokenizer):
    import copy
    import logging

    from core.data import Segment, _tokenize_many

    tok = copy.deepcopy(tiny_tokenizer)
    tok.model_max_length = 16
    tok.deprecation_warnings.pop("sequence-length-is-longer-than-the-specified-maximum", None)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("transformers.tokenization_utils_base")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        [(ids, _)] = _tokenize_many([[Segment("word " * 200, True)]], tok, True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(ids) > 16
    # before: "Token indices sequence length is longer than the specified maximum sequence length
    # for this model (...). Running this sequence through the model will result in indexing errors"
    assert not [m for m in seen if "indexing errors" in m], seen


def test_a_one_row_file_inspects_as_one_sample(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "tui.cli", "data", "inspect", "--path", str(path)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    assert "(1 sample; columns: instruction, output)" in out.stdout and "lengths (1 sample, tokens)" in out.stdout


def test_a_blank_answer_cell_is_a_row_to_fix_not_an_answer(tmp_path):
    # a half-filled spreadsheet: row 2's answer cell is blank; it trained "answer with nothing"
    path = tmp_path / "sheet.csv"
    path.write_text("instruction,output\nq1,a1\nq2,\nq3,  \nq4,a4\n", encoding="utf-8")
    records = load_records(cfg(path))
    with pytest.raises(UserError, match=r"sheet\.csv: 2 of 4 samples cannot be used as instruction data: "
                                        r"row 2: field 'output' \(column 'output'\) is empty; row 3: "):
        check_records(records, detect_format(records, cfg(path)), source=str(path))


def test_a_chat_whose_replies_are_all_empty_is_refused_but_a_tool_call_is_a_reply(tmp_path):
    path = tmp_path / "chat.jsonl"
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    call = {"messages": [{"role": "user", "content": "weather?"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                         {"role": "tool", "content": "sun"}, {"role": "assistant", "content": "Sunny."}]}
    path.write_text(json.dumps(call) + "\n" + json.dumps(empty) + "\n", encoding="utf-8")
    records = load_records(cfg(path))
    with pytest.raises(UserError, match=r"1 of 2 samples .* row 2: 'messages': every assistant message to learn is empty"):
        check_records(records, detect_format(records, cfg(path)), source=str(path))


def test_an_unclosed_quote_names_its_line_instead_of_swallowing_the_file(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('instruction,output\nq1,a1\n"q2,a2\nq3,a3\n', encoding="utf-8")
    # before: one row whose instruction held the rest of the file, then "row 2: field 'output' is missing"
    with pytest.raises(UserError, match=r"q\.csv, line 3: a quoted value opened on this line is never closed"):
        load_records(cfg(path))
    path.write_text('instruction,output\nq1,a1\n"q2"x,a2\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"q\.csv, line 3: not readable as CSV"):
        load_records(cfg(path))
    path.write_text('instruction,output\nsay "hi",ok\n"a ""b""",c\n', encoding="utf-8")  # quotes as CSV allows them
    assert load_records(cfg(path)) == [{"instruction": 'say "hi"', "output": "ok"},
                                       {"instruction": 'a "b"', "output": "c"}]


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".json"])
def test_gzipped_files_are_read_and_a_cut_gzip_is_said(tmp_path, ext):
    import gzip

    text = {".jsonl": jsonl_text(), ".csv": csv_text(";"), ".json": json.dumps(ROWS)}[ext]
    path = tmp_path / f"data{ext}.gz"
    path.write_bytes(gzip.compress(text.encode("utf-16")))  # and UTF-16 inside, as the rest
    assert load_records(cfg(path)) == ROWS
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / f"a{ext}.gz").write_bytes(path.read_bytes())
    (shards / f"b{ext}").write_text(text, encoding="utf-8")
    assert load_records(cfg(shards)) == ROWS + ROWS  # one type: .gz beside plain is the same type
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(UserError, match=rf"data{ext}\.gz: not a whole gzip file"):
        load_records(cfg(path))


def test_the_wizard_takes_a_gzipped_file():
    from pathlib import Path

    from tui.screens.data import data_suffix, local_problem

    assert data_suffix(Path("a.jsonl.gz")) == ".jsonl" and data_suffix(Path("a.parquet.gz")) == ".gz"
    assert "no such file" in local_problem("missing.jsonl.gz")  # a path, not a Hub id
    assert "unsupported file type" in local_problem(__file__)  # a .py file is not data


def test_a_missing_gzipped_file_is_file_not_found_not_a_hub_lookup():
    with pytest.raises(UserError, match=r"nothing\.jsonl\.gz: file not found"):
        load_records(cfg("nothing.jsonl.gz"))


def _chat_file(tmp_path, rows) -> DataConfig:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return cfg(path)


def _rendered(data_cfg, tokenizer):
    from core.data import _render_all, prepare

    fmt, records, filtered = prepare(data_cfg)
    return _render_all(records, fmt, tokenizer, data_cfg, filtered)


def test_a_sharegpt_conversation_opening_with_the_assistant_renders(tmp_path, tiny_tokenizer):
    # before: "the tokenizer's chat template cannot render this sample (ValueError: Cannot apply chat
    # template to an empty conversation...)", naming neither file nor row, for the whole data set
    data_cfg = _chat_file(tmp_path, [{"conversations": [{"from": "gpt", "value": "Welcome!"},
                                                        {"from": "human", "value": "Hi"},
                                                        {"from": "gpt", "value": "Hello."}]}])
    [segs] = _rendered(data_cfg, tiny_tokenizer)
    learned = [s.text for s in segs if s.trained]
    assert learned[0].startswith("Welcome!") and learned[-1].startswith("Hello.")
    assert not segs[0].trained and "Welcome!" not in segs[0].text  # the turn's header is the prompt


def test_the_openai_developer_role_is_the_system_prompt(tmp_path, tiny_tokenizer):
    data_cfg = _chat_file(tmp_path, [{"messages": [{"role": "developer", "content": "Be nice."},
                                                   {"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello."}]}])
    [segs] = _rendered(data_cfg, tiny_tokenizer)
    assert segs[0].text.startswith("<|system|>\nBe nice.")


def test_a_sample_the_template_cannot_render_is_named_by_file_and_row(tmp_path, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    bad = {"messages": [{"role": "system", "content": "S"}] + ok["messages"]}
    data_cfg = _chat_file(tmp_path, [ok, ok, bad])
    with pytest.raises(UserError, match=r"chat\.jsonl, row 3: the tokenizer's chat template cannot render this "
                                        r"sample \(TemplateError: System role not supported\)"):
        _rendered(data_cfg, tok)


def test_a_spreadsheet_is_refused_with_how_to_save_it_as_csv(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(UserError) as err:
        load_records(cfg(path))
    assert "unknown file type '.xlsx'" in str(err.value) and 'Save As > "CSV UTF-8"' in err.value.hint


def test_a_pandas_nan_is_a_missing_value_not_the_text_nan(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "df.parquet"
    pq.write_table(pa.table({"instruction": ["q1", "q2"], "output": [1.5, float("nan")]}), path)
    records = load_records(cfg(path))
    with pytest.raises(UserError, match=r"1 of 2 samples .* row 2: field 'output' \(column 'output'\) is missing"):
        check_records(records, detect_format(records, cfg(path)), source=str(path))
    jl = tmp_path / "df.jsonl"
    jl.write_text('{"instruction": "q", "output": NaN}\n', encoding="utf-8")  # as Python's json.dumps writes a float NaN
    records = load_records(cfg(jl))
    with pytest.raises(UserError, match=r"row 1: field 'output' \(column 'output'\) is missing"):
        check_records(records, detect_format(records, cfg(jl)), source=str(jl))


def test_files_joined_with_cat_keep_each_ones_bom_out(tmp_path):
    path = tmp_path / "all.jsonl"
    one = codecs.BOM_UTF8 + jsonl_text().encode()
    path.write_bytes(one + one)  # cat a.jsonl b.jsonl > all.jsonl, both saved "UTF-8 with BOM"
    assert load_records(cfg(path)) == ROWS + ROWS


@pytest.mark.parametrize("orient", ["columns", "split", "records", "index"])
def test_a_pandas_to_json_file_reads_as_its_rows(tmp_path, orient):
    # DataFrame.to_json()'s default is orient="columns": {"instruction": {"0": ...}, ...}; it was
    # refused as "expected a list of samples"
    frames = {
        "columns": {"instruction": {str(i): r["instruction"] for i, r in enumerate(ROWS)},
                    "output": {str(i): r["output"] for i, r in enumerate(ROWS)}},
        "index": {str(i): r for i, r in enumerate(ROWS)},
        "split": {"columns": ["instruction", "output"], "index": list(range(len(ROWS))),
                  "data": [[r["instruction"], r["output"]] for r in ROWS]},
        "records": ROWS,
    }
    path = tmp_path / "df.json"
    path.write_text(json.dumps(frames[orient]), encoding="utf-8")
    assert load_records(cfg(path)) == ROWS


def test_a_dict_that_is_no_frame_is_still_refused(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"model": {"name": "x"}, "data": {"path": "y"}}), encoding="utf-8")
    with pytest.raises(UserError, match=r"expected a list of samples or \{\"data\": \[\.\.\.\]\}"):
        load_records(cfg(path))


def test_jsonl_lines_ending_in_commas_are_said_as_such(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + ",\n" for r in ROWS), encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.jsonl, line 1: a comma after the object"):
        load_records(cfg(path))
