"""Checks a run's configuration before its run directory exists: `python -m core.preflight CONFIG.toml`.

What the engine would otherwise find half a minute into its setup, after the run directory was
made (so every mistake left a failed run behind): the data file (readable, its format and
columns, every row complete, the first samples render with the model's template), the model
(resolvable: a local directory, the built-in demo, the Hub or its cache), its tokenizer, a GPU
profile without a GPU, the free disk space for the checkpoints and the adapter, and the host RAM
that the plan pins (7-8B models on small cards keep the 16-bit embedding and head in CPU memory).

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

# Host RAM a CUDA training process holds besides what its plan pins: 1.49 GiB peak RSS (VmHWM) for
# torch 2.11+cu130 and transformers 5.17 imported, the CUDA context and cuBLAS up, and a tiny
# Llama's forward and backward on the GPU (H200 device machine, session 7); a 1 GiB pinned buffer
# then added 0.97 GiB, one for one: pinned pages are RAM that cannot be swapped or shared.
HOST_BASE_GIB = 1.5
# Beyond this share of the RAM available the run is said to be tight (a warning, not refused): loading
# a checkpoint reads its shards through the page cache and dequantizes tensor by tensor, and other
# programs on the machine (a browser, an IDE) may grow while it trains.
HOST_TIGHT_SHARE = 0.8


def check_placeholders(cfg: RunConfig) -> None:
    if cfg.data.path.startswith("REPLACE"):
        from core.data import hint_style

        how = ("type its path on the Data step (ctrl+b back to it)" if hint_style() == "wizard" else
               "pass --set data.path=/path/to/your/data.jsonl")
        raise UserError(
            f"data.path = {cfg.data.path!r}: this preset needs your training data",
            hint=f"{how} (JSONL, JSON, CSV, Parquet or .txt, or a Hub dataset id)",
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


def available_ram_gib() -> Optional[float]:
    """RAM this process may still take, GiB: the kernel's MemAvailable, and a container's cgroup limit
    (memory.max less memory.current) when lower; None when neither can be read."""
    out: Optional[float] = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    out = int(line.split()[1]) * 1024 / 2**30
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            room = (int(limit) - used) / 2**30
            out = room if out is None else min(out, room)
    except (OSError, ValueError):
        pass
    return out


def check_host_ram(pinned_gib: float, available_gib: Optional[float], what: str) -> Optional[str]:
    """Refuse a plan whose pinned CPU memory cannot fit in the RAM available (UserError); return a
    warning when it is tight, else None. `what` names the run (model, card, length)."""
    if pinned_gib <= 0 or available_gib is None:
        return None
    need = pinned_gib + HOST_BASE_GIB
    said = (f"{what} keeps {pinned_gib:.2f} GiB in pinned CPU memory (what the plan moves off the card: the "
            f"16-bit embedding or head, offloaded activations; `snugtune estimate` notes each); with the training "
            f"process itself (about {HOST_BASE_GIB:g} GiB) it needs about {need:.1f} GiB of host RAM")
    if need > available_gib:
        raise UserError(
            f"{said}, and this machine has {available_gib:.1f} GiB available: pinned memory cannot be swapped out, "
            "so the out-of-memory killer would end the run once the model is loaded",
            hint="close other programs to free RAM, lower data.max_seq_len (less offloaded activation memory), "
                 "or choose a smaller model or a card with more memory (the embedding then stays on the GPU)")
    if need > HOST_TIGHT_SHARE * available_gib:
        return (f"{said}, of {available_gib:.1f} GiB available: tight: other programs growing while it trains "
                "may bring the out-of-memory killer")
    return None


def _host_ram_warning(cfg: RunConfig, source: str) -> Optional[str]:
    """check_host_ram for this run's plan on the GPU it plans for (nothing to check on the CPU, where
    the estimate's budget is the RAM itself)."""
    if cfg.gpu.profile == "cpu":
        return None
    try:
        from core.estimate import estimate
        from core.gpu import resolve_gpu

        gpu = resolve_gpu(cfg.gpu.profile, cfg.gpu.vram_budget_gib, cfg.gpu.device_index)
        if gpu.is_cpu:
            return None
        spec = _spec(cfg, source)
        pinned = float(estimate(spec, cfg, gpu).knobs.get("host_pinned_gib") or 0.0)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - an odd architecture or config: the estimate is not known here
        return None
    return check_host_ram(pinned, available_ram_gib(),
                          f"{cfg.model.name_or_path} on {gpu.name} at {cfg.data.max_seq_len:,} tokens")


