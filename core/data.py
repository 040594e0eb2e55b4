"""Training data: load, detect the format, render, tokenize with prompt masking, pack, measure.

The pipeline, one function a stage (each usable and tested alone):

    load_records(cfg)                 -> list[dict]          local file, `builtin:` name or Hub dataset
    detect_format(records, cfg)       -> DataFormat          instruction / chat / text, and which columns
    check_records(records, fmt)                              every row has what its format needs
    render(record, fmt, tok, cfg)     -> list[Segment]       text pieces, each trained or masked
    tokenize(segments, tok, n, ...)   -> (input_ids, labels) labels -100 where masked; truncated to n
    pack(examples, n)                 -> rows                several samples a row, isolated by position_ids
    build_datasets(cfg, tok)          -> (train, eval, info) all of the above, split and shuffled
    collate(rows, pad_id)             -> tensors             one micro-batch for the Trainer

Packing and attention: a packed row carries `position_ids` that restart at 0 at each sample
and no `attention_mask`. transformers (masking_utils.find_packed_sequence_indices, 4.5x-5.x)
then builds a block-diagonal causal mask, so samples never attend to each other. That
detection runs only when there is no attention mask AND no KV cache: a model run with
`use_cache=True` in training mode without gradient checkpointing would silently attend across
samples, so training must run with `model.config.use_cache = False` (tests/test_data.py proves
both the isolation and this trap). Evaluation rows are never packed (they are padded, with an
attention mask), so eval loss is right whatever the cache setting.

Rows with a missing required field are an error naming the file, the row and the field, never
skipped silently: a dataset half of whose rows lack an answer should be fixed, not trained on.
What is left out on purpose (KTO rows labelled false, empty texts, samples with nothing to learn
within max_seq_len) and what is cut (truncated samples, long texts split into windows) is
counted (`dropped_and_cut`), and shown by `data inspect`, `train` and the wizard.

Chat samples become a Conversation (to_conversation): role/content messages as transformers'
chat templates take them — ShareGPT's function_call/observation turns and OpenAI's tool_calls/
tool messages as assistant `tool_calls` and `tool` messages, content parts joined, a `system`
column as the first message — plus what is learned per message (assistant turns, unless a
per-turn weight says not) and the tool definitions, passed as `tools=`. Data that is not
supervised fine-tuning data (preference pairs, KTO labels, images/audio/video) is refused by
name in detect_format, with the mapping that would train on its good side.

Nothing heavy at module level: torch, transformers and datasets are imported by the functions
that need them.
"""
from __future__ import annotations

import codecs
import contextlib
import contextvars
import csv
import functools
import gzip
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional

from core.config import DataConfig
from core.errors import UserError

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and HF models) skip

FILE_TYPES = {".jsonl": "JSON lines", ".json": "JSON", ".csv": "CSV", ".tsv": "TSV", ".parquet": "Parquet",
              ".arrow": "Arrow", ".txt": "text"}
# Binary types: read whole by pyarrow, never gzipped.
BINARY_TYPES = (".parquet", ".arrow")

# Field names per format, and the column names each is recognised under (first match wins;
# matched case-insensitively, so INSTRUCTION/RESPONSE are found too). message_1/message_2 are
# CAMEL's columns, article/summary the summarisation sets' (CNN/DailyMail and its kin).
INSTRUCTION_ALIASES = {
    "instruction": ["instruction", "prompt", "question", "query", "message_1", "article"],
    "input": ["input", "context"],
    "output": ["output", "response", "answer", "completion", "message_2", "summary"],
    "system": ["system", "system_prompt"],
    "history": ["history"],
}
CHAT_COLUMNS = ["messages", "conversations", "conversation", "chat", "dialog"]
# Columns beside a chat column: a ShareGPT file's `system` and `tools` (LLaMA-Factory's
# glaive_toolcall demo), OpenAI's top-level `tools`. `reply` (a final assistant message kept in
# its own column, as LLaMA-Factory's DPO files keep `chosen`) is only ever mapped.
# `functions`: OpenAI's fine-tuning format before tools (2023), beside `function_call` messages.
CHAT_EXTRA_ALIASES = {"system": ["system", "system_prompt"], "tools": ["tools", "functions"], "reply": []}
# The answer column of a classification set beside its text (imdb, sst2, ag_news, banking77 ...).
LABEL_COLUMNS = ["label", "labels", "target", "class", "category", "sentiment", "intent", "label_text"]
TEXT_COLUMNS = ["text", "content", "body", "document"]
FIELDS = {
    "instruction": {"required": ["instruction", "output"], "optional": ["input", "system", "history"]},
    "chat": {"required": ["messages"], "optional": ["system", "tools", "reply"]},
    "segments": {"required": ["segments"], "optional": []},
    "text": {"required": ["text"], "optional": []},
}
# Message roles as written by OpenAI/transformers (role/content; OpenAI's newer `developer` is its
# system role) and ShareGPT (from/value).
# ShareGPT's function_call is an assistant turn calling a tool; observation is the tool's result.
ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
         # OpenAssistant's (oasst) prompter; scraped ShareGPT variants' bot, ai and chatbot
         "prompter": "user", "bot": "assistant", "ai": "assistant", "chatbot": "assistant",
         "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
         "function_call": "tool_call"}
# Per-turn training flags: OpenAI's `weight`, axolotl's `train`/`training`, LLaMA-Factory's `loss_weight`.
TURN_FLAGS = ("weight", "train", "training", "loss_weight")

# How many rows detection looks at: enough to see optional columns, cheap on big sets.
DETECT_ROWS = 100
# How many bad rows an error lists by number before it just counts them.
LIST_BAD_ROWS = 5
# inspect() measures lengths on at most this many samples (a preview must stay quick).
INSPECT_LENGTH_SAMPLES = 2000


class Segment(NamedTuple):
    """A piece of a rendered sample: its text, and whether the loss is computed on it."""

    text: str
    trained: bool


@dataclass(frozen=True)
class DataFormat:
    """What the samples are and where their fields live.

    kind: 'instruction', 'chat', 'segments' or 'text'. columns: format field -> dataset column
    (e.g. {'instruction': 'question', 'output': 'answer'}). message_keys: for chat, the
    (role, content) keys inside each message: ('role', 'content') or sharegpt's ('from', 'value').
    """

    kind: str
    columns: dict[str, str]
    reason: str
    message_keys: Optional[tuple[str, str]] = None
    tools: bool = False  # some sample has tool definitions, tool calls or tool results
    label_column: Optional[str] = None  # KTO's true/false label: rows marked false are left out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["message_keys"] = list(self.message_keys) if self.message_keys else None
        return d


# ---- loading -----------------------------------------------------------------------------------


def load_records(data_cfg: DataConfig) -> list[dict]:
    """Every sample as a dict, from a local file, a `builtin:` dataset or a Hub dataset id."""
    path = data_cfg.path
    from core import demo

    if demo.is_builtin(path):
        path = demo.resolve_builtin(path)
    local = Path(path).expanduser()
    if local.exists() or _looks_like_a_path(path):
        records = _load_file(local, data_cfg.max_samples, data_cfg.text_split, data_cfg.split)
        source = str(local)
    else:
        records = _load_hub(path, data_cfg)
        source = f"Hub dataset {path!r}"
    if data_cfg.max_samples is not None and len(records) > data_cfg.max_samples:
        records = records[: data_cfg.max_samples]
    if not records:
        raise UserError(f"{source}: no samples found (the dataset is empty)")
    return records


def _looks_like_a_path(path: str) -> bool:
    # A Hub id is "name" or "owner/name"; anything else (an extension we read, a leading ./ or /,
    # ~, a backslash, two slashes) is meant as a file, and a missing one is "file not found".
    return (
        data_type(Path(path)) is not None
        or path.startswith((".", "/", "~"))
        or "\\" in path
        or path.count("/") > 1
    )


def unknown_type_error(path: Path) -> UserError:
    """The message for a file whose type snugtune does not read, with the step that makes it data
    where there is one (a spreadsheet saved as CSV, an archive unpacked, prose renamed .txt)."""
    ext = path.suffix.lower()
    sheet = ext in (".xlsx", ".xls", ".xlsm", ".ods", ".numbers")
    archive = ext in (".zip", ".tar", ".tgz", ".7z", ".rar", ".bz2", ".xz", ".zst") or (
        ext == ".gz" and Path(path.stem).suffix.lower() == ".tar")
    prose = ext in (".md", ".markdown", ".rst", ".text", ".org")
    hint = ("save the sheet as CSV (in Excel: File > Save As > \"CSV UTF-8\"; a header row names the columns)"
            if sheet else
            f"unpack it first (e.g. `{'unzip' if ext == '.zip' else 'tar -xf' if ext in ('.tar', '.tgz', '.gz') else '7z x'} "
            f"{path.name}`), then give the data file or the folder it holds" if archive else
            f"it is plain text: rename it to .txt (`mv {path.name} {Path(path.name).stem}.txt`), read one sample a "
            "paragraph" if prose else None)
    return UserError(
        f"{path}: unknown file type {ext or '(no extension)'!r}; snugtune reads "
        + ", ".join(f"{e} ({n})" for e, n in FILE_TYPES.items()) + ", and each but .parquet and .arrow gzipped (.jsonl.gz)",
        hint=hint,
    )


def _load_file(path: Path, max_samples: Optional[int], text_split: str = "auto", split: str = "train") -> list[dict]:
    if not path.exists():
        raise UserError(f"{path}: file not found", hint="check the path (data.path), or give a Hub dataset id as owner/name")
    if path.is_dir():
        return _load_dir(path, max_samples, text_split, split)
    ext = path.suffix.lower()
    gz = ext == ".gz" and Path(path.stem).suffix.lower() in FILE_TYPES and Path(path.stem).suffix.lower() not in BINARY_TYPES
    if gz:  # my.jsonl.gz: the Hub's and many exporters' compressed form, read without unpacking it
        ext = Path(path.stem).suffix.lower()
    if ext not in FILE_TYPES:
        raise unknown_type_error(path)
    if gz:
        path = _GzFile(path)  # type: ignore[assignment]
    encoding = "utf-8-sig"
    try:
        encoding = _text_encoding(path)
        if ext == ".jsonl":
            return _read_jsonl(path, max_samples, encoding)
        if ext == ".json":
            return _read_json(path, encoding)
        if ext in (".csv", ".tsv"):
            delimiter = "\t" if ext == ".tsv" else _csv_delimiter(path, encoding)
            return _read_csv(path, delimiter, max_samples, encoding)
        if ext == ".parquet":
            return _read_parquet(path)
        if ext == ".arrow":
            return _read_arrow(path)
        return _read_txt(path, text_split, encoding)
    except PermissionError:
        raise UserError(f"{path}: cannot read the file (permission denied)") from None
    except UnicodeDecodeError as exc:
        if encoding != "utf-8-sig":
            raise UserError(f"{path}: not valid {encoding.upper()} text ({exc.reason}), though it starts like it",
                            hint="save the file again as UTF-8") from None
        raise _not_utf8(path) from None
    except csv.Error as exc:
        raise UserError(f"{path}: not a readable {FILE_TYPES[ext]} file ({exc})") from None
    except (EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: not a whole gzip file ({exc})",
                        hint="the file was probably cut short while copied or downloaded: fetch it again") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


