"""The run configuration: one typed, validated model, read from and written to TOML.

Every field carries a docstring-like `description`; the wizard shows it as the field's
hint and the CLI uses it in `--help` and in error messages, so the text lives here once.
A RunConfig is frozen: once a run starts, its configuration does not change under it.
"""
from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import UserError
from core.plan import OPTIMIZERS  # the one list of optimizers the engine knows (core.plan imports no config)

CONFIG_VERSION = 1


class ConfigError(UserError):
    """A configuration problem, said once: where (file, key), what is wrong, what is allowed."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source, self.key, self.reason = source, key, message
        where = ": ".join(p for p in (source, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class GpuConfig(_Section):
    profile: str = Field(
        "auto",
        description="The GPU to plan for: 'auto' detects it with NVML, 'cpu' trains on the CPU, "
        "or a profile name such as 'gtx-1650' or 'rtx-3060-12gb' (see `snugtune gpus --profiles`).",
    )
    vram_budget_gib: Optional[float] = Field(
        None,
        gt=0,
        le=1024,
        description="Cap on the GPU memory this run may use, in GiB (card total if unset). Protects a "
        "desktop sharing the card, and simulates a small card on a large one.",
    )
    device_index: int = Field(0, ge=0, description="Which CUDA device to train on, when there are several.")
    nproc: Optional[int] = Field(
        None, ge=1, le=64,
        description="Processes (GPUs) one run trains on (unset: 1): each loads the whole 4-bit model on its own card "
        "(devices device_index .. device_index + nproc - 1) and the Trainer's DDP averages their gradients; "
        "the effective batch is micro_batch x grad_accum x nproc. On the CPU, processes share the cores (gloo).",
    )


class ModelConfig(_Section):
    name_or_path: str = Field(
        ..., min_length=1, description="A Hugging Face model id (e.g. 'Qwen/Qwen2.5-0.5B') or a local model directory."
    )
    revision: Optional[str] = Field(None, description="A branch, tag or commit of the Hub repository (default: main).")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped inside the model repository. Off unless you trust its author."
    )
    load_in_4bit: Union[Literal["auto"], bool] = Field(
        "auto", description="Load the base weights in 4-bit NF4 with double quantization (QLoRA); false: LoRA on "
        "unquantized weights. 'auto': 4-bit on a GPU; on the CPU unquantized where RAM allows (faster there, "
        "see the README's CPU figures).",
    )
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Precision of the arithmetic: 'auto' takes bf16 where the GPU supports it (Ampere and newer), "
        "fp16 on older cards (GTX 16xx, RTX 20xx, T4), fp32 on the CPU.",
    )
    fp16_guard: Literal["auto", "on", "off"] = Field(
        "auto", description="In fp16 (GPUs without bf16), keep the residual stream in fp32 so activations that "
        "overflow fp16 (Gemma 2/3) stay finite. 'auto': on for the families known to overflow.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel: 'auto' takes PyTorch SDPA (memory-efficient or flash, per GPU)."
    )


class DataConfig(_Section):
    path: str = Field(
        ...,
        min_length=1,
        description="Training data: a local .jsonl, .json, .csv, .parquet or .txt file, or a Hub dataset id "
        "(e.g. 'tatsu-lab/alpaca').",
    )
    format: Literal["auto", "instruction", "chat", "segments", "text"] = Field(
        "auto",
        description="Sample format: 'instruction' (instruction/input/output, alpaca system/history), 'chat' (a "
        "list of role/content messages, or sharegpt from/value; tool calls included), 'segments' (axolotl's "
        "template-free {label, text} segments), 'text' (plain text); 'auto' detects it from the columns.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map the format's fields to your columns, e.g. {instruction = 'question', output = 'answer'}, "
        "{messages = 'conversation', system = 'sys', tools = 'functions'} or {text = 'body'}. Fields: "
        "instruction, input, output, system, history (instruction); messages, system, tools, reply (chat); "
        "segments; text.",
    )
    text_split: Literal["auto", "paragraph", "line", "document"] = Field(
        "auto",
        description="How a .txt file becomes samples: 'paragraph' (blank lines separate samples), 'line' (one "
        "sample a line), 'document' (the whole file is one sample); 'auto' takes paragraphs when the file "
        "has blank lines, else lines.",
    )
    long_samples: Literal["split", "truncate"] = Field(
        "split",
        description="Plain-text samples longer than max_seq_len: 'split' into consecutive windows of "
        "max_seq_len tokens (nothing is thrown away), or 'truncate' (keep the first max_seq_len tokens). "
        "Instruction and chat samples are always truncated (a reply cut from its prompt teaches nothing).",
    )
    split: str = Field("train", description="Which split to train on: of a Hub dataset, a datasets save_to_disk folder, or a folder of train / test / validation files.")
    subset: Optional[str] = Field(None, description="The configuration (subset) of a Hub dataset, if it has several.")
    template: Literal["auto", "builtin"] = Field(
        "auto",
        description="How samples become text: 'auto' uses the tokenizer's chat template when it has one, "
        "else snugtune's built-in template; 'builtin' always uses the built-in one.",
    )
    max_seq_len: int = Field(1024, ge=16, le=1_048_576, description="Longest sequence in tokens; longer chats are cut, long texts split.")
    train_on_responses_only: bool = Field(
        True, description="Compute the loss on the response tokens only; the prompt is read but not learned."
    )
    packing: bool = Field(
        True,
        description="Pack several short samples into one sequence, each attending only to itself "
        "(no padding is trained on).",
    )
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=0.9, description="Share of the samples held out for evaluation (0 turns evaluation off)."
    )
    max_samples: Optional[int] = Field(None, gt=0, description="Use only the first N samples (for a quick trial).")
    seed: int = Field(42, description="Seed for shuffling and the train/eval split.")


LORA_ALL_LINEAR = "all-linear"


class LoraSettings(_Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank: the adapters' width. 8-64 is usual; higher learns more and costs more memory.")
    alpha: float = Field(32, gt=0, description="LoRA alpha: the adapters' output is scaled by alpha / r. Twice the rank is a common choice.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input during training.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        LORA_ALL_LINEAR,
        description="Which linear layers get adapters: 'all-linear' (every projection of attention and MLP), "
        "or a list of names such as ['q_proj', 'v_proj'].",
    )


class TrainSettings(_Section):
    micro_batch: int = Field(1, ge=1, le=4096, description="Sequences per forward pass. Memory grows with it.")
    grad_accum: int = Field(8, ge=1, le=65536, description="Micro-batches summed before each optimizer step (effective batch = micro_batch x grad_accum).")
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate of the adapters.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="How the learning rate moves after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of the steps spent ramping the learning rate up from zero.")
    weight_decay: float = Field(0.0, ge=0.0, lt=1.0, description="Decoupled weight decay on the adapters.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip the gradient norm to this (0 turns clipping off).")
    optimizer: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]  (core.plan's one list)
        "auto",
        description="'auto' takes 8-bit paged AdamW on CUDA (states in 8 bits, paged out under pressure) "
        "and plain AdamW on the CPU.",
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass instead of keeping them: far less memory, about 20-30% slower."
    )
    offload_activations: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Move checkpointed activations to CPU memory between forward and backward "
        "(for very long sequences); 'auto' turns it on when the estimate says it is needed.",
    )
    chunked_loss: bool = Field(
        True, description="Compute the output layer and loss in chunks so the full logits are never held (large vocabularies)."
    )
    compile: bool = Field(
        False,
        description="Compile each decoder block with torch.compile (CUDA only): fewer kernel launches, "
        "faster on small models; the first steps wait for the compiler.",
    )
    cuda_graphs: Literal["auto", "off"] = Field(
        "auto",
        description="Replay each training micro-batch from a CUDA graph (one launch instead of thousands): "
        "much faster for small models on fast GPUs. 'auto' uses it on CUDA for rows up to 8,192 tokens "
        "without dropout, and falls back to normal steps (saying why) where it cannot.",
    )
    big_savers: Literal["auto", "on", "off"] = Field(
        "auto",
        description="The input embedding's rows from CPU memory and the frozen output layer in 8 bits "
        "(core/bigsavers.py). 'auto' uses them for 5B+ models where a run does not fit without them "
        "(measured on 7-8B models); 'on' also for smaller models, where they let longer rows fit "
        "(auto-fit's choices for those were measured without them); 'off' never.",
    )
    logging_steps: int = Field(1, ge=1, description="Log loss, speed and memory every N optimizer steps.")
    eval_steps: Optional[int] = Field(None, gt=0, description="Evaluate every N steps (default: at the end of each epoch).")
    save_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints (the oldest are removed).")
    seed: int = Field(42, description="Seed for adapter initialisation and data order.")
    oom_recovery: bool = Field(
        True,
        description="On CUDA out-of-memory, halve the micro-batch, double gradient accumulation (same effective "
        "batch) and resume from the last checkpoint.",
    )


class OutputConfig(_Section):
    runs_dir: Optional[str] = Field(
        None, description="Where run directories are created (default: snugtune's data directory, see `snugtune runs`)."
    )
    name: Optional[str] = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$",
        description="A name for the run directory (letters, digits, '.', '_', '-'); a timestamp is added so no run is reused.",
    )


class RunConfig(_Section):
    """Everything one training run needs; the file a preset or a run directory holds."""

    version: int = Field(CONFIG_VERSION, description="Version of this file's layout.")
    description: str = Field("", description="What this preset or run is for, in a sentence.")
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    model: ModelConfig
    data: DataConfig
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.version != CONFIG_VERSION:
            raise ValueError(f"version {self.version} is not supported (this snugtune reads version {CONFIG_VERSION})")
        return self

    # ---- TOML in and out -------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "RunConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _explain(exc, source) from None

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("file not found", source=str(path)) from None
        except OSError as exc:
            raise ConfigError(f"cannot read the file ({exc.strerror})", source=str(path)) from None
        return cls.from_toml_text(text, source=str(path))

    @classmethod
    def from_toml_text(cls, text: str, source: str | None = None) -> "RunConfig":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", source=source) from None
        return cls.from_dict(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(self.model_dump(mode="json"))

    def to_toml(self, header: str | None = None) -> str:
        body = tomli_w.dumps(self.to_dict())
        if header:
            body = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + "\n" + body
        return body

    def write_toml(self, path: str | Path, header: str | None = None, overwrite: bool = False) -> Path:
        """Write atomically (a temp file renamed into place), refusing to overwrite unless asked."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ConfigError("already exists; choose another name or pass overwrite", source=str(path))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_toml(header), encoding="utf-8")
        tmp.replace(path)
        return path

    def with_overrides(self, assignments: list[str], source: str = "--set") -> "RunConfig":
        """Apply `section.key=value` strings (values parsed as TOML, else taken as strings)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"expected key=value (e.g. train.max_steps=4), got {item!r}", source=source)
            value = parse_value(raw.strip())
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                nxt = node.setdefault(part, {})
                if not isinstance(nxt, dict):
                    raise ConfigError(f"{part!r} is not a section", source=source, key=key)
                node = nxt
            node[parts[-1]] = value
        return RunConfig.from_dict(data, source=source)

    def get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node


def parse_value(raw: str) -> Any:
    """A --set value: TOML syntax where it parses (numbers, booleans, lists), else a plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def field_help(dotted: str) -> str:
    """The help text of a field, e.g. field_help('lora.r'); the wizard and --help use it."""
    section, _, name = dotted.partition(".")
    model = RunConfig.model_fields[section].annotation
    return model.model_fields[name].description or ""