def _spec(cfg: RunConfig, source: str):
    """The model's shape from its config.json, or from a GGUF file's header (not converted yet)."""
    if Path(source).is_file():  # a .gguf the pre-run check did not dequantize (check's convert_gguf)
        from core.catalog import spec_from_gguf_path

        return spec_from_gguf_path(Path(source))
    from transformers import AutoConfig

    from core.catalog import spec_from_config

    config = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    return spec_from_config(config.to_dict(), id=cfg.model.name_or_path)


def _lora_params(cfg: RunConfig, source: str) -> Optional[int]:
    """Trainable parameters from the model's config.json (None when its shape is not known)."""
    try:
        spec = _spec(cfg, source)
        if not spec.exact:
            return None
        return spec.lora_params(cfg.lora.r, cfg.lora.target_modules)
    except Exception:  # noqa: BLE001 - an odd architecture: the engine counts exactly after loading
        return None


def optimizer_for(cfg: RunConfig) -> str:
    """The optimizer the engine will pick: core.plan's rule, for the device the config names."""
    from core.plan import optimizer

    return optimizer(cfg.train.optimizer, cfg.gpu.profile != "cpu")[0]


def check(cfg: RunConfig, runs_base: Optional[Path] = None, convert_gguf: bool = True) -> dict:
    """Everything that can be checked without loading the model's weights; raises UserError.

    `convert_gguf`: dequantize a .gguf model here, once (the CLI: its progress shows in the terminal,
    and the engine then finds it done). The wizard's check runs under a time limit, which dequantizing
    a 7-8B GGUF (minutes, 16 GB written) can pass: there the file's tokenizer and header are read, and
    the engine dequantizes it during its setup, with no limit and stoppable.

    Returns what was found: model_source, format, samples, disk_needed_mb (None if unknown), warnings
    (said, not refused: host RAM that is tight)."""
    from core import runs
    from core.data import prepare, render, tokenize

    check_placeholders(cfg)
    _check_gpu(cfg)
    # The data first: a typo in a path is said before torch is imported or a model downloaded.
    fmt, records, _left_out = prepare(cfg.data)
    from core.model import load_tokenizer, resolve_model_source

    source = resolve_model_source(cfg.model.name_or_path, cfg.model.revision, weights=convert_gguf)
    if Path(source).is_file():  # a GGUF left for the engine to dequantize: what would stop it, now
        from core import gguf_source

        gguf_source._check_architecture(Path(source), gguf_source.read_metadata(Path(source)))
        gguf_source._check_transformers_for(Path(source))
    tokenizer = load_tokenizer(source, cfg)
    for record in records[:SAMPLES_RENDERED]:
        tokenize(render(record, fmt, tokenizer, cfg.data), tokenizer, cfg.data.max_seq_len,
                 cfg.data.train_on_responses_only)
    info = {"model_source": source, "format": fmt.kind, "samples": len(records), "disk_needed_mb": None,
            "warnings": []}
    ram = _host_ram_warning(cfg, source)
    if ram:
        info["warnings"].append(ram)
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
    syntax = "train"
    if len(argv) == 3 and argv[1] == "--hint-syntax":  # the wizard's: hints name its fields and keys
        argv, syntax = argv[:1], argv[2]
    if len(argv) != 1:
        print("usage: python -m core.preflight CONFIG.toml [--hint-syntax train|wizard]", file=sys.stderr)
        return 2
    from core.data import hint_syntax

    try:
        cfg = RunConfig.from_toml(argv[0])
        with hint_syntax(syntax):
            info = check(cfg, convert_gguf=False)  # the wizard's: under PREFLIGHT_TIMEOUT_S (see check)
    except UserError as exc:
        print(json.dumps({"ok": False, "error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}))
        return exc.exit_code
    print(json.dumps({"ok": True, **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