class _GzFile:
    """A gzipped data file, read as the Path of its contents by the readers below (open,
    read_text, read_bytes); shown as its own path in messages."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name

    def __str__(self) -> str:
        return str(self.path)

    def open(self, mode: str = "r", encoding: Optional[str] = None, newline: Optional[str] = None):
        if "b" in mode:
            return gzip.open(self.path, "rb")
        return gzip.open(self.path, "rt", encoding=encoding, newline=newline)

    def read_text(self, encoding: str = "utf-8") -> str:
        with self.open(encoding=encoding) as fh:
            return fh.read()

    def read_bytes(self) -> bytes:
        with self.open("rb") as fh:
            return fh.read()


class _FileRecords(list):
    """The rows of a directory's files, and which file each came from (`origins`: (first row
    index, file) pairs), so that an error about row 1,204 can say `b.jsonl, row 4`."""

    origins: list = []


def _load_dir(path: Path, max_samples: Optional[int], text_split: str, split: str = "train") -> list[dict]:
    """Every data file directly in `path` (sorted by name; hidden files and other types
    skipped), all of one type, as one dataset: what a dataset split into shards looks like
    (`train-00000-of-00004.parquet` ...), and how `datasets.load_dataset(dir)` reads one."""
    if (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        return _read_saved_dataset(path, split)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and data_type(p))
    if not files:
        inner = _data_subfolder(path, split)
        if inner is not None:
            return _load_dir(inner, max_samples, text_split, split)
        raise UserError(f"{path}: a directory with no data files in it ({', '.join(FILE_TYPES)})",
                        hint="give one data file, or a directory of them")
    files = _split_files(path, files, split)
    types = sorted({data_type(p) for p in files})
    if len(types) > 1:
        by_type = "; ".join(f"{t}: " + ", ".join(p.name for p in files if data_type(p) == t)[:80] for t in types)
        raise UserError(f"{path}: the directory holds data files of {len(types)} types ({by_type}); "
                        "snugtune reads a directory of one type, as one dataset",
                        hint="move the files that are not part of the data set out, or give one file")
    records, origins = _FileRecords(), []
    for f in files:
        left = None if max_samples is None else max_samples - len(records)
        if left is not None and left <= 0:
            break
        origins.append((len(records), f.name))
        records.extend(_load_file(f, left, text_split))
    records.origins = origins
    return records


def _has_data(d: Path, depth: int = 2) -> bool:
    try:
        entries = [p for p in d.iterdir() if not p.name.startswith(".")]
    except OSError:
        return False
    return any(p.is_file() and data_type(p) for p in entries) or (
        depth > 1 and any(p.is_dir() and _has_data(p, depth - 1) for p in entries))


def _data_subfolder(path: Path, split: str) -> Optional[Path]:
    """The folder holding the data in a folder that holds none itself: a Hub dataset repository
    cloned with git (README.md beside `data/train-00000-of-00001.parquet`), a folder of split
    folders (`train/`, `test/`: data.split's), or one subfolder with data; None if there is none.
    Several folders that are not splits (a Hub repo's configurations) are one message naming them."""
    subs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and _has_data(p))
    if not subs:
        return None
    by_name = {p.name.lower(): p for p in subs}
    if "data" in by_name:  # the Hub's own layout (datasets reads data/ first)
        return by_name["data"]
    splits = {SPLIT_WORDS[p.name.lower()]: p for p in subs if p.name.lower() in SPLIT_WORDS}
    if splits:
        want = SPLIT_WORDS.get(split.lower(), split.lower())
        if want in splits:
            return splits[want]
        raise UserError(f"{path}: a folder of split folders without a {split!r} one (it has "
                        f"{', '.join(p.name + '/' for p in splits.values())})",
                        hint="choose the split with data.split, or give that folder as the data path")
    if len(subs) == 1:
        return subs[0]
    raise UserError(f"{path}: the data files are in {len(subs)} folders ({', '.join(p.name + '/' for p in subs[:6])}"
                    f"{' ...' if len(subs) > 6 else ''}), read as separate data sets (a Hub repository's configurations)",
                    hint=f"give one of them as the data path, e.g. {subs[0]}")


# Split names in file names, as `datasets.load_dataset(folder)` reads them (train.jsonl,
# test-00000-of-00001.parquet, validation.csv ...).
SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test",
               "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
               "eval": "validation"}


def _split_of(p: Path) -> Optional[str]:
    words = re.split(r"[^a-z]+", p.name.lower().split(".")[0])
    return next((SPLIT_WORDS[w] for w in words if w in SPLIT_WORDS), None)


def _split_files(path: Path, files: list[Path], split: str) -> list[Path]:
    """A folder laid out in splits (train.jsonl beside test.jsonl or validation.jsonl) is read as
    its data.split alone, as `datasets` reads it: read whole, the test answers were trained on."""
    splits = {_split_of(p) for p in files}
    if len(splits - {None}) < 2:  # one split (or none named): the folder is the data set
        return files
    want = SPLIT_WORDS.get(split.lower(), split.lower())
    chosen = [p for p in files if _split_of(p) == want]
    if not chosen:
        have = ", ".join(sorted(f"{s} ({', '.join(p.name for p in files if _split_of(p) == s)[:60]})"
                                for s in splits if s))
        raise UserError(f"{path}: a folder of splits without a {split!r} one (it has {have})",
                        hint="choose the split with data.split, or give one file")
    return chosen


def data_type(path: Path) -> Optional[str]:
    """The data file type a name says (`.jsonl` for `a.jsonl` and `a.jsonl.gz`), or None."""
    ext = path.suffix.lower()
    if ext == ".gz":
        ext = Path(path.stem).suffix.lower()
        return ext if ext in FILE_TYPES and ext not in BINARY_TYPES else None
    return ext if ext in FILE_TYPES else None


def _row_where(records: list, i: int) -> str:
    """`row i` (1-based), or `FILE, row j` for rows read from a directory."""
    origins = getattr(records, "origins", None)
    if origins:
        start, name = next((s, n) for s, n in reversed(origins) if s < i)
        return f"{name}, row {i - start}"
    return f"row {i}"


# Byte-order marks. A file saved as "Unicode text" by Excel or Notepad on Windows is UTF-16 with
# a BOM; UTF-32's marks start like UTF-16's, so they are tried first.
_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]


def _text_encoding(path: Path) -> str:
    """UTF-8 (with or without a BOM), or UTF-16/32 when the file says so by its BOM, or when its
    first characters are ASCII with a NUL byte beside each (UTF-16 without a BOM)."""
    with path.open("rb") as fh:
        head = fh.read(4)
    for bom, enc in _BOMS:
        if head.startswith(bom):
            return enc
    if len(head) == 4 and head[1] == head[3] == 0 and head[0] and head[2]:
        return "utf-16-le"
    if len(head) == 4 and head[0] == head[2] == 0 and head[1] and head[3]:
        return "utf-16-be"
    return "utf-8-sig"


def _not_utf8(path: Path) -> UserError:
    """Where the first byte that is not UTF-8 is, in the whole file. (The decoder's own offset counts
    from the start of the chunk it was decoding, 8 KB or so, not from the start of the file.)"""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        where = (f"{path}, line {line}: not UTF-8 text (byte {exc.start} of the file, column {col} of the line: "
                 f"{raw[exc.start:exc.start + 1]!r}, {exc.reason})")
        name = Path(str(path)).name
        out = name.split(".")[0] + "-utf8" + name[len(name.split(".")[0]):]
        if _windows_1252(raw):
            # Excel's "CSV (Comma delimited)" and Notepad's "ANSI" on a Western Windows write
            # Windows-1252. Converting it as latin-1 (the usual advice) turns its curly quotes, dashes
            # and euro signs (bytes 0x80-0x9F) into invisible control characters, so say cp1252.
            return UserError(
                where + "; it reads as Windows-1252 (what Excel's \"CSV (Comma delimited)\" and Notepad's "
                "\"ANSI\" write)",
                hint=f"convert it: `iconv -f cp1252 -t utf-8 {name} > {out}`, or in Excel save as "
                "\"CSV UTF-8 (Comma delimited)\"",
            )
        return UserError(where, hint="save the file as UTF-8 (your editor's 'save with encoding'; `file -i "
                         f"{name}` guesses its encoding, then `iconv -f ENCODING -t utf-8 {name} > {out}`)")
    return UserError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _windows_1252(raw: bytes) -> bool:
    """Whether bytes that are not UTF-8 read as Windows-1252 text: every byte defined there (0x81,
    0x8D, 0x8F, 0x90 and 0x9D are not) and no control characters but tab and line ends."""
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:
        return False
    return not any(ord(c) < 32 and c not in "\t\r\n" for c in text)


def _json_problem(exc: json.JSONDecodeError) -> str:
    # json's messages end in "at" where they name a place ("Unterminated string starting at").
    return f"{exc.msg} column {exc.colno}" if exc.msg.endswith(" at") else f"{exc.msg} at column {exc.colno}"


def _read_jsonl(path: Path, max_samples: Optional[int], encoding: str = "utf-8-sig") -> list[dict]:
    records = []
    with path.open(encoding=encoding) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if line.startswith("\ufeff"):  # files joined with `cat`, each saved with a BOM
                line = line[1:]
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                if not records and line.lstrip()[:1] in ("[", "{"):
                    # A JSON array (often pretty-printed) saved as .jsonl: read it as the JSON it is.
                    whole = _json_document(path, encoding)
                    if whole is not None:
                        return whole[:max_samples] if max_samples is not None else whole
                if not line.endswith("\n") and (exc.pos >= len(line.rstrip()) or exc.msg.startswith("Unterminated")):
                    raise UserError(
                        f"{path}, line {lineno}: the last line is cut off ({_json_problem(exc)}): the file ends "
                        "in the middle of a JSON object, without a newline",
                        hint="the file was probably truncated (a copy or a writer stopped early): complete the "
                        f"last line, or delete it to use the {len(records)} lines before it",
                    ) from None
                if exc.msg == "Extra data" and line.rstrip().endswith(","):
                    raise UserError(f"{path}, line {lineno}: a comma after the object (`}},`): JSON lines have "
                                    "one object a line and nothing between them",
                                    hint="remove the commas at the ends of the lines, or save the file as a "
                                    ".json array ([{...}, {...}])") from None
                raise UserError(f"{path}, line {lineno}: not valid JSON ({_json_problem(exc)})",
                                hint="each line must be one whole JSON object, {...}") from None
            if not isinstance(obj, dict):
                if not records and isinstance(obj, list):  # a one-line JSON array
                    whole = _json_document(path, encoding)
                    if whole is not None:
                        return whole[:max_samples] if max_samples is not None else whole
                if isinstance(obj, list) and obj and all(isinstance(o, dict) for o in obj):
                    raise UserError(f"{path}, line {lineno}: a list of {len(obj)} objects ([{{...}}, ...]) where JSON "
                                    "lines have one object ({...}) a line",
                                    hint="put each object of that list on a line of its own (or save the whole file "
                                    "as one .json array)")
                raise UserError(f"{path}, line {lineno}: expected a JSON object ({{...}}), got {type(obj).__name__} "
                                f"{_preview(obj, 40)}", hint="each line must be one whole JSON object, {...}")
            records.append(obj)
            if max_samples is not None and len(records) >= max_samples:
                break
    return records


def _json_document(path: Path, encoding: str) -> Optional[list[dict]]:
    """The file as one JSON document of samples (a list, or {"data": [...]}), or None when it
    is not one valid JSON document."""
    try:
        data = json.loads(path.read_text(encoding=encoding))
    except json.JSONDecodeError:
        return None
    return _samples_of(path, data)


def _read_json(path: Path, encoding: str = "utf-8-sig") -> list[dict]:
    text = path.read_text(encoding=encoding)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # One object per line saved as .json: read it as JSON lines rather than refuse.
            return _read_jsonl(path, None, encoding)
        raise UserError(f"{path}, line {exc.lineno}: not valid JSON ({_json_problem(exc)})") from None
    return _samples_of(path, data)


def _samples_of(path: Path, data: Any) -> list[dict]:
    if isinstance(data, dict):
        data = _pandas_frame(data)
    if isinstance(data, dict):
        if isinstance(data.get("data"), list):
            data = data["data"]
        else:
            raise UserError(
                f"{path}: expected a list of samples or {{\"data\": [...]}}; the top-level object has keys "
                + ", ".join(repr(k) for k in list(data)[:10])
            )
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of samples, got {type(data).__name__}")
    for i, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise UserError(f"{path}: sample {i} is a {type(obj).__name__}, expected an object ({{...}})")
    return data


def _pandas_frame(data: dict) -> Any:
    """pandas' DataFrame.to_json() forms as rows: the default `orient="columns"` ({column:
    {index: value}}), `orient="index"` ({index: {column: value}}) and `orient="split"`
    ({"columns": [...], "data": [[...]]}); else `data`. The index is told from the columns by
    its labels: pandas' default index is 0, 1, 2 ..., written as "0", "1", "2"."""
    def is_index(keys) -> bool:
        return bool(keys) and all(isinstance(k, str) and k.isdigit() for k in keys)

    if data and all(isinstance(v, dict) for v in data.values()):
        inner = list(next(iter(data.values())))
        if is_index(inner) and all(list(v) == inner for v in data.values()):
            return [{col: data[col][i] for col in data} for i in inner]
        if is_index(list(data)):
            return list(data.values())
    if isinstance(data.get("columns"), list) and isinstance(data.get("data"), list) \
            and all(isinstance(r, list) and len(r) == len(data["columns"]) for r in data["data"]):
        return [dict(zip(data["columns"], r)) for r in data["data"]]
    return data


# The csv module refuses fields over 131,072 characters by default (a `_csv.Error`); a long
# document in one cell is ordinary training data. The C long's maximum is the largest it takes.
CSV_FIELD_LIMIT = 2**31 - 1
# What separates a .csv file's cells: a comma, or a semicolon (Excel's CSV wherever the decimal
# separator is a comma: most of Europe), a tab or a bar.
CSV_DELIMITERS = (",", ";", "\t", "|")


