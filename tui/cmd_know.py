"""`snugtune gpus`, `snugtune models`, `snugtune estimate`: know before you train.

No torch here (the wizard imports this module): GPUs come from NVML, model shapes from the
built-in catalog / local cache / Hub config.json, and the estimate is pure arithmetic.
"""
from __future__ import annotations

import json
import sys

from core.errors import UserError


def register(subparsers) -> None:
    g = subparsers.add_parser(
        "gpus",
        help="show the GPUs in this machine (memory, who holds it) and the built-in GPU profiles",
        description="Detect NVIDIA GPUs through NVML: name, memory total/used/free, compute capability, "
        "bf16 support, driver, and the processes holding memory. With no driver or no GPU, says so and "
        "lists the profiles you can plan for with --gpu PROFILE.",
    )
    g.add_argument("--profiles", action="store_true", help="list the built-in GPU profiles")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_gpus)

    m = subparsers.add_parser(
        "models",
        help="list models: the built-in catalog, the local Hugging Face cache, and the Hub",
        description="List models with their size and, with --fits GPU, whether they fit that GPU "
        "(at the default settings: 1024 tokens, micro-batch 1, LoRA r=16). Offline, the catalog and "
        "the cache still work and a line says the Hub is unreachable.",
    )
    m.add_argument("--search", metavar="TEXT", default="", help="only models whose id contains TEXT")
    m.add_argument("--fits", metavar="GPU", help="add a fit badge for this GPU profile (or 'auto')")
    m.add_argument("--vram", type=float, metavar="GIB", help="with --fits: a memory budget instead of the card's")
    m.add_argument("--seq", type=int, default=1024, metavar="N", help="with --fits: sequence length (default 1024)")
    m.add_argument("--sort", choices=["downloads", "likes", "recent"], default="downloads",
                   help="order of Hub results (default downloads)")
    m.add_argument("--source", choices=["catalog", "hub", "cache", "gguf", "all"], default="all",
                   help="where to look (default all; gguf: .gguf files in --gguf folders, Ollama and LM Studio)")
    m.add_argument("--gguf", action="append", default=[], metavar="DIR",
                   help="also list the GGUF files in this folder (repeatable); train from one by its path")
    m.add_argument("--limit", type=int, default=20, metavar="N", help="at most N Hub results (default 20)")
    m.add_argument("--json", action="store_true", help="print a JSON list")
    m.set_defaults(func=cmd_models)

    e = subparsers.add_parser(
        "estimate",
        help="estimate the peak GPU memory of a run, by component, and whether it fits",
        description="Estimate peak GPU memory (weights, adapters, gradients, optimizer, activations, "
        "logits, allocator overhead, CUDA context) for a model, settings and GPU, with a verdict "
        "(fits / tight / does not fit) and the other recipe's total for comparison. Catalog models "
        "resolve offline; other Hub ids read config.json from the Hub.",
    )
    e.add_argument("--model", metavar="ID", help="Hub id, catalog id or local model directory (default: the preset's)")
    e.add_argument("--gpu", metavar="PROFILE", help="a GPU profile, 'auto' (detect) or 'cpu' (default: the preset's, else auto)")
    e.add_argument("--vram", type=float, metavar="GIB", help="memory budget in GiB instead of the card's")
    e.add_argument("--seq", type=int, metavar="N", help="sequence length in tokens (default 1024)")
    e.add_argument("--batch", type=int, metavar="N", help="micro-batch (default 1)")
    e.add_argument("--grad-accum", type=int, metavar="N", help="gradient accumulation (default 8)")
    e.add_argument("--rank", type=int, metavar="N", help="LoRA rank (default 16)")
    e.add_argument("--alpha", type=float, metavar="N", help="LoRA alpha (default 32)")
    e.add_argument("--dropout", type=float, metavar="P", help="LoRA dropout (default 0)")
    e.add_argument("--optim", metavar="NAME", help="auto, paged_adamw_8bit, adamw_8bit or adamw_torch")
    e.add_argument("--no-grad-ckpt", action="store_true", help="without gradient checkpointing")
    e.add_argument("--offload", choices=["auto", "on", "off"], help="activation offload to CPU (snugtune recipe)")
    e.add_argument("--nproc", type=int, metavar="N",
                   help="a run on N GPUs (train --nproc N): the figures stay per GPU, the batch is N times larger")
    e.add_argument("--recipe", choices=["snugtune", "plain"], default="snugtune",
                   help="snugtune's engine (default) or the plain transformers+peft recipe")
    e.add_argument("--preset", metavar="NAME", help="start from a preset's settings (flags override them)")
    e.add_argument("--autofit", action="store_true",
                   help="keep the settings if they fit, else find the longest sequence that fits (within the "
                   "model's positions); a micro-batch only when faster by the estimate (same effective batch)")
    e.add_argument("--full-context", action="store_true",
                   help="with --autofit: start from the model's whole position range instead of --seq")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_estimate)


