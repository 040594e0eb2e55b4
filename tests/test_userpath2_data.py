"""Data as people have it, round 2: what a second walk through the user's path found. Each
test failed before its fix: Excel's Windows-1252 CSV given a hint that corrupted it, a
`datasets` save_to_disk folder read as its index file, an Arrow file refused, a classification
set trained as plain text with its labels silently dropped, OpenAI's legacy `functions` column
ignored, a line holding a list of objects said as "got list"."""
from __future__ import annotations

import json

import pytest

from core.config import DataConfig
from core.data import check_records, detect_format, load_records
from core.errors import UserError

ROWS = [{"instruction": f"Say {i}", "output": f"{i} is the answer"} for i in range(3)]


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


# ---- encodings ------------------------------------------------------------------------------------

def test_an_excel_csv_in_windows_1252_gets_the_cp1252_conversion_not_latin1(tmp_path):
    # Excel's "CSV (Comma delimited)" on Windows: curly quotes and dashes are bytes 0x93/0x94/0x96,
    # which `iconv -f latin1` (the hint before) turns into invisible C1 control characters.
    path = tmp_path / "sheet.csv"
    path.write_bytes("instruction,output\r\nSay “hi”,Hi – there\r\n".encode("cp1252"))
    with pytest.raises(UserError) as err:
        load_records(cfg(path))
    msg = str(err.value)
    assert "sheet.csv, line 2: not UTF-8 text" in msg and "Windows-1252" in msg
    assert "iconv -f cp1252 -t utf-8 sheet.csv > sheet-utf8.csv" in msg and "latin1" not in msg
    assert "CSV UTF-8" in msg


def test_bytes_that_are_not_windows_1252_either_get_a_way_to_find_the_encoding(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_bytes(b"text\n\x81\x8d\n")  # undefined in cp1252
    with pytest.raises(UserError) as err:
        load_records(cfg(path))
    assert "Windows-1252" not in str(err.value) and "file -i odd.csv" in str(err.value)


# ---- datasets' own files ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("saved")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(root / "one"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(root / "dict"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(root / "noval"))
    return root


def test_a_save_to_disk_folder_reads_as_its_rows(saved):
    # before: "one/dataset_info.json: expected a list of samples ..." (the index read as data)
    assert load_records(cfg(saved / "one")) == ROWS


def test_a_saved_dataset_dict_reads_the_split_asked_for(saved):
    assert load_records(cfg(saved / "dict")) == ROWS
    assert load_records(cfg(saved / "dict", split="test")) == ROWS[:1]
    with pytest.raises(UserError, match=r"without a 'train' split \(it has 'validation'\)") as err:
        load_records(cfg(saved / "noval"))
    assert str(saved / "noval" / "validation") in str(err.value)


def test_an_arrow_file_reads_in_either_of_arrows_formats_and_a_cut_one_is_said(saved, tmp_path):
    import pyarrow as pa
    import pyarrow.feather as feather

    arrow = next((saved / "one").glob("*.arrow"))  # datasets' streaming format
    assert load_records(cfg(arrow)) == ROWS
    feather.write_feather(pa.Table.from_pylist(ROWS), str(tmp_path / "f.arrow"))  # the file format
    assert load_records(cfg(tmp_path / "f.arrow")) == ROWS
    (tmp_path / "cut.arrow").write_bytes(arrow.read_bytes()[:300])
    with pytest.raises(UserError, match=r"(?s)cut\.arrow: not a readable Arrow file .*hint: the file was probably cut"):
        load_records(cfg(tmp_path / "cut.arrow"))


# ---- shapes -----------------------------------------------------------------------------------------

def test_a_classification_set_is_not_trained_as_text_without_its_labels(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": f"review {i}", "label": "positive" if i % 2 else "negative"}) + "\n"
                            for i in range(4)), encoding="utf-8")
    with pytest.raises(UserError, match=r"'text' and 'label' look like a classification set.*'label' never seen") as err:
        detect_format(load_records(cfg(path)), cfg(path))
    assert "data.columns={instruction='text', output='label'}" in str(err.value)
    # what the hint says works: the label is the answer
    mapped = cfg(path, columns={"instruction": "text", "output": "label"})
    assert detect_format(load_records(mapped), mapped).kind == "instruction"
    # and plain text when asked for; a KTO-style boolean label is not a class label
    assert detect_format(load_records(cfg(path)), cfg(path, format="text")).kind == "text"
    path.write_text(json.dumps({"text": "t", "label": 3}) + "\n", encoding="utf-8")  # integer classes (imdb)
    with pytest.raises(UserError, match="classification set"):
        detect_format(load_records(cfg(path)), cfg(path))