def _csv_delimiter(path: Path, encoding: str) -> str:
    """The delimiter that splits the header line into the most columns (a comma on a tie).
    Without this a semicolon file reads as one column, `instruction;output`, and trains as text."""
    with path.open(encoding=encoding, newline="") as fh:
        header = fh.readline()
    counts = {d: len(next(csv.reader([header], delimiter=d), [])) for d in CSV_DELIMITERS}
    best = max(counts.values())
    return next(d for d in CSV_DELIMITERS if counts[d] == best)


def _read_csv(path: Path, delimiter: str, max_samples: Optional[int], encoding: str = "utf-8-sig") -> list[dict]:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    records = []
    with path.open(encoding=encoding, newline="") as fh:
        # strict: a quote that is never closed is an error at the end of the file, not one last
        # field that swallowed every line after it
        reader = csv.DictReader(fh, delimiter=delimiter, strict=True)
        if not reader.fieldnames:
            return []
        rows = iter(reader)
        while True:
            start = reader.line_num + 1
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error as exc:
                if "unexpected end of data" in str(exc):
                    raise UserError(f"{path}, line {start}: a quoted value opened on this line is never closed "
                                    "(the file ends inside it)",
                                    hint='close the quote, and write a quote inside a quoted value as two ("")') from None
                raise UserError(f"{path}, line {start}: not readable as {'TSV' if delimiter == chr(9) else 'CSV'} ({exc})",
                                hint='quote values that hold the separator or a quote ("a, b"; "say ""hi""")') from None
            if None in row:  # more cells than header columns
                shown = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "bar"}[delimiter] if delimiter in CSV_DELIMITERS else repr(delimiter)
                raise UserError(f"{path}, line {reader.line_num}: more values than the header has columns "
                                f"({len(reader.fieldnames)}, separated by {shown}s)",
                                hint="quote values that contain the separator (\"a, b\")")
            records.append(row)
            if max_samples is not None and len(records) >= max_samples:
                break
    return records


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid & co. for damaged files
        if isinstance(exc, OSError) and not type(exc).__module__.startswith("pyarrow"):
            raise
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None


def _read_arrow(path: Path) -> list[dict]:
    """An Arrow file: what `datasets` writes (`save_to_disk`, its cache: Arrow's streaming format),
    or Arrow's file format (Feather v2, pyarrow.feather, polars' write_ipc)."""
    import pyarrow as pa  # a dependency of `datasets`

    problems = []
    for open_ in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with pa.memory_map(str(path)) as src:
                return open_(src).read_all().to_pylist()
        except pa.ArrowInvalid as exc:
            problems.append(str(exc))
        except OSError as exc:
            if type(exc).__module__.startswith("pyarrow"):
                problems.append(str(exc))
            else:
                raise
    raise UserError(f"{path}: not a readable Arrow file ({problems[-1][:200]})",
                    hint="the file was probably cut short while copied or written: write it again "
                    "(datasets' save_to_disk, or pyarrow)")


def _read_saved_dataset(path: Path, split: str) -> list[dict]:
    """A folder written by `datasets`' `Dataset.save_to_disk` (state.json names its .arrow files) or
    `DatasetDict.save_to_disk` (dataset_dict.json names the splits, one such folder each; data.split
    picks one, "train" by default). Read with pyarrow: the same rows `datasets.load_from_disk` gives."""
    try:
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits") or []
            if split not in splits:
                raise UserError(f"{path}: a saved DatasetDict without a {split!r} split (it has "
                                + ", ".join(repr(s) for s in splits) + ")",
                                hint="give that split's own folder as the data path ("
                                + str(path / (splits[0] if splits else "SPLIT")) + "), or choose it with data.split")
            return _read_saved_dataset(path / split, split)
        files = [f.get("filename") for f in json.loads((path / "state.json").read_text(encoding="utf-8")).get("_data_files", [])]
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise UserError(f"{path}: a datasets save_to_disk folder whose index is not readable ({exc})",
                        hint="save the dataset again (dataset.save_to_disk(...))") from None
    if not files or not all(isinstance(f, str) for f in files):
        files = sorted(p.name for p in path.glob("*.arrow"))
    records = _FileRecords()
    records.origins = []
    for name in files:
        f = path / name
        if not f.is_file():
            raise UserError(f"{f}: missing (state.json lists it)", hint="copy the whole folder again")
        records.origins.append((len(records), name))
        records.extend(_read_arrow(f))
    return records


def _read_txt(path: Path, split: str = "auto", encoding: str = "utf-8-sig") -> list[dict]:
    """Samples of a .txt file: per paragraph, line or the whole document (data.text_split). 'auto'
    takes paragraphs when the file has a blank line, else lines: a file of one document a line
    (LLaMA-Factory's wiki demo) would otherwise be one sample of hundreds of thousands of tokens."""
    text = path.read_text(encoding=encoding)
    if split == "auto":
        split = "paragraph" if re.search(r"\n[ \t\r\f\v]*\n", text.strip()) else "line"
    if split == "document":
        parts = [text]
    elif split == "line":
        parts = text.splitlines()
    else:
        parts = re.split(r"\n\s*\n", text)
    return [{"text": p.strip()} for p in parts if p.strip()]


def _load_hub(dataset_id: str, data_cfg: DataConfig) -> list[dict]:
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset_id):
        raise UserError(f"{dataset_id!r}: neither an existing file nor a Hub dataset id (owner/name)")
    where = f"Hub dataset {dataset_id!r}"
    if data_cfg.subset:
        where += f" (subset {data_cfg.subset!r})"
    _probe_hub(dataset_id, where)
    import datasets

    split = data_cfg.split
    if data_cfg.max_samples is not None:
        split = f"{split}[:{data_cfg.max_samples}]"
    try:
        ds = datasets.load_dataset(dataset_id, data_cfg.subset, split=split)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear message below
        raise _hub_error(exc, where, data_cfg) from None
    return ds.to_list()


def _probe_hub(dataset_id: str, where: str) -> None:
    """Ask the Hub about the dataset once, quickly, so that 'unreachable', 'not found' and 'needs
    a token' are said at once (datasets itself would retry an unreachable Hub for ~25 s)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return  # offline mode: datasets reads its cache, or says it cannot
    try:
        HfApi().dataset_info(dataset_id, timeout=15)
    except GatedRepoError:
        raise UserError(
            f"{where} is gated: it needs a token of an account that accepted its terms",
            hint="accept the terms on the dataset's Hub page, then set HF_TOKEN (or run `hf auth login`)",
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{where}: not found on the Hub, or it is private and needs a token",
            hint="check the id (owner/name); for a private dataset set HF_TOKEN (or run `hf auth login`)",
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise UserError(f"{where}: the Hub refused access (HTTP {status})",
                            hint="set HF_TOKEN to a token that can read it (or run `hf auth login`)") from None
        raise UserError(f"{where}: the Hub answered with an error ({_scrub(str(exc)).splitlines()[0]})") from None
    except Exception as exc:  # noqa: BLE001
        if _is_connection_error(exc):
            raise UserError(
                f"{where}: cannot reach the Hugging Face Hub ({constants.ENDPOINT})",
                hint="connect to the network (or set HF_ENDPOINT to a mirror); if the dataset is in your local "
                "cache, set HF_HUB_OFFLINE=1; or download the data and point data.path at a local file",
            ) from None
        raise


def _hub_error(exc: Exception, where: str, data_cfg: DataConfig) -> UserError:
    name = type(exc).__name__
    text = _scrub(str(exc))
    low = text.lower()
    if name == "DatasetNotFoundError" or "doesn't exist on the hub" in low or "cannot be accessed" in low:
        return UserError(
            f"{where}: not found on the Hub, or it is private or gated and needs a token",
            hint="check the id; for a gated or private dataset accept its terms on the Hub and set HF_TOKEN "
            "(or run `hf auth login`)",
        )
    if "offline" in low or _is_connection_error(exc) or "couldn't reach" in low or "connection" in low:
        return UserError(
            f"{where}: cannot reach the Hugging Face Hub and the dataset is not in the local cache",
            hint="connect to the network (or set HF_ENDPOINT to a mirror), or download the data and point "
            "data.path at a local .jsonl/.json/.csv/.parquet/.txt file",
        )
    if "config name is missing" in low or ("builderconfig" in low and "not found" in low):
        m = re.search(r"available configs?:?\s*(\[.*?\])", text, re.IGNORECASE | re.DOTALL)
        avail = f"; available: {m.group(1)}" if m else ""
        return UserError(f"{where}: choose a subset (data.subset){avail}")
    if "unknown split" in low or ("split" in low and "should be one of" in low):
        m = re.search(r"should be one of (\[.*?\])", text)
        avail = f"; available: {m.group(1)}" if m else ""
        return UserError(f"{where}: there is no split {data_cfg.split!r}{avail} (data.split)")
    return UserError(f"{where}: could not be loaded ({name}: {text})")


_NETWORK_ERRORS = {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "ProxyError",
                   "OfflineModeIsEnabled", "LocalEntryNotFoundError"}


def _is_connection_error(exc: BaseException) -> bool:
    """A network failure, by class name along the cause chain (httpx, requests or the stdlib)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (ConnectionError, TimeoutError)) or _NETWORK_ERRORS & {c.__name__ for c in type(exc).__mro__}:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _scrub(text: str) -> str:
    """Remove any token from a message before it is shown."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        tok = os.environ.get(var)
        if tok:
            text = text.replace(tok, "***")
    return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", text)


# ---- format detection --------------------------------------------------------------------------

# Which command a hint is for: each names its own syntax for mapping columns (a `train` user has
# no --column flag, a wizard user types into the Columns box). core.train leaves the default.
_HINT_SYNTAX: contextvars.ContextVar[str] = contextvars.ContextVar("snugtune_hint_syntax", default="train")
HINT_SYNTAXES = ("train", "inspect", "wizard")


@contextlib.contextmanager
def hint_syntax(style: str):
    """Within this block, column-mapping hints use `style`'s syntax ('train', 'inspect', 'wizard')."""
    if style not in HINT_SYNTAXES:
        raise ValueError(f"hint syntax {style!r}; expected one of {HINT_SYNTAXES}")
    token = _HINT_SYNTAX.set(style)
    try:
        yield
    finally:
        _HINT_SYNTAX.reset(token)


def columns_hint(example: dict[str, str]) -> str:
    """How to map `example` (field -> column) in the syntax of the command at hand."""
    style = _HINT_SYNTAX.get()
    if style == "inspect":
        return " ".join(f"--column {f}={c}" for f, c in example.items())
    if style == "wizard":
        return "type " + ", ".join(f"{f}={c}" for f, c in example.items()) + " in the Columns box"
    q = lambda c: f"'{c}'" if "'" not in c else json.dumps(c)  # noqa: E731 - TOML literal or basic string
    inner = ", ".join(f"{f}={q(c)}" for f, c in example.items())
    return f'--set "data.columns={{{inner}}}" (in a preset: columns = {{{inner}}} under [data])'


# `data inspect`'s flags for the settings it has one for; the others it reads from a preset.
INSPECT_FLAGS = {"template": "--template", "max_seq_len": "--seq", "format": "--format",
                 "text_split": "--text-split", "long_samples": "--long-samples"}


# The wizard's own fields for the data settings it has one for (tui/screens/settings.py's labels,
# tui/screens/data.py's Format): where its user acts on them, in the words on the screen.
WIZARD_FIELDS = {"max_seq_len": ("Sequence len", "Settings step"),
                 "template": ("Template", "Settings step, Advanced"),
                 "eval_fraction": ("Eval fraction", "Settings step, Advanced"),
                 "packing": ("Packing", "Settings step, Advanced"),
                 "format": ("Format", "Data step")}


def hint_style() -> str:
    """Whose syntax hints use now ('train', 'inspect' or 'wizard'; see hint_syntax)."""
    return _HINT_SYNTAX.get()


def setting_hint(key: str, value: Any) -> str:
    """How to set data.`key` to `value` in the syntax of the command at hand."""
    style = _HINT_SYNTAX.get()
    if style == "inspect" and key in INSPECT_FLAGS:
        return f"{INSPECT_FLAGS[key]} {value}"
    if style == "wizard":
        if key in WIZARD_FIELDS:
            label, where = WIZARD_FIELDS[key]
            return f"{label}: {value} ({where})"
        # no field for it in the wizard: a preset file has it
        return (f"data.{key} = {json.dumps(value)} under [data] in a preset (ctrl+s saves one; edit it, then "
                "open it with snugtune --preset FILE)")
    shown = f"'{value}'" if isinstance(value, str) else value
    return f"--set data.{key}={shown} (in a preset: {key} = {json.dumps(value)} under [data])"


