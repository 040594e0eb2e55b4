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

Rows with a missing required field are an error naming the row and the field, never skipped
silently: a dataset half of whose rows lack an answer should be fixed, not trained on.

Nothing heavy at module level: torch, transformers and datasets are imported by the functions
that need them.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional

from core.config import DataConfig
from core.errors import UserError

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and HF models) skip

FILE_TYPES = {".jsonl": "JSON lines", ".json": "JSON", ".csv": "CSV", ".tsv": "TSV", ".parquet": "Parquet", ".txt": "text"}

# Field names per format, and the column names each is recognised under (first match wins).
INSTRUCTION_ALIASES = {
    "instruction": ["instruction", "prompt", "question", "query"],
    "input": ["input", "context"],
    "output": ["output", "response", "answer", "completion"],
    "system": ["system", "system_prompt"],
}
CHAT_COLUMNS = ["messages", "conversations", "conversation", "chat", "dialog"]
TEXT_COLUMNS = ["text", "content", "body", "document"]
FIELDS = {
    "instruction": {"required": ["instruction", "output"], "optional": ["input", "system"]},
    "chat": {"required": ["messages"], "optional": []},
    "text": {"required": ["text"], "optional": []},
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
CHAT_ROLES = {"system", "user", "assistant"}

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

    kind: 'instruction', 'chat' or 'text'. columns: format field -> dataset column
    (e.g. {'instruction': 'question', 'output': 'answer'}). message_keys: for chat, the
    (role, content) keys inside each message: ('role', 'content') or sharegpt's ('from', 'value').
    """

    kind: str
    columns: dict[str, str]
    reason: str
    message_keys: Optional[tuple[str, str]] = None

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
        records = _load_file(local, data_cfg.max_samples)
        source = str(local)
    else:
        records = _load_hub(path, data_cfg)
        source = f"Hub dataset {path!r}"
    if data_cfg.max_samples is not None:
        records = records[: data_cfg.max_samples]
    if not records:
        raise UserError(f"{source}: no samples found (the dataset is empty)")
    return records


def _looks_like_a_path(path: str) -> bool:
    # A Hub id is "name" or "owner/name"; anything else (an extension we read, a leading ./ or /,
    # ~, a backslash, two slashes) is meant as a file, and a missing one is "file not found".
    return (
        Path(path).suffix.lower() in FILE_TYPES
        or path.startswith((".", "/", "~"))
        or "\\" in path
        or path.count("/") > 1
    )


def _load_file(path: Path, max_samples: Optional[int]) -> list[dict]:
    if not path.exists():
        raise UserError(f"{path}: file not found", hint="check the path (data.path), or give a Hub dataset id as owner/name")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give one data file ({', '.join(FILE_TYPES)})")
    ext = path.suffix.lower()
    if ext not in FILE_TYPES:
        raise UserError(
            f"{path}: unknown file type {ext or '(no extension)'!r}; snugtune reads "
            + ", ".join(f"{e} ({n})" for e, n in FILE_TYPES.items())
        )
    try:
        if ext == ".jsonl":
            return _read_jsonl(path, max_samples)
        if ext == ".json":
            return _read_json(path)
        if ext in (".csv", ".tsv"):
            return _read_csv(path, "\t" if ext == ".tsv" else ",", max_samples)
        if ext == ".parquet":
            return _read_parquet(path)
        return _read_txt(path)
    except PermissionError:
        raise UserError(f"{path}: cannot read the file (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _read_jsonl(path: Path, max_samples: Optional[int]) -> list[dict]:
    records = []
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}, line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}, line {lineno}: expected a JSON object ({{...}}), got {type(obj).__name__}")
            records.append(obj)
            if max_samples is not None and len(records) >= max_samples:
                break
    return records


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # One object per line saved as .json: read it as JSON lines rather than refuse.
            return _read_jsonl(path, None)
        raise UserError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
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


def _read_csv(path: Path, delimiter: str, max_samples: Optional[int]) -> list[dict]:
    records = []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        if not reader.fieldnames:
            return []
        for row in reader:
            if None in row:  # more cells than header columns
                raise UserError(f"{path}, line {reader.line_num}: more values than the header has columns")
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


def _read_txt(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    return [{"text": p.strip()} for p in re.split(r"\n\s*\n", text) if p.strip()]


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


def _columns_of(records: list[dict]) -> list[str]:
    cols: dict[str, None] = {}
    for r in records[:DETECT_ROWS]:
        cols.update(dict.fromkeys(r))
    return list(cols)


def _message_keys(value: Any) -> Optional[tuple[str, str]]:
    """('role','content') or ('from','value') if `value` is a list of message dicts, else None."""
    if not isinstance(value, list) or not value or not isinstance(value[0], dict):
        return None
    first = value[0]
    if "role" in first and "content" in first:
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


def detect_format(records: list[dict], data_cfg: DataConfig) -> DataFormat:
    """Which format the samples are in and which columns hold each field.

    `data_cfg.columns` (field -> column) is taken as given and checked; `data_cfg.format`
    other than 'auto' forces the kind. Otherwise: a column of message lists means chat, an
    instruction/output pair (or an alias such as prompt/response) means instruction, and a
    text column means text, in that order.
    """
    columns = _columns_of(records)
    mapping = dict(data_cfg.columns)
    kind = data_cfg.format
    allowed_fields = sorted({f for spec in FIELDS.values() for f in spec["required"] + spec["optional"]})
    for fld, col in mapping.items():
        if fld not in allowed_fields:
            raise UserError(f"data.columns: unknown field {fld!r}; the fields are {', '.join(allowed_fields)}")
        if col not in columns:
            raise UserError(
                f"data.columns maps {fld!r} to column {col!r}, which the data does not have; "
                f"its columns are: {', '.join(columns)}"
            )
    if kind == "auto" and mapping:
        kinds = {k for k, spec in FIELDS.items() if set(mapping) & set(spec["required"] + spec["optional"])}
        if len(kinds) > 1:
            raise UserError(f"data.columns mixes fields of different formats ({', '.join(sorted(kinds))}); map one format's fields")
        kind = kinds.pop()
        reason_prefix = "from data.columns"
    else:
        reason_prefix = "set by data.format" if kind != "auto" else ""
        if kind != "auto":
            spec = FIELDS[kind]
            stray = sorted(set(mapping) - set(spec["required"] + spec["optional"]))
            if stray:
                raise UserError(f"data.columns maps {', '.join(map(repr, stray))}, which {kind} data does not have; "
                                f"its fields are {', '.join(spec['required'] + spec['optional'])}")

    found_chat = [(c, _message_keys(_first_value(records, c))) for c in columns]
    found_chat = [(c, keys) for c, keys in found_chat if keys]

    def chat_format(col: str, why: str) -> DataFormat:
        keys = _message_keys(_first_value(records, col))
        if keys is None:
            raise UserError(
                f"column {col!r} does not hold a list of messages ({{\"role\", \"content\"}} or sharegpt "
                f"{{\"from\", \"value\"}}); got {_preview(_first_value(records, col))}"
            )
        style = "sharegpt from/value" if keys == ("from", "value") else "role/content"
        return DataFormat("chat", {"messages": col}, f"{why}: column {col!r} holds {style} message lists", keys)

    def pick(aliases: list[str], taken=()) -> Optional[str]:
        return next((a for a in aliases if a in columns and a not in taken), None)

    def instruction_format(why: str) -> Optional[DataFormat]:
        found: dict[str, Optional[str]] = {}
        for f in INSTRUCTION_ALIASES:  # a column mapped to one field is never picked for another
            found[f] = mapping.get(f) or pick(INSTRUCTION_ALIASES[f], taken=[*mapping.values(), *found.values()])
        if not (found["instruction"] and found["output"]):
            return None
        cols = {f: c for f, c in found.items() if c}
        shown = ", ".join(f"{f}={c!r}" for f, c in cols.items())
        return DataFormat("instruction", cols, f"{why}: {shown}")

    def text_format(why: str) -> Optional[DataFormat]:
        col = mapping.get("text") or pick(TEXT_COLUMNS)
        if col is None:
            str_cols = [c for c in columns if isinstance(_first_value(records, c), str)]
            if len(columns) == 1 and str_cols:
                col = str_cols[0]
        if col is None:
            return None
        return DataFormat("text", {"text": col}, f"{why}: column {col!r} holds plain text")

    if kind == "chat":
        col = mapping.get("messages") or next((c for c in CHAT_COLUMNS if c in columns), None)
        col = col or (found_chat[0][0] if found_chat else None)
        if col is None:
            raise _no_format_error("chat", columns)
        return chat_format(col, reason_prefix)
    if kind == "instruction":
        fmt = instruction_format(reason_prefix)
        if fmt is None:
            raise _no_format_error("instruction", columns)
        return fmt
    if kind == "text":
        fmt = text_format(reason_prefix)
        if fmt is None:
            raise _no_format_error("text", columns)
        return fmt

    # auto, nothing mapped
    if found_chat:
        preferred = next((c for c in CHAT_COLUMNS if c in dict(found_chat)), found_chat[0][0])
        return chat_format(preferred, "detected")
    for make in (instruction_format, text_format):
        fmt = make("detected")
        if fmt is not None:
            return fmt
    raise _no_format_error(None, columns)


def _no_format_error(kind: Optional[str], columns: list[str]) -> UserError:
    needs = {
        "instruction": "an instruction column (instruction/prompt/question/query) and an answer column "
        "(output/response/answer/completion)",
        "chat": "a column of message lists (messages/conversations)",
        "text": "a text column (text/content/body/document)",
    }
    what = needs[kind] if kind else "; or ".join(needs.values())
    example = {
        "instruction": "data.columns = {instruction = 'my_question', output = 'my_answer'}",
        "chat": "data.columns = {messages = 'my_dialogue'}",
        "text": "data.columns = {text = 'my_text'}",
    }
    return UserError(
        f"cannot tell the data's format: it needs {what}; its columns are: {', '.join(columns) or '(none)'}",
        hint="map your columns, e.g. " + (example[kind] if kind else example["instruction"])
        + " (CLI: --column instruction=my_question)",
    )


def _preview(value: Any, width: int = 60) -> str:
    s = json.dumps(value, ensure_ascii=False, default=str)
    return s if len(s) <= width else s[: width - 3] + "..."


def check_records(records: list[dict], fmt: DataFormat) -> None:
    """Raise a UserError naming the rows (1-based) and field if any row lacks what its format needs."""
    bad: list[tuple[int, str]] = []
    for i, r in enumerate(records, 1):
        problem = _row_problem(r, fmt)
        if problem:
            bad.append((i, problem))
    if not bad:
        return
    shown = "; ".join(f"row {i}: {p}" for i, p in bad[:LIST_BAD_ROWS])
    more = f" (and {len(bad) - LIST_BAD_ROWS} more rows)" if len(bad) > LIST_BAD_ROWS else ""
    raise UserError(
        f"{len(bad)} of {len(records)} samples cannot be used as {fmt.kind} data: {shown}{more}",
        hint="fix or remove those rows, or map the right columns (data.columns)",
    )


def _row_problem(r: dict, fmt: DataFormat) -> Optional[str]:
    if fmt.kind == "chat":
        col = fmt.columns["messages"]
        msgs = r.get(col)
        if not isinstance(msgs, list) or not msgs:
            return f"field {col!r} is missing or not a list of messages"
        rk, ck = fmt.message_keys or ("role", "content")
        has_answer = False
        for j, m in enumerate(msgs, 1):
            if not isinstance(m, dict) or rk not in m or ck not in m:
                return f"message {j} of {col!r} lacks {rk!r} or {ck!r}"
            role = _norm_role(m[rk], fmt)
            if role is None:
                return f"message {j} of {col!r} has unknown role {m[rk]!r} (expected system, user or assistant)"
            if not isinstance(m[ck], str):
                return f"message {j} of {col!r}: {ck!r} is not text"
            has_answer |= role == "assistant"
        if not has_answer:
            return f"{col!r} has no assistant message (nothing to learn)"
        return None
    required = FIELDS[fmt.kind]["required"]
    for fld in required + [f for f in FIELDS[fmt.kind]["optional"] if f in fmt.columns]:
        col = fmt.columns.get(fld)
        if col is None:
            continue
        v = r.get(col)
        if v is None:
            if fld in required:
                return f"field {fld!r} (column {col!r}) is missing"
            continue
        if isinstance(v, (list, dict)):
            return f"field {fld!r} (column {col!r}) is not text: {_preview(v, 40)}"
    return None


def _norm_role(role: Any, fmt: DataFormat) -> Optional[str]:
    if not isinstance(role, str):
        return None
    role = role.strip().lower()
    if fmt.message_keys == ("from", "value"):
        return SHAREGPT_ROLES.get(role)
    return role if role in CHAT_ROLES else SHAREGPT_ROLES.get(role)


def _text(v: Any) -> str:
    return "" if v is None else v if isinstance(v, str) else str(v)


def to_messages(record: dict, fmt: DataFormat) -> list[dict]:
    """A sample as role/content messages (instruction samples become system?/user/assistant)."""
    if fmt.kind == "chat":
        rk, ck = fmt.message_keys or ("role", "content")
        return [{"role": _norm_role(m[rk], fmt), "content": _text(m[ck])} for m in record[fmt.columns["messages"]]]
    if fmt.kind != "instruction":
        raise ValueError("text samples have no messages")
    c = fmt.columns
    user = _text(record.get(c["instruction"]))
    extra = _text(record.get(c["input"])) if "input" in c else ""
    if extra.strip():
        user = f"{user}\n\n{extra}"
    msgs = []
    system = _text(record.get(c["system"])) if "system" in c else ""
    if system.strip():
        msgs.append({"role": "system", "content": system})
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record.get(c["output"]))}]
    return msgs


# ---- rendering ---------------------------------------------------------------------------------


def template_name(fmt: DataFormat, tokenizer, data_cfg: DataConfig) -> str:
    """How samples of this format become text: 'chat_template' (the tokenizer's), 'builtin' or 'text'."""
    if fmt.kind == "text":
        return "text"
    if data_cfg.template == "auto" and getattr(tokenizer, "chat_template", None):
        return "chat_template"
    return "builtin"


@functools.lru_cache(maxsize=8)
def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front when it encodes text on its own (Llama does, Qwen not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def render(record: dict, fmt: DataFormat, tokenizer, data_cfg: DataConfig) -> list[Segment]:
    """The sample as text segments, each trained or masked, exactly in the order the model reads them.

    Text: all trained. Instruction and chat: every assistant reply trained (with the end-of-
    sequence token that tells the model to stop), everything else masked. The tokenizer's chat
    template is used when `template='auto'` and it has one; else snugtune's built-in template.
    """
    eos = tokenizer.eos_token or ""
    head = [Segment(tokenizer.bos_token, False)] if _adds_bos(tokenizer) else []
    if fmt.kind == "text":
        text = _text(record.get(fmt.columns["text"]))
        return head + [Segment(text + eos, True)]
    if template_name(fmt, tokenizer, data_cfg) == "chat_template":
        segments = _render_chat_template(to_messages(record, fmt), tokenizer)
        if eos and not any(s.trained and eos in s.text for s in segments):
            # The template ends a turn with its own marker (e.g. <|im_end|>) while generation stops
            # at another EOS: teach that EOS too, or the tuned model would not stop.
            segments.append(Segment(eos, True))
        return segments
    if fmt.kind == "instruction":
        return head + _render_builtin_instruction(record, fmt, eos)
    return head + _render_builtin_chat(to_messages(record, fmt), eos)


def _render_builtin_instruction(record: dict, fmt: DataFormat, eos: str) -> list[Segment]:
    # The Alpaca layout: widely known, and readable in a preview.
    c = fmt.columns
    system = _text(record.get(c["system"])) if "system" in c else ""
    extra = _text(record.get(c["input"])) if "input" in c else ""
    prompt = f"{system}\n\n" if system.strip() else ""
    prompt += f"### Instruction:\n{_text(record.get(c['instruction']))}\n\n"
    if extra.strip():
        prompt += f"### Input:\n{extra}\n\n"
    prompt += "### Response:\n"
    return [Segment(prompt, False), Segment(_text(record.get(c["output"])) + eos, True)]


def _render_builtin_chat(messages: list[dict], eos: str) -> list[Segment]:
    segs: list[Segment] = []
    headers = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
    pending = ""
    for m in messages:
        if m["role"] == "assistant":
            segs.append(Segment(pending + headers["assistant"], False))
            segs.append(Segment(m["content"] + eos, True))
            pending = "\n\n"
        else:
            pending += f"{headers[m['role']]}{m['content']}\n\n"
    if pending.strip():
        segs.append(Segment(pending, False))
    return segs


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
        record = {"instruction": turns[-1]["content"], "output": "", "system": system}
        fmt = DataFormat("instruction", {"instruction": "instruction", "output": "output", "system": "system"}, "")
        return head + _render_builtin_instruction(record, fmt, "")[0].text
    return head + "".join(s.text for s in _render_builtin_chat(messages, tokenizer.eos_token or "")) + "### Assistant:\n"


def _render_chat_template(messages: list[dict], tokenizer) -> list[Segment]:
    """Split the template's rendering into masked prompt and trained replies.

    For each assistant turn: the conversation before it with the generation prompt is the
    prompt; the conversation through it, minus that prompt, is the reply. This only works when
    rendering is append-only (an earlier rendering is a prefix of a later one), so it is checked.
    """

    def apply(msgs: list[dict], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as exc:  # jinja errors: e.g. a template that rejects a system message
            raise UserError(
                f"the tokenizer's chat template cannot render this sample ({type(exc).__name__}: {exc})",
                hint="set data.template = 'builtin' to use snugtune's built-in template",
            ) from None

    segs: list[Segment] = []
    done = last_full = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = apply(messages[:i], True)
        full = apply(messages[: i + 1], False)
        last_full = full
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError(
                "the tokenizer's chat template renders a conversation differently once later turns are "
                "added (e.g. it drops earlier reasoning), so prompts and replies cannot be told apart",
                hint="set data.template = 'builtin' to use snugtune's built-in template",
            )
        segs += [Segment(prompt[len(done):], False), Segment(full[len(prompt):], True)]
        done = full
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
        pieces += tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
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


def prepare(data_cfg: DataConfig) -> tuple[DataFormat, list[dict]]:
    """Load, detect and check: the format and the records."""
    records = load_records(data_cfg)
    fmt = detect_format(records, data_cfg)
    check_records(records, fmt)
    return fmt, records


def build_datasets(data_cfg: DataConfig, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """Training and evaluation rows (plain dicts of int lists) and a summary `info`.

    Samples are shuffled with data_cfg.seed, then eval_fraction of them held out. Train rows
    are packed when data_cfg.packing, else ordered so neighbours have similar lengths; eval
    rows are never packed. Samples with nothing left to learn after truncation are dropped
    (and counted). info: format, format_detail, template, samples, train_samples,
    eval_samples, train_rows, eval_rows, truncated, dropped_no_target, packing,
    packing_efficiency, length_stats.
    """
    fmt, records = prepare(data_cfg)
    examples, full_lengths = [], []
    dropped = 0
    rendered = [render(r, fmt, tokenizer, data_cfg) for r in records]
    for ids, labels in _tokenize_many(rendered, tokenizer, data_cfg.train_on_responses_only):
        full_lengths.append(len(ids))
        ids, labels = ids[: data_cfg.max_seq_len], labels[: data_cfg.max_seq_len]
        # A label at position 0 is never predicted (nothing comes before it), so it doesn't count.
        if all(x == IGNORE_INDEX for x in labels[1:]):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise UserError(
            f"none of the {len(records)} samples has any response token within max_seq_len={data_cfg.max_seq_len}",
            hint="raise data.max_seq_len, or shorten the prompts",
        )
    rng = random.Random(data_cfg.seed)
    rng.shuffle(examples)
    n_eval = round(len(examples) * data_cfg.eval_fraction)
    if data_cfg.eval_fraction > 0 and len(examples) >= 2:
        n_eval = min(max(n_eval, 1), len(examples) - 1)  # keep at least one of each
    else:
        n_eval = 0
    eval_ex, train_ex = examples[:n_eval], examples[n_eval:]
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
        "samples": len(records),
        "train_samples": len(train_ex),
        "eval_samples": len(eval_ex),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "train_tokens": tokens,
        "truncated": sum(1 for n in full_lengths if n > data_cfg.max_seq_len),
        "dropped_no_target": dropped,
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


def inspect(data_cfg: DataConfig, tokenizer_source: Any, n: int = 3) -> dict:
    """A JSON-able preview: format, columns, the first n samples as the model sees them, lengths.

    `tokenizer_source`: a model id or path, a `builtin:` name, or a tokenizer object. Each
    sample's `segments` are the decoded tokens after truncation, split where masking changes:
    [{"text": ..., "trained": bool}]. Length statistics cover up to INSPECT_LENGTH_SAMPLES samples.
    """
    tokenizer = load_tokenizer(tokenizer_source) if isinstance(tokenizer_source, str) else tokenizer_source
    fmt, records = prepare(data_cfg)
    samples = []
    measured = records[:INSPECT_LENGTH_SAMPLES]
    lengths = []
    rendered = [render(r, fmt, tokenizer, data_cfg) for r in measured]
    for i, (ids, labels) in enumerate(_tokenize_many(rendered, tokenizer, data_cfg.train_on_responses_only)):
        lengths.append(len(ids))
        if i < n:
            kept, kept_labels = ids[: data_cfg.max_seq_len], labels[: data_cfg.max_seq_len]
            samples.append({
                "index": i,
                "tokens": len(kept),
                "trained_tokens": sum(1 for x in kept_labels if x != IGNORE_INDEX),
                "truncated": len(ids) > len(kept),
                "segments": _decoded_segments(kept, kept_labels, tokenizer),
            })
    return {
        "path": data_cfg.path,
        "samples_total": len(records),
        "columns": _columns_of(records),
        "format": fmt.to_dict(),
        "template": template_name(fmt, tokenizer, data_cfg),
        "tokenizer": getattr(tokenizer, "name_or_path", "") or "",
        "max_seq_len": data_cfg.max_seq_len,
        "train_on_responses_only": data_cfg.train_on_responses_only,
        "samples": samples,
        "length_stats": length_stats(lengths, data_cfg.max_seq_len),
        "length_stats_sampled": len(measured) < len(records),
    }


def _decoded_segments(ids: list[int], labels: list[int], tokenizer) -> list[dict]:
    out: list[dict] = []
    start = 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or (labels[j] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append({"text": text, "trained": labels[start] != IGNORE_INDEX})
            start = j
    return out