def sections() -> dict[str, type[BaseModel]]:
    return {
        name: f.annotation
        for name, f in RunConfig.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    }


def _drop_none(obj: Any) -> Any:
    # TOML has no null: an unset optional field is simply absent from the file.
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


def _known_keys(loc: tuple) -> list[str]:
    model: Any = RunConfig
    for part in loc[:-1]:
        f = getattr(model, "model_fields", {}).get(part)
        if f is None:
            return []
        model = f.annotation
    return list(getattr(model, "model_fields", {}).keys())


def _explain(exc: ValidationError, source: str | None) -> ConfigError:
    """Turn pydantic's report into one clear line per problem: key, what is wrong, what is allowed."""
    lines = []
    first_key = None
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        first_key = first_key or key
        kind = err["type"]
        if kind == "extra_forbidden":
            known = _known_keys(loc)
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msg = f"unknown key{hint}; known keys here: {', '.join(known)}"
        elif kind == "missing":
            msg = "required but missing"
        elif kind == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            msg = f"got {json.dumps(err.get('input'))}; allowed: {allowed}"
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {json.dumps(got, default=str)})"
            msg = f"{err['msg']}{shown}"
        lines.append(f"{key}: {msg}")
    if len(lines) == 1:
        key, _, msg = lines[0].partition(": ")
        return ConfigError(msg, source=source, key=key)
    return ConfigError("; ".join(lines), source=source)