def _columns_of(records: list[dict]) -> list[str]:
    cols: dict[str, None] = {}
    for r in records[:DETECT_ROWS]:
        cols.update(dict.fromkeys(r))
    return list(cols)


def _by_lower(columns: list[str]) -> dict[str, str]:
    """lower-cased name -> column (the first of several that differ only in case)."""
    out: dict[str, str] = {}
    for c in columns:
        out.setdefault(str(c).lower(), c)
    return out


def _json_list(value: Any) -> Any:
    """A CSV/TSV cell holding the JSON of a list (messages, segments), parsed; anything else as it is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _message_keys(value: Any) -> Optional[tuple[str, str]]:
    """('role','content') or ('from','value') if `value` is a list of message dicts, else None."""
    value = _json_list(value)
    if not isinstance(value, list) or not value or not isinstance(value[0], dict):
        return None
    first = value[0]
    if "role" in first and ("content" in first or "tool_calls" in first):
        return ("role", "content")
    if "from" in first and "value" in first:
        return ("from", "value")
    return None


def _first_value(records: list[dict], column: str) -> Any:
    for r in records[:DETECT_ROWS]:
        v = r.get(column)
        if v is not None:
            return v
    return None


def _is_segments(value: Any) -> bool:
    value = _json_list(value)
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)
            and "text" in value[0] and "label" in value[0])


def detect_format(records: list[dict], data_cfg: DataConfig) -> DataFormat:
    """Which format the samples are in and which columns hold each field.

    `data_cfg.columns` (field -> column) is taken as given and checked; `data_cfg.format`
    other than 'auto' forces the kind. Otherwise: data that is not supervised fine-tuning data
    (preference pairs, KTO labels, images) is refused by name; a column of message lists means
    chat, axolotl's `segments` means segments, an instruction/output pair (or an alias such as
    prompt/response) means instruction, and a text column means text, in that order. Column
    names are matched case-insensitively.
    """
    columns = _columns_of(records)
    lower = _by_lower(columns)
    # A mapped name that differs from a column only in case means that column.
    mapping = {f: c if c in columns else lower.get(c.lower(), c) for f, c in data_cfg.columns.items()}
    kind = data_cfg.format
    allowed_fields = sorted({f for spec in FIELDS.values() for f in spec["required"] + spec["optional"]})
    for fld, col in mapping.items():
        if fld not in allowed_fields:
            raise UserError(f"data.columns: unknown field {fld!r}; the fields are {', '.join(allowed_fields)}")
        if col not in columns:
            import difflib

            near = difflib.get_close_matches(str(col), [str(c) for c in columns], n=1, cutoff=0.6)
            raise UserError(
                f"data.columns maps {fld!r} to column {col!r}, which the data does not have; "
                f"its columns are: {', '.join(map(str, columns))}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
            )
    _refuse_multimodal_columns(records, lower)
    reason_prefix = "detected"
    if kind == "auto" and mapping:
        kinds = {k for k, spec in FIELDS.items() if set(mapping) <= set(spec["required"] + spec["optional"])}
        if not kinds:
            touched = {k for k, spec in FIELDS.items() if set(mapping) & set(spec["required"] + spec["optional"])}
            raise UserError(f"data.columns mixes fields of different formats ({', '.join(sorted(touched))}); "
                            "map one format's fields")
        reason_prefix = "from data.columns"
        if len(kinds) == 1:
            kind = kinds.pop()
        # else only fields several formats share (e.g. system): detect the kind, apply the mapping
    elif kind != "auto":
        reason_prefix = "set by data.format"
        spec = FIELDS[kind]
        stray = sorted(set(mapping) - set(spec["required"] + spec["optional"]))
        if stray:
            raise UserError(f"data.columns maps {', '.join(map(repr, stray))}, which {kind} data does not have; "
                            f"its fields are {', '.join(spec['required'] + spec['optional'])}")
    if not mapping:  # a mapping is the user choosing what to train on; a forced format is not
        _refuse_preference(records, lower)

    label_col = _kto_label_column(records, lower)
    found_chat = [(c, _message_keys(_first_value(records, c))) for c in columns]
    found_chat = [(c, keys) for c, keys in found_chat if keys]

    def pick(aliases: list[str], taken=()) -> Optional[str]:
        return next((lower[a] for a in aliases if a in lower and lower[a] not in taken), None)

    def finish(fmt: DataFormat) -> DataFormat:
        if label_col and label_col not in fmt.columns.values():
            fmt = replace(fmt, label_column=label_col,
                          reason=fmt.reason + f"; rows whose {label_col!r} is false are left out")
        return fmt

    def chat_format(col: str, why: str) -> DataFormat:
        keys = _message_keys(_first_value(records, col))
        if keys is None:
            raise UserError(
                f"column {col!r} does not hold a list of messages ({{\"role\", \"content\"}} or sharegpt "
                f"{{\"from\", \"value\"}}); got {_preview(_first_value(records, col))}"
            )
        cols = {"messages": col}
        taken = [col, *mapping.values()]
        for f, aliases in CHAT_EXTRA_ALIASES.items():
            c = mapping.get(f) or pick(aliases, taken=taken)
            if c:
                cols[f] = c
                taken.append(c)
        style = "sharegpt from/value" if keys == ("from", "value") else "role/content"
        extra = "".join(f", {f}={c!r}" for f, c in cols.items() if f != "messages")
        return DataFormat("chat", cols, f"{why}: column {col!r} holds {style} message lists{extra}", keys)

    def instruction_format(why: str) -> Optional[DataFormat]:
        found: dict[str, Optional[str]] = {}
        for f in INSTRUCTION_ALIASES:  # a column mapped to one field is never picked for another
            found[f] = mapping.get(f) or pick(INSTRUCTION_ALIASES[f], taken=[*mapping.values(), *found.values()])
        if not (found["instruction"] and found["output"]):
            return None
        cols = {f: c for f, c in found.items() if c}
        shown = ", ".join(f"{f}={c!r}" for f, c in cols.items())
        return DataFormat("instruction", cols, f"{why}: {shown}")

    def segments_format(why: str) -> Optional[DataFormat]:
        col = mapping.get("segments") or pick(["segments"])
        if col is None or (not mapping.get("segments") and not _is_segments(_first_value(records, col))):
            return None
        return DataFormat("segments", {"segments": col},
                          f"{why}: column {col!r} holds axolotl template-free segments (label true = learned)")

    def text_format(why: str) -> Optional[DataFormat]:
        col = mapping.get("text") or pick(TEXT_COLUMNS)
        if col is None:
            str_cols = [c for c in columns if isinstance(_first_value(records, c), str)]
            if len(columns) == 1 and str_cols:
                col = str_cols[0]
        if col is None:
            return None
        if not mapping and kind == "auto":
            _refuse_unlearned_labels(records, lower, col)
        return DataFormat("text", {"text": col}, f"{why}: column {col!r} holds plain text")

    if kind == "chat":
        col = mapping.get("messages") or pick(CHAT_COLUMNS)
        col = col or (found_chat[0][0] if found_chat else None)
        if col is None:
            raise _no_format_error("chat", columns)
        return finish(chat_format(col, reason_prefix))
    makers = {"instruction": instruction_format, "segments": segments_format, "text": text_format}
    if kind in makers:
        fmt = makers[kind](reason_prefix)
        if fmt is None:
            raise _no_format_error(kind, columns)
        return finish(fmt)

    # auto (nothing mapped, or only shared fields)
    if found_chat:
        preferred = next((lower[c] for c in CHAT_COLUMNS if c in lower and lower[c] in dict(found_chat)),
                         found_chat[0][0])
        return finish(chat_format(preferred, reason_prefix))
    for make in (segments_format, instruction_format, text_format):
        fmt = make(reason_prefix)
        if fmt is not None:
            return finish(fmt)
    raise _no_format_error(None, columns)


MULTIMODAL_COLUMNS = ["images", "image", "videos", "video", "audios", "audio"]
MULTIMODAL_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "audio_url", "video",
                    "video_url", "file", "input_file"}
MULTIMODAL_PLACEHOLDERS = re.compile(r"<(image|video|audio)>")
MULTIMODAL = "multimodal data: snugtune trains text-only models"


def _refuse_multimodal_columns(records: list[dict], lower: dict[str, str]) -> None:
    for name in MULTIMODAL_COLUMNS:
        col = lower.get(name)
        if col is not None and any(r.get(col) not in (None, "", [], {}) for r in records[:DETECT_ROWS]):
            raise UserError(f"{MULTIMODAL} (column {col!r} holds {name.rstrip('s')} data)",
                            hint="train on text data, or drop the column (its placeholders too) to train on the text alone")


def _refuse_unlearned_labels(records: list[dict], lower: dict[str, str], text_col: str) -> None:
    """A text column beside a label column is a classification set. Read as plain text, the text
    would be learned and the label never seen: a run that trains without a word of warning and
    teaches nothing the user wanted. Said, with the mapping that trains on the label."""
    for name in LABEL_COLUMNS:
        col = lower.get(name)
        value = _first_value(records, col) if col is not None else None
        if col is None or col == text_col or isinstance(value, bool) or not isinstance(value, (str, int)):
            continue
        raise UserError(
            f"columns {text_col!r} and {col!r} look like a classification set (e.g. {col!r} = {_preview(value, 30)}): "
            f"as plain text only {text_col!r} would be learned and {col!r} never seen",
            hint=f"to teach the model to answer with the label: {columns_hint({'instruction': text_col, 'output': col})}; "
            f"to train on the text alone, {setting_hint('format', 'text')}",
        )


def _kto_label_column(records: list[dict], lower: dict[str, str]) -> Optional[str]:
    # KTO's true/false label beside a prompt and answer or a conversation (TRL's prompt/completion/
    # label, LLaMA-Factory's kto_tag); a text classification set's label alone is not one.
    if not any(c in lower for c in CHAT_COLUMNS + INSTRUCTION_ALIASES["output"]):
        return None
    for name in ("label", "kto_tag"):
        col = lower.get(name)
        if col is not None and isinstance(_first_value(records, col), bool):
            return col
    return None


def _refuse_preference(records: list[dict], lower: dict[str, str]) -> None:
    """Preference (DPO) and KTO data, refused by name with the mapping that trains on their good side."""
    chosen, rejected = lower.get("chosen"), lower.get("rejected")
    if chosen and rejected:
        value = _first_value(records, chosen)
        prompt_col = lower.get("prompt")
        if _message_keys(value) and prompt_col and _message_keys(_first_value(records, prompt_col)):
            shape, example = "each the reply to a shared prompt conversation", {"messages": prompt_col, "reply": chosen}
        elif _message_keys(value):
            shape, example = "each a whole conversation", {"messages": chosen}
        elif isinstance(value, dict):
            conv = next((lower[c] for c in CHAT_COLUMNS if c in lower), None)
            shape = "each the last reply of a shared conversation"
            example = {"messages": conv, "reply": chosen} if conv else {"messages": "my_conversation", "reply": chosen}
        else:
            prompt = next((lower[c] for c in INSTRUCTION_ALIASES["instruction"] if c in lower), None)
            shape = "each an answer to a prompt" if prompt else "each a whole text"
            example = {"instruction": prompt, "output": chosen} if prompt else {"text": chosen}
        raise UserError(
            f"preference (DPO) data: columns {chosen!r} and {rejected!r} pair a preferred and a rejected answer "
            f"({shape}); snugtune does supervised fine-tuning, not preference optimisation",
            hint=f"to fine-tune on the preferred answers (SFT on the chosen side), map them: {columns_hint(example)}",
        )
    label = _kto_label_column(records, lower)
    if label:
        conv = next((lower[c] for c in CHAT_COLUMNS if c in lower), None)
        prompt = next((lower[c] for c in INSTRUCTION_ALIASES["instruction"] if c in lower), None)
        answer = next((lower[c] for c in INSTRUCTION_ALIASES["output"] if c in lower), None)
        if conv:
            example = {"messages": conv}
        elif prompt and answer and _message_keys(_first_value(records, prompt)):
            example = {"messages": prompt, "reply": answer}  # TRL's conversational KTO
        else:
            example = {"instruction": prompt or "my_prompt", "output": answer or "my_answer"}
        raise UserError(
            f"KTO data: column {label!r} marks each answer desirable (true) or not (false); snugtune does "
            "supervised fine-tuning, not KTO",
            hint=f"to fine-tune on the answers marked true only, map the columns: {columns_hint(example)}; "
            f"rows whose {label!r} is false are then left out (and counted)",
        )


def _no_format_error(kind: Optional[str], columns: list[str]) -> UserError:
    needs = {
        "instruction": "an instruction column (instruction/prompt/question/query) and an answer column "
        "(output/response/answer/completion)",
        "chat": "a column of message lists (messages/conversations)",
        "segments": "a column of axolotl segments ({\"label\", \"text\"} lists)",
        "text": "a text column (text/content/body/document)",
    }
    what = needs[kind] if kind else "; or ".join(needs[k] for k in ("instruction", "chat", "text"))
    example = {
        "instruction": {"instruction": "my_question", "output": "my_answer"},
        "chat": {"messages": "my_dialogue"},
        "segments": {"segments": "my_segments"},
        "text": {"text": "my_text"},
    }
    typos = _near_misses(columns, kind)
    if typos:
        said = "; ".join(f"column {c!r} looks like {a!r} misspelt" for c, (a, f) in typos.items())
        return UserError(
            f"cannot tell the data's format: it needs {what}; its columns are: {', '.join(map(str, columns))} "
            f"({said})",
            hint="rename the column in the file, or map it: " + columns_hint({f: c for c, (a, f) in typos.items()}),
        )
    return UserError(
        f"cannot tell the data's format: it needs {what}; its columns are: {', '.join(map(str, columns)) or '(none)'}",
        hint="map your columns, e.g. " + columns_hint(example[kind or "instruction"]),
    )


def _near_misses(columns: list[str], kind: Optional[str]) -> dict[str, tuple[str, str]]:
    """Columns that are a known name misspelt (`instrucion`, `outptu`, `mesages`) -> (that name, the
    field it means). difflib's ratio 0.8 takes one or two wrong letters in a name of 6+, not `input`
    for `output` (0.73) or `query` for `quest` (0.6)."""
    import difflib

    known: dict[str, str] = {}
    if kind in (None, "instruction"):
        for fld, aliases in INSTRUCTION_ALIASES.items():
            known.update({a: fld for a in aliases})
    if kind in (None, "chat"):
        known.update({c: "messages" for c in CHAT_COLUMNS})
    if kind in (None, "text"):
        known.update({c: "text" for c in TEXT_COLUMNS})
    out = {}
    for col in map(str, columns):
        if col.lower() in known:
            continue
        match = difflib.get_close_matches(col.lower(), list(known), n=1, cutoff=0.8)
        if match:
            out[col] = (match[0], known[match[0]])
    return out


def _preview(value: Any, width: int = 60) -> str:
    s = json.dumps(value, ensure_ascii=False, default=str)
    return s if len(s) <= width else s[: width - 3] + "..."


# ---- rows: checked, and turned into conversations ----------------------------------------------


class _RowProblem(Exception):
    """What makes one row unusable (collected per row by check_records)."""


class Conversation(NamedTuple):
    """A chat or instruction sample as the chat template takes it, plus what is learned.

    messages: role/content dicts (assistant messages may carry `tool_calls`, tool results have
    role 'tool'); learned: per message, whether its text is learned; tools: the tool
    definitions offered to the model (OpenAI/transformers JSON-schema form) or None.
    """

    messages: list[dict]
    learned: list[bool]
    tools: Optional[list[dict]]


def check_records(records: list[dict], fmt: DataFormat, source: str = "") -> DataFormat:
    """Raise a UserError naming the file, the rows (1-based) and field if any row lacks what its
    format needs; return the format, marked `tools` when any sample has tool calls or tools."""
    bad: list[tuple[int, str]] = []
    tools = False
    for i, r in enumerate(records, 1):
        try:
            tools |= _check_row(r, fmt)
        except _RowProblem as exc:
            if str(exc).startswith(MULTIMODAL):
                where = f"{source}, {_row_where(records, i)}" if source else _row_where(records, i)
                raise UserError(f"{exc} ({where})", hint="train on text data; snugtune cannot read images, "
                                "audio or video") from None
            bad.append((i, str(exc)))
    if bad:
        shown = "; ".join(f"{_row_where(records, i)}: {p}" for i, p in bad[:LIST_BAD_ROWS])
        more = f" (and {len(bad) - LIST_BAD_ROWS} more rows)" if len(bad) > LIST_BAD_ROWS else ""
        where = f"{source}: " if source else ""
        raise UserError(
            f"{where}{len(bad)} of {len(records)} samples cannot be used as {fmt.kind} data: {shown}{more}",
            hint="fix or remove those rows, or map the right columns (data.columns)",
        )
    return replace(fmt, tools=tools) if tools != fmt.tools else fmt


def _check_row(r: dict, fmt: DataFormat) -> bool:
    """Raise _RowProblem if the row cannot be used; return whether it involves tools."""
    if fmt.kind in ("chat", "instruction"):
        conv = to_conversation(r, fmt)
        if fmt.kind == "chat" and not any(m["role"] == "assistant" for m in conv.messages):
            raise _RowProblem(f"{fmt.columns['messages']!r} has no assistant message (nothing to learn)")
        # An empty answer (a spreadsheet's blank cell, "output": "") would teach the model to stop
        # at once: a row still to be filled in, not an answer.
        if fmt.kind == "instruction" and not conv.messages[-1]["content"].strip():
            raise _RowProblem(f"field 'output' (column {fmt.columns['output']!r}) is empty")
        to_learn = [m for m, learn in zip(conv.messages, conv.learned) if learn and m["role"] == "assistant"]
        if fmt.kind == "chat" and to_learn and not any((m.get("content") or "").strip() or m.get("tool_calls")
                                                       for m in to_learn):
            raise _RowProblem(f"{fmt.columns['messages']!r}: every assistant message to learn is empty")
        for m in conv.messages:  # where LLaMA-Factory puts them: the prompt side (answers may quote HTML)
            if m["role"] in ("user", "system"):
                _no_placeholder(m["content"])
        return bool(conv.tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in conv.messages)
    if fmt.kind == "segments":
        _segments_of(r, fmt)
        return False
    col = fmt.columns["text"]
    v = r.get(col)
    if _missing(v):
        raise _RowProblem(f"field 'text' (column {col!r}) is missing")
    _field_text(v, "text", col)
    return False


def _no_placeholder(text: str) -> None:
    m = MULTIMODAL_PLACEHOLDERS.search(text)
    if m:
        raise _RowProblem(f"{MULTIMODAL} (an {m.group(0)} placeholder in the text)")


def _missing(v: Any) -> bool:
    """None, or NaN: pandas' missing value, which a DataFrame's float column writes to Parquet
    and JSON (`NaN`) where a cell was empty; read as text it would teach the model to say "nan"."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def _field_text(v: Any, fld: str, col: str) -> str:
    """A field's text. A number is read as its text, deliberately: answers such as 5 or 3.5 are
    common in arithmetic and extraction sets, and JSON/Parquet/pyarrow hand them over typed; the
    digits are what the model should write. true/false, lists and objects are refused: they have
    no one obvious text (a list could be turns, parts or several answers)."""
    if _missing(v):
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise _RowProblem(f"field {fld!r} (column {col!r}) is not text: {_preview(v, 40)}")