def test_openai_legacy_functions_are_the_tool_definitions(tmp_path):
    path = tmp_path / "fc.jsonl"
    row = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": None,
                         "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                        {"role": "function", "name": "get_weather", "content": "21 C"},
                        {"role": "assistant", "content": "It is 21 C."}],
           "functions": [{"name": "get_weather", "parameters": {"type": "object"}}]}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    records = load_records(cfg(path))
    fmt = check_records(records, detect_format(records, cfg(path)))
    assert fmt.columns.get("tools") == "functions"  # before: the column was ignored, the tools unsaid


def test_a_jsonl_line_holding_a_list_of_objects_says_so_and_how_to_fix(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1:]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"(?s)a\.jsonl, line 2: a list of 2 objects .*hint: put each object"):
        load_records(cfg(path))


def test_duplicates_and_an_evaluation_that_cannot_happen_are_said(tmp_path, tiny_tokenizer):
    from core.data import build_datasets

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(ROWS[0]) + "\n" for _ in range(3)) + json.dumps(ROWS[1]) + "\n",
                    encoding="utf-8")
    _, _, info = build_datasets(cfg(path, max_seq_len=64), tiny_tokenizer)
    assert any(p.startswith("2 are duplicates of an earlier sample") for p in info["dropped_and_cut"]), info
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    _, eval_rows, info = build_datasets(cfg(one, max_seq_len=64, eval_fraction=0.5), tiny_tokenizer)
    assert eval_rows == [] and "no evaluation: data.eval_fraction=0.5 needs 2 or more samples, there is 1" \
        in info["dropped_and_cut"]  # before: "0 eval samples", nothing else


def test_data_inspect_shows_a_long_sample_by_its_start_and_end():
    # a 4,096-token document was printed whole, pushing the rest of the report off the terminal
    from tui.cmd_data import clip_segments

    segs = [{"text": "P" * 3000, "trained": False}, {"text": "R" * 3000, "trained": True}]
    out = clip_segments(segs, head=1200, tail=400)
    assert [s["trained"] for s in out] == [False, True, True]  # prompt start, the cut line, answer end
    assert out[0]["text"] == "P" * 1200 and out[2]["text"] == "R" * 400
    assert "[... 4,400 characters not shown ...]" in out[1]["text"]
    short = [{"text": "hi", "trained": False}]
    assert clip_segments(short) == short


def test_a_folder_of_splits_reads_the_train_split_not_the_test_answers(tmp_path):
    # before: train.jsonl, test.jsonl and validation.jsonl were read as one data set, so the
    # held-out answers were trained on
    def rows(tag, n):
        return [{"instruction": f"{tag} {i}", "output": "x"} for i in range(n)]

    folder = tmp_path / "ds"
    folder.mkdir()
    for name, n in (("train", 3), ("test", 2), ("validation", 2)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(name, n)), encoding="utf-8")
    assert load_records(cfg(folder)) == rows("train", 3)
    assert load_records(cfg(folder, split="validation")) == rows("validation", 2)
    shards = tmp_path / "shards"  # one split in shards: all of them, as before
    shards.mkdir()
    for i in range(2):
        (shards / f"train-0000{i}-of-00002.jsonl").write_text(json.dumps(ROWS[i]) + "\n", encoding="utf-8")
    assert load_records(cfg(shards)) == ROWS[:2]
    (folder / "train.jsonl").unlink()
    with pytest.raises(UserError, match=r"a folder of splits without a 'train' one \(it has test \(test\.jsonl\), "
                       r"validation \(validation\.jsonl\)\)"):
        load_records(cfg(folder))