# ---- gpus ----------------------------------------------------------------------------------------

def _profile_rows() -> list[str]:
    from core.gpu import PROFILES

    rows = [f"  {'profile':<18} {'memory':>9}  {'cc':>4}  {'bf16':>4}  {'fp16 TFLOPS':>11}  {'GB/s':>5}  card"]
    for p in PROFILES.values():
        cc = f"{p.compute_capability[0]}.{p.compute_capability[1]}"
        rows.append(
            f"  {p.name:<18} {p.memory_gib:6.2f} GiB  {cc:>4}  {'yes' if p.bf16 else 'no':>4}  "
            f"{p.fp16_tflops:11.1f}  {p.bandwidth_gbs:5.0f}  {p.label}"
        )
    return rows


def cmd_gpus(args) -> int:
    from core.gpu import PROFILES, detect_gpus, nvml_status

    gpus = detect_gpus()
    if args.json:
        out = {
            "gpus": [g.to_dict() for g in gpus],
            "nvml": nvml_status(),
            "profiles": [p.to_dict() for p in PROFILES.values()],
        }
        print(json.dumps(out, indent=2))
        return 0
    if gpus:
        for g in gpus:
            cc = f"{g.compute_capability[0]}.{g.compute_capability[1]}"
            print(f"GPU {g.index}: {g.name}  (compute {cc}, bf16 {'yes' if g.bf16 else 'no'}, driver {g.driver})")
            print(f"  memory: {g.total_gib:.2f} GiB total, {g.used_gib:.2f} GiB used, {g.free_gib:.2f} GiB free")
            if g.processes:
                print("  holding memory:")
                for pid, name, used in g.processes:
                    print(f"    {pid:>8}  {name:<24} {used:6.2f} GiB")
            else:
                print("  no other process holds memory on it")
    else:
        print(f"No NVIDIA GPU detected: {nvml_status()}.")
        print("snugtune can still plan for a card: pass --gpu PROFILE to `snugtune estimate` (profiles below),")
        print("or train on the CPU with gpu.profile = 'cpu' (slow; the demo model takes seconds).")
    if args.profiles or not gpus:
        print("")
        print("GPU profiles (memory as the driver reports it; add --vram GIB to cap any of them):")
        print("\n".join(_profile_rows()))
    return 0


# ---- models --------------------------------------------------------------------------------------

def _default_cfg(model_id: str, seq: int = 1024):
    from core.config import RunConfig

    return RunConfig.from_dict({"model": {"name_or_path": model_id}, "data": {"path": "(none)", "max_seq_len": seq}})