def _norm_role(role: Any) -> Optional[str]:
    if not isinstance(role, str):
        return None
    return ROLES.get(role.strip().lower())


def _content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or content parts [{"type": "text", "text"|"value": ...}]
    joined (as chat templates concatenate text parts); any image/audio/video part is refused."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        return str(content)
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = []
        for p in content:
            kind = str(p.get("type", "text")).lower()
            if kind in MULTIMODAL_PARTS:
                raise _RowProblem(f"{MULTIMODAL} (an {kind!r} content part in {where})")
            text = p.get("text", p.get("value", p.get("content")))
            if kind != "text" or not isinstance(text, str):
                raise _RowProblem(f"{where}: content part of type {kind!r} is not text")
            texts.append(text)
        return "".join(texts)
    raise _RowProblem(f"{where}: the content is not text: {_preview(content, 40)}")


def _is_parts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(p, dict) and "type" in p for p in value)


def _turn_learned(m: dict, where: str) -> Optional[bool]:
    """A message's own training flag: OpenAI `weight` (0/1), axolotl `train`/`training`,
    LLaMA-Factory `loss_weight`; None when it has none. A weight above 0 counts as learned: the
    loss mask is on or off per token, so 0.5 learns like 1."""
    for key in TURN_FLAGS:
        if key in m and m[key] is not None:
            v = m[key]
            if isinstance(v, bool):
                return v
            if isinstance(v, (int, float)) and v >= 0:
                return v > 0
            raise _RowProblem(f"{where}: {key!r} must be true/false or a number >= 0, got {_preview(v, 20)}")
    return None


def _json_value(v: Any, where: str) -> Any:
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError as exc:
            raise _RowProblem(f"{where}: not valid JSON ({exc.msg}): {_preview(v, 40)}") from None
    return v


def _tool_calls(value: Any, where: str) -> list[dict]:
    """Tool calls in the form chat templates take: [{"type": "function", "function": {"name", "arguments"}}],
    `arguments` a dict (templates print it with tojson: a JSON string would come out quoted twice)."""
    value = _json_value(value, where)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _RowProblem(f"{where}: expected a tool call {{\"name\": ..., \"arguments\": ...}}, got {_preview(value, 40)}")
    calls = []
    for call in value:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _RowProblem(f"{where}: a tool call without a name: {_preview(call, 40)}")
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass  # arguments that are not JSON stay the text they are
        out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and call.get("id"):
            out["id"] = call["id"]
        calls.append(out)
    return calls


def _tools(value: Any, col: str) -> Optional[list[dict]]:
    """Tool definitions (a JSON string or a list, bare functions or {"type": "function", ...}) in the
    JSON-schema form transformers' apply_chat_template(tools=...) takes; None when there are none."""
    if value is None or value == "":
        return None
    value = _json_value(value, f"column {col!r}")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise _RowProblem(f"column {col!r}: expected a list of tools, got {_preview(value, 40)}")
    out = []
    for t in value:
        if not isinstance(t, dict):
            raise _RowProblem(f"column {col!r}: a tool is not an object: {_preview(t, 40)}")
        fn = t.get("function") if t.get("type") == "function" else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _RowProblem(f"column {col!r}: a tool without a name: {_preview(t, 40)}")
        out.append({"type": "function", "function": fn})
    return out or None


def to_conversation(record: dict, fmt: DataFormat) -> Conversation:
    """A chat or instruction sample as a Conversation; raises _RowProblem for an unusable row."""
    c = fmt.columns
    system = _field_text(record.get(c["system"]), "system", c["system"]) if "system" in c else ""
    msgs: list[dict] = []
    learned: list[bool] = []
    if system.strip():
        msgs.append({"role": "system", "content": system})
        learned.append(False)
    tools = _tools(record.get(c["tools"]), c["tools"]) if "tools" in c else None
    if fmt.kind == "instruction":
        for fld in ("instruction", "output"):
            if _missing(record.get(c[fld])):
                raise _RowProblem(f"field {fld!r} (column {c[fld]!r}) is missing")
        for q, a in _history(record, fmt):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            learned += [False, True]
        instruction = _field_text(record.get(c["instruction"]), "instruction", c["instruction"])
        extra = _field_text(record.get(c["input"]), "input", c["input"]) if "input" in c else ""
        # Only the parts that hold text: an empty instruction leaves no blank lines before the input.
        user = "\n\n".join(p for p in (instruction, extra) if p.strip())
        msgs += [{"role": "user", "content": user},
                 {"role": "assistant", "content": _field_text(record.get(c["output"]), "output", c["output"])}]
        learned += [False, True]
        return Conversation(msgs, learned, tools)
    if fmt.kind != "chat":
        raise ValueError(f"{fmt.kind} samples have no messages")
    col = c["messages"]
    turns = _json_list(record.get(col))  # a CSV cell may hold the JSON of the list
    if not isinstance(turns, list) or not turns:
        raise _RowProblem(f"field {col!r} is missing or not a list of messages")
    rk, ck = fmt.message_keys or ("role", "content")
    had_system = bool(system.strip())
    _append_turns(turns, col, rk, ck, msgs, learned, had_system)
    if "reply" in c:
        rcol = c["reply"]
        reply = record.get(rcol)
        if isinstance(reply, list) and reply and all(isinstance(m, dict) for m in reply):
            # a list of messages (TRL's conversational preference data: prompt, then chosen)
            keys = _message_keys(reply) or (rk, ck)
            _append_turns(reply, rcol, keys[0], keys[1], msgs, learned, False)
        else:
            if isinstance(reply, dict):
                reply = reply.get(ck, reply.get("content", reply.get("value")))
            if reply is None:
                raise _RowProblem(f"field 'reply' (column {rcol!r}) is missing")
            msgs.append({"role": "assistant", "content": _content_text(reply, f"column {rcol!r}")})
            learned.append(True)
    return Conversation(msgs, learned, tools)


