"""Data as people have it, round 3: what a third walk through real-world files found. Each test
failed before its fix."""
from __future__ import annotations

import json

import pytest

from core.config import DataConfig
from core.data import load_records
from core.errors import UserError


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- a Hub dataset repository, cloned --------------------------------------------------------------

def test_a_cloned_hub_dataset_repo_reads_its_data_folders_train_split(tmp_path):
    # `git clone https://huggingface.co/datasets/owner/name`: README.md and .gitattributes at the top,
    # the shards under data/ (before: "a directory with no data files in it")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    repo = tmp_path / "name"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    (repo / ".gitattributes").write_text("*.parquet filter=lfs\n")
    pq.write_table(pa.Table.from_pylist([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]),
                   repo / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([{"instruction": "held out", "output": "x"}]),
                   repo / "data" / "test-00000-of-00001.parquet")
    rows = load_records(DataConfig(path=str(repo)))
    assert [r["instruction"] for r in rows] == ["q0", "q1", "q2"]  # train only: the test answers stay out
    assert [r["instruction"] for r in load_records(DataConfig(path=str(repo), split="test"))] == ["held out"]


def test_split_folders_are_read_as_data_split(tmp_path):
    _jsonl(tmp_path / "ds" / "train" / "part.jsonl", [{"instruction": "t", "output": "a"}])
    _jsonl(tmp_path / "ds" / "validation" / "part.jsonl", [{"instruction": "v", "output": "a"}])
    assert load_records(DataConfig(path=str(tmp_path / "ds")))[0]["instruction"] == "t"
    assert load_records(DataConfig(path=str(tmp_path / "ds"), split="validation"))[0]["instruction"] == "v"
    with pytest.raises(UserError) as err:
        load_records(DataConfig(path=str(tmp_path / "ds"), split="test"))
    assert "without a 'test' one" in str(err.value) and "train/" in str(err.value)


def test_configuration_folders_are_named_not_merged(tmp_path):
    _jsonl(tmp_path / "ds" / "en" / "a.jsonl", [{"instruction": "en", "output": "a"}])
    _jsonl(tmp_path / "ds" / "fr" / "a.jsonl", [{"instruction": "fr", "output": "a"}])
    with pytest.raises(UserError) as err:
        load_records(DataConfig(path=str(tmp_path / "ds")))
    assert "2 folders (en/, fr/)" in str(err.value) and str(tmp_path / "ds" / "en") in err.value.hint


def test_one_subfolder_with_the_data_is_read(tmp_path):
    _jsonl(tmp_path / "download" / "my-set" / "train.jsonl", [{"instruction": "x", "output": "y"}])
    assert load_records(DataConfig(path=str(tmp_path / "download")))[0]["instruction"] == "x"


# ---- files that are not data files yet -----------------------------------------------------------------

@pytest.mark.parametrize("name, said", [
    ("data.zip", "unzip data.zip"),
    ("data.tar.gz", "tar -xf data.tar.gz"),
    ("notes.md", "mv notes.md notes.txt"),
])
def test_an_archive_or_a_markdown_file_gets_the_step_that_makes_it_data(tmp_path, name, said):
    # before: "unknown file type" and the list of types, with no way from this file to one of them
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04" if name.endswith(".zip") else b"# notes\n")
    with pytest.raises(UserError) as err:
        load_records(DataConfig(path=str(path)))
    assert said in (err.value.hint or ""), err.value.hint


# ---- role names of real exports --------------------------------------------------------------------------

@pytest.mark.parametrize("user, bot", [("prompter", "assistant"), ("human", "bot"), ("user", "ai"),
                                       ("human", "chatbot")])
def test_openassistant_and_scraped_sharegpt_role_names_are_read(tmp_path, user, bot):
    # before: "message 2 of 'conversations' has unknown role 'bot'", the whole file refused
    from core.data import detect_format, to_messages

    path = _jsonl(tmp_path / "chat.jsonl", [{"conversations": [{"from": user, "value": "hi"},
                                                               {"from": bot, "value": "hello"}]}])
    rows = load_records(DataConfig(path=str(path)))
    fmt = detect_format(rows, DataConfig(path=str(path)))
    assert [m["role"] for m in to_messages(rows[0], fmt)] == ["user", "assistant"]


def test_the_wizards_data_step_gives_the_same_step(tmp_path):
    from tui.screens.data import local_problem

    path = tmp_path / "export.zip"
    path.write_bytes(b"PK\x03\x04")
    said = local_problem(str(path))
    assert "unsupported file type" in said and "unzip export.zip" in said
