"""Checks a run's configuration before its run directory exists: `python -m core.preflight CONFIG.toml`.

What the engine would otherwise find half a minute into its setup, after the run directory was
made (so every mistake left a failed run behind): the data file (readable, its format and
columns, every row complete, the first samples render with the model's template), the model
(resolvable: a local directory, the built-in demo, the Hub or its cache), its tokenizer, a GPU
profile without a GPU, and the free disk space for the checkpoints and the adapter.

`check(cfg)` runs in the calling process and imports transformers (the CLI's `train` calls it);
the wizard, which never imports torch, calls `core.runs.preflight(cfg)`, which runs this module
as a subprocess and raises the same UserError.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from core.config import RunConfig
from core.errors import UserError

# Samples rendered and tokenized here: enough to catch a template that fails on this data; the
# engine tokenizes everything (and says which row, if a later one fails).
SAMPLES_RENDERED = 8


def check_placeholders(cfg: RunConfig) -> None:
    if cfg.data.path.startswith("REPLACE"):
        raise UserError(
            f"data.path = {cfg.data.path!r}: this preset needs your training data",
            hint="pass --set data.path=/path/to/your/data.jsonl (JSONL, JSON, CSV, Parquet or .txt, or a Hub dataset id)",
        )


def _check_gpu(cfg: RunConfig) -> None:
    # NVML, not torch.cuda: creating a CUDA context here would hold ~300 MB of a small card's
    # memory in this process for as long as it follows the run.
    if cfg.gpu.profile in ("auto", "cpu"):
        return
    from core.gpu import detect_gpus

    try:
        gpus = detect_gpus()
    except Exception:  # noqa: BLE001 - no driver, no NVML: the engine's own check decides
        return
    if not gpus:
        raise UserError(
            f"gpu.profile = {cfg.gpu.profile!r} plans for a GPU, but no CUDA GPU is available here",
            hint="train on the CPU with --set gpu.profile=cpu (slow; fine for tiny models), or use a machine with a GPU",
        )


def _lora_params(cfg: RunConfig, source: str) -> Optional[int]:
    """Trainable parameters from the model's config.json (None when its shape is not known)."""
    from core.catalog import spec_from_config

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
        spec = spec_from_config(config.to_dict(), id=cfg.model.name_or_path)
        if not spec.exact:
            return None
        return spec.lora_params(cfg.lora.r, cfg.lora.target_modules)
    except Exception:  # noqa: BLE001 - an odd architecture: the engine counts exactly after loading
        return None


def optimizer_for(cfg: RunConfig) -> str:
    """The optimizer the engine will pick: core.plan's rule, for the device the config names."""
    from core.plan import optimizer

    return optimizer(cfg.train.optimizer, cfg.gpu.profile != "cpu")[0]


def check(cfg: RunConfig, runs_base: Optional[Path] = None) -> dict:
    """Everything that can be checked without loading the model's weights; raises UserError.

    Returns what was found: model_source, format, samples, disk_needed_mb (None if unknown)."""
    from core import runs
    from core.data import prepare, render, tokenize

    check_placeholders(cfg)
    _check_gpu(cfg)
    # The data first: a typo in a path is said before torch is imported or a model downloaded.
    fmt, records, _left_out = prepare(cfg.data)
    from core.model import load_tokenizer, resolve_model_source

    source = resolve_model_source(cfg.model.name_or_path, cfg.model.revision)
    tokenizer = load_tokenizer(source, cfg)
    for record in records[:SAMPLES_RENDERED]:
        tokenize(render(record, fmt, tokenizer, cfg.data), tokenizer, cfg.data.max_seq_len,
                 cfg.data.train_on_responses_only)
    info = {"model_source": source, "format": fmt.kind, "samples": len(records), "disk_needed_mb": None}
    lora = _lora_params(cfg, source)
    if lora is not None:
        # Steps as if every sample were its own row (packing only lowers it): an upper bound.
        from core.plan import planned_steps

        total = planned_steps(len(records), cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.epochs,
                                   cfg.train.max_steps)
        need, _ckpt, what = runs.disk_needed(cfg, lora, runs.tokenizer_bytes(source), optimizer_for(cfg), total)
        runs.check_disk_space(runs_base or runs.runs_dir(cfg), need, what)
        info["disk_needed_mb"] = round(need / runs.MB, 1)
    return info


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m core.preflight CONFIG.toml`: one JSON line, {"ok": true, ...} or
    {"ok": false, "error", "hint", "exit_code"}; the exit code is the error's (0 when fine)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m core.preflight CONFIG.toml", file=sys.stderr)
        return 2
    try:
        cfg = RunConfig.from_toml(argv[0])
        info = check(cfg)
    except UserError as exc:
        print(json.dumps({"ok": False, "error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}))
        return exc.exit_code
    print(json.dumps({"ok": True, **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