def _append_turns(turns: list, col: str, rk: str, ck: str, msgs: list[dict], learned: list[bool],
                  had_system: bool) -> None:
    """Each message of `turns` normalised onto msgs (and whether it is learned onto learned)."""
    for j, m in enumerate(turns, 1):
        where = f"message {j} of {col!r}"
        if not isinstance(m, dict) or rk not in m:
            raise _RowProblem(f"{where} lacks {rk!r} or {ck!r}")
        role = _norm_role(m[rk])
        if role is None:
            raise _RowProblem(f"{where} has unknown role {m[rk]!r} (expected system, user, assistant or tool; "
                              "sharegpt: human, gpt, function_call, observation)")
        if role == "tool_call":  # sharegpt's function_call turn: the assistant calls a tool
            msg = {"role": "assistant", "content": "", "tool_calls": _tool_calls(m.get(ck), where)}
        else:
            # OpenAI's tool_calls, or its older single function_call
            calls = (m.get("tool_calls") or m.get("function_call")) if role == "assistant" else None
            if m.get(ck) is None and not calls:
                raise _RowProblem(f"{where} lacks {rk!r} or {ck!r}")
            content = m.get(ck)
            if role == "tool" and isinstance(content, (dict, list)) and not _is_parts(content):
                content = json.dumps(content, ensure_ascii=False)  # a structured result, as the tool returned it
            msg = {"role": role, "content": _content_text(content, where)}
            if calls:
                msg["tool_calls"] = _tool_calls(calls, where)
            if role == "tool" and isinstance(m.get("tool_call_id"), str):
                msg["tool_call_id"] = m["tool_call_id"]
        # OpenAI's `name`: the speaker of a multi-party chat, the function a tool result came from.
        # Kept for a template that renders it (render() counts the names a template has no place for).
        if isinstance(m.get("name"), str) and m["name"].strip() and msg["role"] != "system":
            msg["name"] = m["name"]
        flag = _turn_learned(m, where)
        if role == "system" and j == 1 and had_system:
            msgs[0] = msg  # the row's own system message wins over the system column
            continue
        msgs.append(msg)
        learned.append(flag if flag is not None else msg["role"] == "assistant")


def _history(record: dict, fmt: DataFormat) -> list[tuple[str, str]]:
    """Alpaca `history`: earlier [instruction, answer] pairs, oldest first."""
    col = fmt.columns.get("history")
    value = record.get(col) if col else None
    if value in (None, "", []):
        return []
    value = _json_value(value, f"column {col!r}")
    pairs = []
    for pair in value if isinstance(value, list) else [None]:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _RowProblem(f"column {col!r}: expected a list of [instruction, answer] pairs, got {_preview(value, 40)}")
        pairs.append((_field_text(pair[0], "history", col), _field_text(pair[1], "history", col)))
    return pairs


def to_messages(record: dict, fmt: DataFormat) -> list[dict]:
    """A sample as role/content messages (instruction samples become system?/user/assistant)."""
    try:
        return to_conversation(record, fmt).messages
    except _RowProblem as exc:
        raise UserError(str(exc)) from None


def _segments_of(record: dict, fmt: DataFormat) -> list[Segment]:
    col = fmt.columns["segments"]
    value = _json_value(record.get(col), f"column {col!r}")
    if not isinstance(value, list) or not value:
        raise _RowProblem(f"field 'segments' (column {col!r}) is missing or not a list")
    out = []
    for k, s in enumerate(value, 1):
        if not isinstance(s, dict) or not isinstance(s.get("text"), str):
            raise _RowProblem(f"segment {k} of {col!r} has no text")
        out.append(Segment(s["text"], bool(s.get("label", True))))
    return out


# ---- rendering ---------------------------------------------------------------------------------


def template_name(fmt: DataFormat, tokenizer, data_cfg: DataConfig) -> str:
    """How samples of this format become text: 'chat_template' (the tokenizer's), 'builtin', 'text'
    (plain text) or 'segments' (axolotl's, as given). Data with tool calls takes the built-in
    template where the tokenizer's cannot render tools (it would drop them silently)."""
    if fmt.kind in ("text", "segments"):
        return fmt.kind
    if data_cfg.template == "auto" and getattr(tokenizer, "chat_template", None):
        if not fmt.tools or template_supports_tools(tokenizer):
            return "chat_template"
    return "builtin"


@functools.lru_cache(maxsize=8)
def template_supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tool definitions, tool calls and tool results:
    a probe conversation, rendered, must show all three (a template without tool support renders
    without error and leaves them out)."""
    tools = [{"type": "function", "function": {"name": "snugtune_probe_tool", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "snugtune_probe_call", "arguments": {"x": 1}}}]},
            {"role": "tool", "content": "snugtune_probe_result"}]
    try:
        out = tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that raises on tools does not support them
        return False
    return all(s in out for s in ("snugtune_probe_tool", "snugtune_probe_call", "snugtune_probe_result"))


@functools.lru_cache(maxsize=8)
def template_renders_names(tokenizer) -> bool:
    """Whether the tokenizer's chat template puts a message's `name` in the text (a multi-speaker
    chat's speaker, a tool result's function): a probe name must appear in the rendering."""
    msgs = [{"role": "user", "content": "hi", "name": "snugtune_probe_speaker"},
            {"role": "assistant", "content": "hello", "name": "snugtune_probe_speaker"}]
    try:
        out = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that raises on names does not take them
        return False
    return "snugtune_probe_speaker" in out


def unseen_names(records: list[dict], fmt: DataFormat, tokenizer, data_cfg: DataConfig) -> int:
    """How many messages carry a `name` that the rendering leaves out (the built-in layout, or a
    chat template that has no place for names): said by data inspect, train and the wizard."""
    if fmt.kind not in ("chat", "instruction"):
        return 0
    if template_name(fmt, tokenizer, data_cfg) == "chat_template" and template_renders_names(tokenizer):
        return 0
    n = 0
    for r in records:
        try:
            n += sum(1 for m in to_conversation(r, fmt).messages if m.get("name"))
        except _RowProblem:
            continue  # said by render() with its row
    return n


@functools.lru_cache(maxsize=8)
def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front when it encodes text on its own (Llama does, Qwen not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def _render_all(records: list[dict], fmt: DataFormat, tokenizer, data_cfg: DataConfig,
                filtered: int = 0) -> list[list[Segment]]:
    """render() of each record; a sample the template cannot render is named by file and row
    (the template's own message said neither)."""
    out = []
    for i, r in enumerate(records, 1):
        try:
            out.append(render(r, fmt, tokenizer, data_cfg))
        except UserError as exc:
            where = _row_where(records, i) if not filtered else f"sample {i} (after {filtered} rows left out)"
            raise UserError(f"{data_cfg.path}, {where}: {exc.message}", hint=exc.hint) from None
    return out


def render(record: dict, fmt: DataFormat, tokenizer, data_cfg: DataConfig) -> list[Segment]:
    """The sample as text segments, each trained or masked, exactly in the order the model reads them.

    Text: all trained. Segments: as given (axolotl's template-free format carries its own BOS/EOS).
    Instruction and chat: every assistant reply (tool calls included) trained, with the end-of-
    sequence token that tells the model to stop, unless the turn's weight says otherwise;
    everything else (system prompt, tool definitions, user turns, tool results) masked. The
    tokenizer's chat template is used when `template='auto'` and it has one; else snugtune's
    built-in template.
    """
    eos = tokenizer.eos_token or ""
    head = [Segment(tokenizer.bos_token, False)] if _adds_bos(tokenizer) else []
    if fmt.kind == "text":
        text = _text(record.get(fmt.columns["text"]))
        return head + [Segment(text + eos, True)] if text.strip() else []
    if fmt.kind == "segments":
        return _segments_of(record, fmt)
    try:
        conv = to_conversation(record, fmt)
    except _RowProblem as exc:
        raise UserError(str(exc)) from None
    if template_name(fmt, tokenizer, data_cfg) == "chat_template":
        if not template_renders_names(tokenizer) and any(m.get("name") for m in conv.messages):
            # a template that has no place for names: rendered as if they were not there (counted,
            # said once by unseen_names), never half-rendered by a template that trips on the key
            conv = Conversation([{k: v for k, v in m.items() if k != "name"} for m in conv.messages],
                                conv.learned, conv.tools)
        segments = _render_chat_template(conv, tokenizer)
        if eos and any(s.trained for s in segments) and not any(s.trained and eos in s.text for s in segments):
            # The template ends a turn with its own marker (e.g. <|im_end|>) while generation stops
            # at another EOS: teach that EOS too, or the tuned model would not stop.
            segments.append(Segment(eos, True))
        return segments
    if fmt.kind == "instruction":
        return head + _render_builtin_instruction(record, fmt, eos)
    return head + _render_builtin_chat(conv, eos)


def _text(v: Any) -> str:
    return "" if v is None else v if isinstance(v, str) else str(v)


def _render_builtin_instruction(record: dict, fmt: DataFormat, eos: str) -> list[Segment]:
    # The Alpaca layout: widely known, and readable in a preview. Earlier turns (alpaca `history`)
    # come first, each in the same layout, each answer learned as multi-turn chat replies are.
    c = fmt.columns
    system = _text(record.get(c["system"])) if "system" in c else ""
    segs: list[Segment] = []
    pending = f"{system}\n\n" if system.strip() else ""
    for q, a in _history(record, fmt):
        pending += f"### Instruction:\n{q}\n\n### Response:\n"
        segs += [Segment(pending, False), Segment(a + eos, True)]
        pending = "\n\n"
    instruction = _text(record.get(c["instruction"]))
    extra = _text(record.get(c["input"])) if "input" in c else ""
    if instruction.strip():
        pending += f"### Instruction:\n{instruction}\n\n"
        if extra.strip():
            pending += f"### Input:\n{extra}\n\n"
    elif extra.strip():  # no instruction: the input is the instruction (no empty block, no blank lines)
        pending += f"### Instruction:\n{extra}\n\n"
    pending += "### Response:\n"
    return segs + [Segment(pending, False), Segment(_text(record.get(c["output"])) + eos, True)]


BUILTIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n",
                   "tool": "### Tool result:\n"}


def _tool_call_text(call: dict) -> str:
    fn = call.get("function", call)
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": fn.get("arguments", {})},
                                        ensure_ascii=False) + "\n</tool_call>"


def _render_builtin_chat(conv: Conversation, eos: str) -> list[Segment]:
    """snugtune's built-in chat layout (documented in the README's "Your data"):

        ### System:\\n{system}\\n\\n### Tools:\\n{one JSON tool definition a line}\\n\\n
        ### User:\\n{text}\\n\\n### Assistant:\\n{reply}<tool_call>\\n{"name", "arguments"}\\n</tool_call>{eos}
        \\n\\n### Tool result:\\n{result}\\n\\n### Assistant:\\n...

    Replies (and their tool calls) learned; everything else read only."""
    segs: list[Segment] = []
    pending = ""
    msgs, learned = list(conv.messages), list(conv.learned)
    if msgs and msgs[0]["role"] == "system":
        pending += f"{BUILTIN_HEADERS['system']}{msgs[0]['content']}\n\n"
        msgs, learned = msgs[1:], learned[1:]
    if conv.tools:
        pending += "### Tools:\n" + "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in conv.tools) + "\n\n"
    for m, learn in zip(msgs, learned):
        if m["role"] == "assistant":
            body = m["content"]
            calls = "\n".join(_tool_call_text(c) for c in m.get("tool_calls") or [])
            if calls:
                body = f"{body}\n{calls}" if body.strip() else calls
            segs.append(Segment(pending + BUILTIN_HEADERS["assistant"], False))
            segs.append(Segment(body + eos, learn))
            pending = "\n\n"
        elif learn:
            segs += [Segment(pending, False), Segment(f"{BUILTIN_HEADERS[m['role']]}{m['content']}\n\n", True)]
            pending = ""
        else:
            pending += f"{BUILTIN_HEADERS[m['role']]}{m['content']}\n\n"
    if pending.strip():
        segs.append(Segment(pending, False))
    return [s for s in segs if s.text]