def cmd_models(args) -> int:
    from core import catalog, hub
    from core.estimate import fit_badge
    from core.gpu import resolve_gpu

    if args.seq is not None and args.seq <= 0:
        raise UserError(f"--seq must be a positive number of tokens, got {args.seq}")
    if args.limit <= 0:
        raise UserError(f"--limit must be positive, got {args.limit}")
    specs = []
    hub_line = None
    if args.source in ("catalog", "all"):
        specs += catalog.search_catalog(args.search)
    if args.source in ("cache", "all"):
        key = args.search.lower()
        specs += [s for s in catalog.scan_cache() if key in s.id.lower()]
    if args.source in ("gguf", "all"):
        key = args.search.lower()
        specs += [s for s in catalog.scan_gguf(args.gguf) if key in s.id.lower() or key in s.note.lower()]
    if args.source in ("hub", "all"):
        try:
            specs += catalog.search_hub(args.search, sort=args.sort, limit=args.limit)
        except hub.HubUnreachable as exc:
            if args.source == "hub":
                raise
            hub_line = f"Hub unreachable: {exc.message} (showing the catalog and the local cache)"
    gpu = resolve_gpu(args.fits, args.vram) if args.fits else None
    rows = []
    seen = set()
    for s in specs:
        if (s.id, s.source) in seen:
            continue
        seen.add((s.id, s.source))
        badge = fit_badge(s, _default_cfg(s.id, args.seq), gpu) if gpu else None
        rows.append((s, badge))
    if args.json:
        out = []
        for s, badge in rows:
            d = s.to_dict()
            if badge is not None:
                d["fit"] = badge
            out.append(d)
        print(json.dumps({"models": out, "hub": hub_line or "ok", "gpu": gpu.name if gpu else None}, indent=2))
        return 0
    if gpu:
        print(f"fit on {gpu.label} ({gpu.budget_gib:.2f} GiB budget), snugtune recipe, {args.seq} tokens, "
              "micro-batch 1, LoRA r=16:")
    head = f"{'model':<52} {'arch':<12} {'params':>7} {'vocab':>7} {'16-bit':>8}  {'source':<8}"
    if gpu:
        head += "  fit"
    print(head)
    for s, badge in rows:
        extra = ""
        if s.source == "hub":
            bits = []
            if s.downloads is not None:
                bits.append(f"{s.downloads:,} dl")
            if s.likes is not None:
                bits.append(f"{s.likes:,} likes")
            if s.gated:
                bits.append("gated")
            extra = "  " + ", ".join(bits) if bits else ""
        elif s.gated:
            extra = "  gated"
        elif s.source == "gguf":
            extra = f"  {s.note}"
        vocab = f"{s.vocab_size // 1000}k" if s.exact else "?"
        arch = s.model_type if s.exact else "?"
        size = f"{s.size_gib:.2f} GiB" if s.size_gib is not None else "-"
        line = f"{s.id[:52]:<52} {arch[:12]:<12} {s.size_label:>7} {vocab:>7} {size:>8}  {s.source:<8}"
        if gpu:
            line += f"  {badge}"
        print(line + extra)
    if not rows:
        print("(no models match)")
    if hub_line:
        print(hub_line)
    return 0


# ---- estimate ------------------------------------------------------------------------------------

def _build_cfg(args):
    """The RunConfig to estimate: a preset (or defaults) with the flags applied."""
    from core.config import RunConfig

    if args.preset:
        from core.presets import load_preset

        base = load_preset(args.preset).to_dict()
    else:
        if not args.model:
            raise UserError("give --model ID (or --preset NAME)", hint="e.g. snugtune estimate --model Qwen/Qwen2.5-0.5B --gpu gtx-1650")
        base = {"model": {"name_or_path": args.model}, "data": {"path": "(none)"}}
    if args.model:
        base.setdefault("model", {})["name_or_path"] = args.model
    if args.seq is not None:
        if args.seq <= 0:
            raise UserError(f"--seq must be a positive number of tokens, got {args.seq}")
        base.setdefault("data", {})["max_seq_len"] = args.seq
    for flag, section, key in (
        ("batch", "train", "micro_batch"), ("grad_accum", "train", "grad_accum"), ("rank", "lora", "r"),
        ("alpha", "lora", "alpha"), ("dropout", "lora", "dropout"), ("optim", "train", "optimizer"),
        ("offload", "train", "offload_activations"), ("nproc", "gpu", "nproc"),
    ):
        value = getattr(args, flag)
        if value is not None:
            if flag in ("batch", "grad_accum", "rank", "nproc") and value <= 0:
                raise UserError(f"--{flag.replace('_', '-')} must be a positive whole number, got {value}")
            base.setdefault(section, {})[key] = value
    if args.no_grad_ckpt:
        base.setdefault("train", {})["gradient_checkpointing"] = False
    if args.gpu:
        base.setdefault("gpu", {})["profile"] = args.gpu
    if args.vram is not None:
        if args.vram <= 0:
            raise UserError(f"--vram must be a positive number of GiB, got {args.vram}")
        base.setdefault("gpu", {})["vram_budget_gib"] = args.vram
    return RunConfig.from_dict(base, source="snugtune estimate")