def render_prompt(tokenizer, data_cfg: DataConfig, messages: list[dict], kind: Optional[str] = None) -> str:
    """The text that asks the tuned model for its next reply, laid out as its training data was.

    messages: role/content dicts ending with the user's turn. kind: the trained data's format
    ('instruction' or 'chat'; build_datasets' info["format"]); by default data_cfg.format, and
    for 'auto' instruction layout for a single turn, chat layout with history. Tokenize the
    result with add_special_tokens=False: it already holds BOS where the model expects one.
    """
    fmt_kind = kind or (data_cfg.format if data_cfg.format in ("instruction", "chat") else None)
    probe = DataFormat(fmt_kind or "chat", {}, "")
    if template_name(probe, tokenizer, data_cfg) == "chat_template":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = tokenizer.bos_token if _adds_bos(tokenizer) else ""
    turns = [m for m in messages if m["role"] != "system"]
    if fmt_kind == "instruction" or (fmt_kind is None and len(turns) == 1):
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        earlier = [[q["content"], a["content"]] for q, a in zip(turns[:-1:2], turns[1:-1:2])]
        record = {"instruction": turns[-1]["content"], "output": "", "system": system, "history": earlier}
        fmt = DataFormat("instruction", {"instruction": "instruction", "output": "output", "system": "system",
                                         "history": "history"}, "")
        segs = _render_builtin_instruction(record, fmt, tokenizer.eos_token or "")
        return head + "".join(s.text for s in segs[:-1])
    conv = Conversation(messages, [m["role"] == "assistant" for m in messages], None)
    return head + "".join(s.text for s in _render_builtin_chat(conv, tokenizer.eos_token or "")) + "### Assistant:\n"