def _duration(seconds: float) -> str:
    """12.3 s, 4m05s, 3h02m, 16d11h: not "1426241.0 s" (issue 14)."""
    if seconds < 90:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 90 * 60:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 48 * 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def cmd_estimate(args) -> int:
    from core.catalog import resolve_model
    from core.estimate import autofit, estimate, estimate_step_time, fit_for, format_table
    from core.gpu import resolve_gpu
    from core.plan import with_batch

    cfg = _build_cfg(args)
    gpu = resolve_gpu(cfg.gpu.profile, cfg.gpu.vram_budget_gib, cfg.gpu.device_index)
    spec = resolve_model(cfg.model.name_or_path)
    fit = None
    if args.autofit:
        fit = (fit_for(spec, cfg, gpu, from_full_context=args.full_context) if args.recipe == "snugtune"
               else autofit(spec, with_batch(cfg, spec.max_position_embeddings) if args.full_context else cfg,
                            gpu, args.recipe))
        cfg = with_batch(cfg, fit.max_seq_len, fit.micro_batch, fit.grad_accum)
    est = estimate(spec, cfg, gpu, args.recipe)
    other_recipe = "plain" if args.recipe == "snugtune" else "snugtune"
    other = estimate(spec, cfg, gpu, other_recipe)
    step_s = estimate_step_time(spec, cfg, gpu)
    if args.json:
        out = est.to_dict()
        out["other_recipe"] = {"recipe": other.recipe, "total_gib": round(other.total_gib, 4), "verdict": other.verdict}
        out["model"] = spec.to_dict()
        out["gpu_target"] = gpu.to_dict()
        out["step_time_s"] = round(step_s, 3)
        if fit is not None:
            out["autofit"] = {k: v for k, v in fit.to_dict().items() if k != "estimate"}
        print(json.dumps(out, indent=2))
        return 0
    if gpu.note:
        print(f"note: {gpu.note}")
    if fit is not None:
        if fit.fits:
            print(f"autofit: {fit.max_seq_len} tokens x micro-batch {fit.micro_batch} x grad-accum {fit.grad_accum} "
                  f"(longest that fits at micro-batch 1: {fit.longest_seq_len} tokens)")
        else:
            print("autofit: nothing fits this budget, not even 64 tokens at micro-batch 1")
        for n in fit.notes:
            print(f"autofit: {n}")
        for n in fit.suggestions:
            print(f"to fit: {n}")
        print("")
    print(format_table(est, other))
    if est.plan is not None and args.recipe == "snugtune":
        print("")
        print("plan (what the engine will do, core.plan):")
        print(est.plan.format())
    # the header above says "N tokens x micro-batch": the time line uses the same order (issue 14)
    print(f"time: about {_duration(step_s)} per optimizer step ({cfg.data.max_seq_len} tokens x "
          f"{cfg.train.micro_batch} x {cfg.train.grad_accum} accumulated) on {gpu.label}; "
          "a rough figure from the card's throughput")
    return 0