def _render_chat_template(conv: Conversation, tokenizer) -> list[Segment]:
    """Split the template's rendering into masked prompt and trained replies.

    For each assistant turn: the conversation before it with the generation prompt is the
    prompt; the conversation through it, minus that prompt, is the reply (learned unless its
    weight says not). A non-assistant turn flagged to be learned is the text it adds. This only
    works when rendering is append-only (an earlier rendering is a prefix of a later one), so it
    is checked.
    """
    messages = conv.messages

    def apply(msgs: list[dict], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tools=conv.tools, tokenize=False, add_generation_prompt=gen)
        except Exception as exc:  # jinja errors: e.g. a template that rejects a system message
            raise UserError(
                f"the tokenizer's chat template cannot render this sample ({type(exc).__name__}: {exc})",
                hint=f"use snugtune's built-in template: {setting_hint('template', 'builtin')}",
            ) from None

    def rewritten() -> UserError:
        return UserError(
            "the tokenizer's chat template renders a conversation differently once later turns are "
            "added (e.g. it drops earlier reasoning), so prompts and replies cannot be told apart",
            hint=f"use snugtune's built-in template: {setting_hint('template', 'builtin')}",
        )

    segs: list[Segment] = []
    done = last_full = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i == 0:
            # a conversation that opens with the assistant (a ShareGPT greeting): no prompt comes
            # before it and templates refuse to render none, so the turn's own header (the text
            # before its content) is the prompt, as in the built-in layout
            full = apply(messages[:1], False)
            at = full.find(m.get("content") or "\x00") if (m.get("content") or "").strip() else -1
            segs += ([Segment(full[:at], False), Segment(full[at:], conv.learned[0])] if at >= 0
                     else [Segment(full, False)])
        elif m["role"] == "assistant":
            prompt = apply(messages[:i], True)
            full = apply(messages[: i + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise rewritten()
            segs += [Segment(prompt[len(done):], False), Segment(full[len(prompt):], conv.learned[i])]
        elif conv.learned[i]:
            full = apply(messages[: i + 1], False)
            if not full.startswith(done):
                raise rewritten()
            segs.append(Segment(full[len(done):], True))
        else:
            continue
        done = last_full = full
    # Usually the conversation ends with the last reply, rendered already (one template call saved).
    whole = last_full if messages and messages[-1]["role"] == "assistant" else apply(messages, False)
    rest = whole[len(done):]
    if rest:
        segs.append(Segment(rest, False))
    return [s for s in segs if s.text]


# ---- tokenizing --------------------------------------------------------------------------------


def _tokenize_many(samples: list[list[Segment]], tokenizer, train_on_responses_only: bool,
                   chunk: int = 2048) -> list[tuple[list[int], list[int]]]:
    """Untruncated (input_ids, labels) per sample. Segments are encoded in large batches: one call
    per few thousand pieces lets a fast tokenizer work in parallel, 10x quicker than one by one."""
    flat = [seg for segs in samples for seg in segs]
    pieces: list[list[int]] = []
    for start in range(0, len(flat), chunk):
        # Each piece on its own and without added specials: the template already holds BOS/EOS,
        # and the prompt is tokenized the way it will be at inference (alone, then generation).
        texts = [seg.text for seg in flat[start : start + chunk]]
        # verbose=False: no "Token indices sequence length is longer than ... will result in
        # indexing errors" for a long sample; snugtune cuts or splits it and says so itself
        pieces += tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    out = []
    k = 0
    for segs in samples:
        ids: list[int] = []
        labels: list[int] = []
        for seg in segs:
            piece = pieces[k]
            k += 1
            ids += piece
            labels += piece if (seg.trained or not train_on_responses_only) else [IGNORE_INDEX] * len(piece)
        out.append((ids, labels))
    return out


def tokenize(segments: list[Segment], tokenizer, max_seq_len: int, train_on_responses_only: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels (the ids where trained, -100 where masked), truncated to max_seq_len."""
    ids, labels = _tokenize_many([segments], tokenizer, train_on_responses_only)[0]
    return ids[:max_seq_len], labels[:max_seq_len]


# ---- packing, padding --------------------------------------------------------------------------


def pack(examples: list[dict], max_seq_len: int) -> list[dict]:
    """Pack samples into rows of at most max_seq_len tokens (best-fit decreasing).

    Longest samples first, each into the fullest row it still fits (a greedy bin packing that
    wastes less than first-fit and runs in O(n log n)). Each row: `input_ids`, `labels`,
    `position_ids` restarting at 0 per sample (which is what keeps samples from attending to
    each other), and label -100 on each sample's first token, so no token is predicted from the
    end of the previous sample.
    """
    import bisect

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []  # indices of examples, per row
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        n = len(examples[i]["input_ids"])
        if n == 0:
            continue
        if n > max_seq_len:
            raise ValueError(f"sample of {n} tokens is longer than max_seq_len={max_seq_len}; truncate first")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (space - n, r))
        else:
            rows.append([i])
            bisect.insort(free, (max_seq_len - n, len(rows) - 1))
    packed = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in members:
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX] + list(ex["labels"][1:])
            pos += range(len(ex["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return packed


def collate(rows: list[dict], pad_token_id: int, pad_packed_to: int = 0) -> dict:
    """A micro-batch of rows as tensors for the model, padded on the right to the longest row.

    Packed rows (they carry position_ids): no attention_mask; padding gets position_ids that
    restart at 0, so it is a sample of its own that no real token attends to; with
    `pad_packed_to` they are padded to that width (one shape for every micro-batch, which
    CUDA-graph steps need). Unpacked rows: an attention_mask (0 on padding). Labels are -100
    on padding either way.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    packed = all("position_ids" in r for r in rows)
    if packed and pad_packed_to > width:
        width = pad_packed_to
    ids, labels, pos, mask = [], [], [], []
    for r in rows:
        n = len(r["input_ids"])
        pad = width - n
        ids.append(list(r["input_ids"]) + [pad_token_id] * pad)
        labels.append(list(r["labels"]) + [IGNORE_INDEX] * pad)
        if packed:
            pos.append(list(r["position_ids"]) + list(range(pad)))
        else:
            pos.append(list(range(width)))
            mask.append([1] * n + [0] * pad)
    batch = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
    }
    if not packed:
        batch["attention_mask"] = torch.tensor(mask, dtype=torch.long)
    return batch


def _group_by_length(examples: list[dict], seed: int, window: int = 64) -> list[dict]:
    """Shuffled, then sorted by length within windows: neighbours (a micro-batch) have similar
    lengths, so little padding, while the order across windows stays random."""
    out = list(examples)
    random.Random(seed).shuffle(out)
    for start in range(0, len(out), window):
        out[start : start + window] = sorted(out[start : start + window], key=lambda e: -len(e["input_ids"]))
    return out


def length_bucketed_order(lengths: list[int], batch_size: int, seed: int, bucket_batches: int = 50) -> list[int]:
    """One epoch's sample order for unpacked rows: micro-batches of like length, in random order.

    Shuffled, then sorted by length within buckets of `bucket_batches` micro-batches (little
    padding in each), cut into micro-batches, and those micro-batches shuffled across the whole
    epoch. transformers' group_by_length sampler stops after the sort: within each bucket the
    micro-batches run from longest to shortest, so for dozens of steps in a row every batch is
    one kind of sample wherever length follows content (a date task: 2-digit days, then 1-digit
    ones). The model chases each run and forgets the last: on Gemma 3 270M (H200, bench/real_weights.py,
    200 steps) the unpacked engine's loss jumped back to 1.5-2.6 at each run's start and scored
    75-92/128 held out, against 128/128 for the same rows sampled at random.
    The last, short micro-batch stays last, so the DataLoader's cuts fall on the micro-batches.
    """
    n = len(lengths)
    if n == 0:
        return []
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    size = max(1, batch_size) * max(1, bucket_batches)
    for s in range(0, n, size):
        order[s:s + size] = sorted(order[s:s + size], key=lambda i: -lengths[i])
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    tail = [batches.pop()] if len(batches[-1]) < batch_size else []
    rng.shuffle(batches)
    return [i for b in batches + tail for i in b]


class LengthBucketSampler:
    """A DataLoader sampler over unpacked rows: length_bucketed_order, a new order each epoch
    (seeded by seed and epoch, so a resumed run replays the same order and skips what it trained)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(length_bucketed_order(self.lengths, self.batch_size, self.seed * 1_000_003 + self.epoch))


# ---- statistics --------------------------------------------------------------------------------


def length_stats(lengths: list[int], max_seq_len: int, bins: int = 12) -> dict:
    """Token-length summary for the wizard: count, mean, p50, p95, max, share truncated, histogram.

    `lengths` are untruncated lengths; `truncated_share` is the share longer than max_seq_len.
    The histogram has at most `bins` bins of a round width (1, 2 or 5 x 10^k) from 0 past the
    longest sample: `edges` (one more than `counts`) and `counts`.
    """
    n = len(lengths)
    if n == 0:
        return {"count": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0, "max_seq_len": max_seq_len,
                "truncated": 0, "truncated_share": 0.0, "histogram": {"edges": [], "counts": []}}
    s = sorted(lengths)

    def pct(p: float) -> int:  # nearest-rank percentile: always a length that occurs
        return s[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))]

    width = _round_up(s[-1] / bins)
    counts = [0] * (s[-1] // width + 1)
    for v in s:
        counts[v // width] += 1
    truncated = sum(1 for v in s if v > max_seq_len)
    return {
        "count": n,
        "mean": round(sum(s) / n, 1),
        "p50": pct(50),
        "p95": pct(95),
        "max": s[-1],
        "max_seq_len": max_seq_len,
        "truncated": truncated,
        "truncated_share": round(truncated / n, 4),
        "histogram": {"edges": [i * width for i in range(len(counts) + 1)], "counts": counts},
    }


def _round_up(x: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is >= x."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if step * m >= x:
                return step * m
        step *= 10


# ---- the whole pipeline ------------------------------------------------------------------------


def prepare(data_cfg: DataConfig) -> tuple[DataFormat, list[dict], int]:
    """Load, detect and check: the format, the records to use and how many were left out (KTO
    rows whose label is false: never learned)."""
    records = load_records(data_cfg)
    fmt = detect_format(records, data_cfg)
    fmt = check_records(records, fmt, source=data_cfg.path)
    if not fmt.label_column:
        return fmt, records, 0
    kept = [r for r in records if r.get(fmt.label_column) in (True, 1, "true", "True")]
    if not kept:
        raise UserError(f"{data_cfg.path}: every one of the {len(records)} samples has {fmt.label_column!r} "
                        "false: there is nothing to learn from",
                        hint="only answers marked true are trained on")
    return fmt, kept, len(records) - len(kept)


def _examples(tokenized: list[tuple[list[int], list[int]]], fmt: DataFormat, data_cfg: DataConfig):
    """Samples cut to max_seq_len (plain text split into windows unless data.long_samples =
    'truncate'), those with nothing to learn left out; with the untruncated lengths and a count
    of everything cut or dropped. Returns (examples, full_lengths, counts, windows per sample)."""
    n = data_cfg.max_seq_len
    split = fmt.kind == "text" and data_cfg.long_samples == "split"
    counts = {"empty": 0, "no_target": 0, "truncated": 0, "split": 0, "windows": 0}
    examples, full_lengths, per_sample = [], [], []
    for ids, labels in tokenized:
        full_lengths.append(len(ids))
        if not ids:
            counts["empty"] += 1
            per_sample.append(0)
            continue
        if len(ids) > n and split:
            # A last window of a single token predicts nothing (its one label is never predicted):
            # it is left off rather than counted as a sample dropped.
            windows = [(ids[k:k + n], labels[k:k + n]) for k in range(0, len(ids), n) if len(ids) - k > 1]
            counts["split"] += 1
            counts["windows"] += len(windows)
        else:
            counts["truncated"] += len(ids) > n
            windows = [(ids[:n], labels[:n])]
        kept = 0
        for w_ids, w_labels in windows:
            # A label at position 0 is never predicted (nothing comes before it), so it doesn't count.
            if all(x == IGNORE_INDEX for x in w_labels[1:]):
                counts["no_target"] += 1
                continue
            examples.append({"input_ids": w_ids, "labels": w_labels})
            kept += 1
        per_sample.append(kept)
    return examples, full_lengths, counts, per_sample


def dropped_and_cut(counts: dict) -> list[str]:
    """One phrase for each kind of sample dropped or cut (the console, `data inspect`, the wizard)."""
    n = counts.get("max_seq_len")
    out = []
    if counts.get("filtered"):
        out.append(f"{counts['filtered']} left out (KTO label false: never learned)")
    if counts.get("empty"):
        out.append(f"{counts['empty']} dropped: empty")
    if counts.get("no_target"):
        out.append(f"{counts['no_target']} dropped: nothing to learn within max_seq_len={n}")
    if counts.get("truncated"):
        out.append(f"{counts['truncated']} cut at max_seq_len={n} (the rest is not trained on)")
    if counts.get("split"):
        out.append(f"{counts['split']} longer than max_seq_len={n} split into {counts['windows']} windows")
    if counts.get("duplicates"):
        d = counts["duplicates"]
        out.append(f"{d} {'is a duplicate' if d == 1 else 'are duplicates'} of an earlier sample (kept: trained on "
                   "again, and a copy held out for evaluation flatters the eval loss; remove them to avoid that)")
    if counts.get("names_unseen"):
        k = counts["names_unseen"]
        out.append(f"{k} message{'s carry' if k != 1 else ' carries'} a name (speaker or tool) that the model will "
                   f"not see: {'the built-in template' if counts.get('template') != 'chat_template' else 'the chat template'}"
                   " has no place for names (put the name in the message's content to keep it)")
    if counts.get("no_eval"):
        out.append(f"no evaluation: data.eval_fraction={counts.get('eval_fraction')} needs 2 or more samples, "
                   f"there {'is' if counts['no_eval'] == 1 else 'are'} {counts['no_eval']}")
    return out


def duplicates(records: list[dict]) -> int:
    """How many samples are identical to an earlier one (every field compared)."""
    seen: set = set()
    dups = 0
    for r in records:
        key = json.dumps(r, sort_keys=True, ensure_ascii=False, default=str)
        dups += key in seen
        seen.add(key)
    return dups


def build_datasets(data_cfg: DataConfig, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """Training and evaluation rows (plain dicts of int lists) and a summary `info`.

    Samples are shuffled with data_cfg.seed, then eval_fraction of them held out. Train rows
    are packed when data_cfg.packing, else ordered so neighbours have similar lengths; eval
    rows are never packed. Long plain-text samples become several windows (data.long_samples);
    samples with nothing left to learn after truncation are dropped; both counted. info: format,
    format_detail, template, samples, train_samples, eval_samples, train_rows, eval_rows,
    truncated, dropped_no_target, counts (everything dropped or cut, see dropped_and_cut),
    packing, packing_efficiency, length_stats.
    """
    fmt, records, filtered = prepare(data_cfg)
    rendered = _render_all(records, fmt, tokenizer, data_cfg, filtered)
    tokenized = _tokenize_many(rendered, tokenizer, data_cfg.train_on_responses_only)
    examples, full_lengths, counts, per_sample = _examples(tokenized, fmt, data_cfg)
    counts.update(filtered=filtered, max_seq_len=data_cfg.max_seq_len, duplicates=duplicates(records),
                  names_unseen=unseen_names(records, fmt, tokenizer, data_cfg),
                  template=template_name(fmt, tokenizer, data_cfg))
    if not examples:
        raise UserError(
            f"none of the {len(records)} samples has any response token within max_seq_len={data_cfg.max_seq_len}"
            + (f" ({'; '.join(dropped_and_cut(counts))})" if dropped_and_cut(counts) else ""),
            hint=f"raise max_seq_len ({setting_hint('max_seq_len', 2 * data_cfg.max_seq_len)}), or shorten the prompts "
            "(a turn with weight 0 or train = false is not learned)",
        )
    rng = random.Random(data_cfg.seed)
    # The windows of one long text stay together, all in training or all held out: a window
    # evaluated beside its neighbours trained on would flatter the eval loss.
    groups, k = [], 0
    for kept in per_sample:
        if kept:
            groups.append(examples[k:k + kept])
            k += kept
    if len(groups) < 2:  # one text: its windows are all there is to hold out from
        groups = [[e] for e in examples]
    rng.shuffle(groups)
    n_eval = round(len(examples) * data_cfg.eval_fraction)
    if data_cfg.eval_fraction > 0 and len(examples) >= 2:
        n_eval = min(max(n_eval, 1), len(examples) - 1)  # keep at least one of each
    else:
        n_eval = 0
        if data_cfg.eval_fraction > 0:  # asked for, but one sample cannot be split: said, not silent
            counts.update(no_eval=len(examples), eval_fraction=data_cfg.eval_fraction)
    eval_ex, train_ex = [], []
    for i, group in enumerate(groups):
        # held out until n_eval windows are, never the last group (training keeps at least one)
        (eval_ex if len(eval_ex) < n_eval and i < len(groups) - 1 else train_ex).extend(group)
    if data_cfg.packing:
        train_rows = pack(train_ex, data_cfg.max_seq_len)
        rng.shuffle(train_rows)
    else:
        train_rows = _group_by_length(train_ex, data_cfg.seed)
    eval_rows = _group_by_length(eval_ex, data_cfg.seed)
    tokens = sum(len(r["input_ids"]) for r in train_rows)
    info = {
        "format": fmt.kind,
        "format_detail": fmt.to_dict(),
        "template": template_name(fmt, tokenizer, data_cfg),
        "samples": len(records) + filtered,
        "train_samples": len(train_ex),
        "eval_samples": len(eval_ex),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "train_tokens": tokens,
        "truncated": counts["truncated"],
        "dropped_no_target": counts["no_target"],
        "counts": counts,
        "dropped_and_cut": dropped_and_cut(counts),
        "packing": data_cfg.packing,
        "packing_efficiency": round(tokens / (len(train_rows) * data_cfg.max_seq_len), 4) if data_cfg.packing else None,
        "length_stats": length_stats(full_lengths, data_cfg.max_seq_len),
    }
    return train_rows, eval_rows, info


def load_tokenizer(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """A model's tokenizer, found and loaded the way the engine does it (core.model): `builtin:`
    names resolved, Hub problems said in one sentence, a pad token set where the model has none."""
    from core.config import RunConfig
    from core.model import load_tokenizer as engine_load_tokenizer
    from core.model import resolve_model_source

    model = {"name_or_path": name_or_path, "revision": revision, "trust_remote_code": trust_remote_code}
    cfg = RunConfig.from_dict({"model": {k: v for k, v in model.items() if v is not None}, "data": {"path": "(inspect)"}})
    # weights=False: a GGUF file's tokenizer is read from the file, its weights are not converted
    return engine_load_tokenizer(resolve_model_source(name_or_path, revision, weights=False), cfg)


def inspect(data_cfg: DataConfig, tokenizer_source: Any, n: int = 3, syntax: str = "inspect") -> dict:
    """A JSON-able preview: format, columns, the first n samples as the model sees them, lengths,
    and everything that would be dropped or cut.

    `tokenizer_source`: a model id or path, a `builtin:` name, or a tokenizer object. Each
    sample's `segments` are the decoded tokens after truncation (the first window, for a long
    text that is split), split where masking changes: [{"text": ..., "trained": bool}]; its
    `context` says what else it holds (system prompt, earlier turns, tool calls and results,
    turns not learned). Lengths and counts cover up to INSPECT_LENGTH_SAMPLES samples.
    `syntax`: whose syntax hints use ('inspect', 'wizard' or 'train').
    """
    with hint_syntax(syntax):
        return _inspect(data_cfg, tokenizer_source, n)


def _inspect(data_cfg: DataConfig, tokenizer_source: Any, n: int) -> dict:
    tokenizer = load_tokenizer(tokenizer_source) if isinstance(tokenizer_source, str) else tokenizer_source
    fmt, records, filtered = prepare(data_cfg)
    samples = []
    measured = records[:INSPECT_LENGTH_SAMPLES]
    rendered = _render_all(measured, fmt, tokenizer, data_cfg, filtered)
    tokenized = _tokenize_many(rendered, tokenizer, data_cfg.train_on_responses_only)
    _, lengths, counts, per_sample = _examples(tokenized, fmt, data_cfg)
    counts.update(filtered=filtered, max_seq_len=data_cfg.max_seq_len, duplicates=duplicates(records),
                  names_unseen=unseen_names(measured, fmt, tokenizer, data_cfg),
                  template=template_name(fmt, tokenizer, data_cfg))
    for i, (ids, labels) in enumerate(tokenized[:n]):
        kept, kept_labels = ids[: data_cfg.max_seq_len], labels[: data_cfg.max_seq_len]
        split = fmt.kind == "text" and data_cfg.long_samples == "split" and len(ids) > len(kept)
        samples.append({
            "index": i,
            "tokens": len(kept),
            "trained_tokens": sum(1 for x in kept_labels[1:] if x != IGNORE_INDEX),
            "truncated": len(ids) > len(kept) and not split,
            "windows": per_sample[i] if split else 1,
            "full_tokens": len(ids),
            "context": _context(records[i], fmt),
            "segments": _decoded_segments(kept, kept_labels, tokenizer),
        })
    template = template_name(fmt, tokenizer, data_cfg)
    note = None
    if fmt.tools and template == "builtin" and data_cfg.template == "auto" and getattr(tokenizer, "chat_template", None):
        note = "the tokenizer's chat template cannot render tools"
    return {
        "path": data_cfg.path,
        "samples_total": len(records) + filtered,
        "columns": [str(c) for c in _columns_of(records)],
        "format": fmt.to_dict(),
        "template": template,
        "template_note": note,
        "tokenizer": getattr(tokenizer, "name_or_path", "") or "",
        "max_seq_len": data_cfg.max_seq_len,
        "train_on_responses_only": data_cfg.train_on_responses_only,
        "samples": samples,
        "counts": counts,
        "dropped_and_cut": dropped_and_cut(counts),
        "counts_sampled": len(measured) < len(records),
        "length_stats": length_stats(lengths, data_cfg.max_seq_len),
        "length_stats_sampled": len(measured) < len(records),
    }


def _context(record: dict, fmt: DataFormat) -> dict:
    """What a sample holds besides its last exchange, for the preview: system prompt, earlier
    turns, tools offered, tool calls, tool results, turns not learned (weight 0 / train false)."""
    if fmt.kind not in ("chat", "instruction"):
        return {}
    conv = to_conversation(record, fmt)
    msgs = conv.messages
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=0)
    out = {
        "system": next((m["content"] for m in msgs if m["role"] == "system"), ""),
        "earlier_turns": sum(1 for m in msgs[:last_user] if m["role"] == "user"),
        "tools": [t["function"].get("name") for t in conv.tools or []],
        "tool_calls": sum(len(m.get("tool_calls") or []) for m in msgs),
        "tool_results": sum(1 for m in msgs if m["role"] == "tool"),
        "not_learned": sum(1 for m, learn in zip(msgs, conv.learned) if m["role"] == "assistant" and not learn),
    }
    return {k: v for k, v in out.items() if v}


def context_summary(context: dict) -> str:
    """The context of a sample in words, e.g. 'system prompt; 2 earlier turns; 1 tool call'."""
    bits = []
    if context.get("system"):
        bits.append("system prompt")
    if context.get("earlier_turns"):
        bits.append(f"{context['earlier_turns']} earlier turn{'s' * (context['earlier_turns'] != 1)}")
    if context.get("tools"):
        bits.append("tools " + ", ".join(map(str, context["tools"])))
    if context.get("tool_calls"):
        bits.append(f"{context['tool_calls']} tool call{'s' * (context['tool_calls'] != 1)} (learned)")
    if context.get("tool_results"):
        bits.append(f"{context['tool_results']} tool result{'s' * (context['tool_results'] != 1)} (read, not learned)")
    if context.get("not_learned"):
        bits.append(f"{context['not_learned']} repl{'ies' if context['not_learned'] != 1 else 'y'} "
                    "not learned (weight 0 / train false)")
    return "; ".join(bits)


def _decoded_segments(ids: list[int], labels: list[int], tokenizer) -> list[dict]:
    out: list[dict] = []
    start = 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or (labels[j] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append({"text": text, "trained": labels[start] != IGNORE_INDEX})
            start = j
    return out
