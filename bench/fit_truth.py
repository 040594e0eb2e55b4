"""Does auto-fit's choice really train, and how close is it to the longest length that does?

For each model shape x card x starting point, core.estimate.fit_for (the auto-fit the CLI and
the wizard share) chooses a setting; `snugtune train` (the real engine: launcher, Trainer,
savers, CUDA-graph steps where the plan says so) then runs 2 optimizer steps at exactly that
setting on a random-init model of the real shape (memory does not depend on weight values),
under the card's budget: gpu.profile = rtx-3050 (a bf16 consumer card: 0.35 GiB CUDA context
assumed, so the engine caps PyTorch's allocator at budget - 0.35 GiB) with gpu.vram_budget_gib
= 3.82 / 5.79 / 7.79 GiB (what 4, 6 and 8 GB cards report). Gradient accumulation runs at
min(plan's, 2): from the second micro-batch on all LoRA gradients exist, which is the memory
of any accumulation >= 2.

Beside it, one process per (model, card) finds the longest length that really trains at
micro-batch 1 by bisection: the engine's own loading path (core.model.load_for_training with
the plan for each length, savers re-installed per length), one optimizer step x 2 micro-batches
per length (one optimizer step over 2 micro-batches), under the same allocator cap. Probes
(--probes) ask the real engine the same question at one length above the choice (choice / 0.85:
if it runs out of memory, the choice is at least 85% of the longest length that trains).
Engine trials train rows of exactly their length (write_exact_data).

Starting points: "full" = the model's whole context (max_position_embeddings), micro-batch 1,
accumulation 8; "preset" = the presets' defaults (1,024 tokens, micro-batch 1, accumulation 16).

Recorded per row: the choice, the plan's decisions, estimated vs measured peak reserved memory
(torch.cuda.max_memory_reserved, logged by the engine each step), out-of-memory events, and
the choice as a share of the longest length that trains. Trials run as concurrent processes,
each under its own allocator cap (per-process peaks stay valid).

    PYTHONPATH=. python bench/fit_truth.py            # the GPU matrix: ~6 min on one H200 (16 cores)
    PYTHONPATH=. python bench/fit_truth.py --smoke    # the same code on the CPU, a tiny model, seconds
    python bench/fit_truth.py --table FILE.json       # re-render the markdown from a result file
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 2**30
SHAPES = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B-Base",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-3-1b": "google/gemma-3-1b-pt",
}
# The estimator's constants were fitted on bench/results/estimate_accuracy.json (Qwen2.5-0.5B/1.5B,
# Llama-3.2-1B, Gemma-2-2B, Qwen3-0.6B, StableLM-2, SmolLM2-360M). These shapes were never
# part of that fit: held out.
HELD_OUT = {"qwen2.5-3b", "qwen3-1.7b", "llama-3.2-3b", "smollm2-1.7b", "gemma-3-1b"}
CARDS = {"4gb": 3.82, "6gb": 5.79, "8gb": 7.79}
PROFILE = "rtx-3050"
STARTS = {"full": None, "preset": (1024, 1, 16)}
WORDS = ("the of and to in is was for on that with as by at from this are be or an which it not have one "
         "data model train token memory card length step batch loss value layer block chunk").split()


# ---- planning (no GPU) ---------------------------------------------------------------------------

def base_config(model_id: str, seq: int, mb: int, ga: int, budget: float, profile: str = PROFILE):
    from core.config import RunConfig

    gpu = {"profile": profile}
    if budget:
        gpu["vram_budget_gib"] = budget
    return RunConfig.from_dict({
        "gpu": gpu,
        "model": {"name_or_path": model_id},
        "data": {"path": "(bench)", "max_seq_len": seq},
        "train": {"micro_batch": mb, "grad_accum": ga},
    })


KERNELS_OFF_ENV = "SNUGTUNE_KERNELS"


def plan_row(shape: str, card: str, start: str, spec=None, budget=None, profile: str = PROFILE,
             kernels: bool = True) -> dict:
    """What auto-fit chooses for one row, with the plan and the estimate at the choice.

    `kernels=False`: planned as the engine runs with SNUGTUNE_KERNELS=off (transformers' modules: the
    pricing of the CPU, of cards before compute capability 7.0 and of installs without Triton)."""
    if not kernels:
        old = os.environ.get(KERNELS_OFF_ENV)
        os.environ[KERNELS_OFF_ENV] = "off"
        try:
            return dict(plan_row(shape, card, start, spec, budget, profile), kernels_off=True)
        finally:
            if old is None:
                os.environ.pop(KERNELS_OFF_ENV, None)
            else:
                os.environ[KERNELS_OFF_ENV] = old
    from core.catalog import catalog_lookup
    from core.estimate import fit_for
    from core.gpu import resolve_gpu

    spec = spec or catalog_lookup(SHAPES[shape])
    budget = CARDS.get(card) if budget is None else budget
    gpu = resolve_gpu(profile, budget)
    if start == "full":
        cfg = base_config(spec.id, spec.max_position_embeddings, 1, 8, budget, profile)
        fit = fit_for(spec, cfg, gpu, from_full_context=True)
    else:
        seq, mb, ga = STARTS[start]
        cfg = base_config(spec.id, min(seq, spec.max_position_embeddings), mb, ga, budget, profile)
        fit = fit_for(spec, cfg, gpu)
    est = fit.estimate
    return {
        "shape": shape, "card": card, "budget_gib": budget, "start": start, "held_out": shape in HELD_OUT,
        "fits": fit.fits, "seq": fit.max_seq_len, "micro_batch": fit.micro_batch, "grad_accum": fit.grad_accum,
        "longest_est": fit.longest_seq_len, "notes": fit.notes, "suggestions": fit.suggestions,
        "position_limit": spec.max_position_embeddings,
        "est_reserved_gib": round(est.reserved_gib, 4), "est_total_gib": round(est.total_gib, 4),
        "est_allocated_gib": round(est.allocated_gib, 4), "peak_phase": est.peak_phase,
        "plan": est.plan.to_dict() if est.plan is not None else None,
    }


# ---- models and data ---------------------------------------------------------------------------

def build_model(root: Path, shape: str, spec=None, device: str = "cuda") -> Path:
    """A random-init bf16 model of the shape, saved with the demo's tokenizer (ids < 2,048)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.estimate_accuracy import hf_config_kwargs
    from core.catalog import catalog_lookup
    from core.demo import resolve_builtin

    path = root / shape
    if (path / "config.json").exists():
        return path
    spec = spec or catalog_lookup(SHAPES[shape])
    root.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.for_model(spec.model_type, **hf_config_kwargs(spec))
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = root / f".{shape}.tmp"
    m.save_pretrained(tmp)
    del m
    demo = Path(resolve_builtin("builtin:tiny-llama"))
    for f in demo.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(path)
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def write_data(path: Path, tokens: int, seed: int = 0) -> Path:
    """Plain-text samples of ~1,500 words (~2,190 tokens), enough for `tokens` tokens of packed rows.

    Not what the engine trials use since run 5: packed whole samples make rows SHORTER than
    max_seq_len (best-fit of ~2,190-token samples: 6,494-6,799 tokens at 8,192), so runs 1-4
    measured their choices at 80-99% of the chosen length."""
    r = random.Random(seed)
    n = max(2, math.ceil(tokens / 1500 * 1.2))
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(r.choice(WORDS) for _ in range(1500))}) + "\n")
    return path


def write_exact_data(path: Path, seq: int, rows: int, seed: int = 0) -> Path:
    """`rows` plain-text samples, each longer than `seq` tokens (every word is at least one token),
    for data.long_samples = 'truncate': every training row is then exactly `seq` tokens of one
    sample, the longest row the plan is for and the estimate prices (full causal attention over
    the row, as one long document gives)."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(r.choice(WORDS) for _ in range(seq + 64))}) + "\n")
    return path


# ---- one engine run (`snugtune train`) ------------------------------------------------------------

def engine_trial(row: dict, model_dir: Path, work: Path, profile: str = PROFILE, timeout: float = 400,
                 seq: Optional[int] = None, steps: int = 2, packed: bool = False) -> dict:
    """`snugtune train` at the row's choice (or at `seq` tokens: a probe above it, micro-batch 1) for
    `steps` optimizer steps of min(accumulation, 2) micro-batches, every row exactly that long
    (`packed`: rows of whole ~2,190-token samples instead, shorter than the length, as runs 1-4)."""
    probe, n_steps = seq is not None, steps
    seq, mb = (seq, 1) if probe else (row["seq"], row["micro_batch"])
    ga = min(row["grad_accum"], 2)
    name = (f"{row['shape']}-{row['card']}-{row['start']}" + (f"-probe{seq}" if probe else "") + ("-packed" if packed else "")
            + ("-nokernels" if row.get("kernels_off") else ""))
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    if packed:
        data = write_data(d / "data.jsonl", seq * mb * ga * 2 + seq)
    else:
        data = write_exact_data(d / "data.jsonl", seq, mb * ga * steps + 1)
    cfg = d / "run.toml"
    cfg.write_text(
        f'[gpu]\nprofile = "{profile}"\n' + (f'vram_budget_gib = {row["budget_gib"]}\n' if row["budget_gib"] else "") +
        f'[model]\nname_or_path = "{model_dir}"\n'
        f'[data]\npath = "{data}"\nformat = "text"\nmax_seq_len = {seq}\neval_fraction = 0.0\npacking = true\n'
        + ('' if packed else 'long_samples = "truncate"\n') +
        f'[train]\nmicro_batch = {mb}\ngrad_accum = {ga}\nmax_steps = {steps}\nsave_steps = 1000\nlogging_steps = 1\n'
        f'[output]\nname = "{name}"\n'
    )
    env = {**os.environ, "SNUGTUNE_RUNS_DIR": str(d / "runs"), "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    if row.get("kernels_off"):
        env[KERNELS_OFF_ENV] = "off"  # the engine runs transformers' modules, as this row was planned
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "tui.cli", "train", str(cfg)], env=env, capture_output=True,
                           text=True, cwd=REPO, timeout=timeout)
        rc, err = p.returncode, (p.stderr or "")[-800:]
    except subprocess.TimeoutExpired:
        rc, err = -1, f"timed out after {timeout:.0f}s"
    res = {"rc": rc, "wall_s": round(time.time() - t0, 1)}
    run_dirs = sorted((d / "runs").glob(f"{name}*"))
    if not run_dirs:
        res["error"] = err
        return res
    rd = run_dirs[-1]
    events = [json.loads(x) for x in (rd / "events.jsonl").read_text().splitlines() if x.strip()]
    steps = [e for e in events if e["event"] == "step_logged"]
    started = next((e for e in events if e["event"] == "run_started"), {})
    ooms = [e for e in events if e["event"] == "oom_recovered"]
    failed = next((e for e in events if e["event"] == "run_failed"), None)
    res.update(
        steps=len(steps),
        # an OOM the retry could not absorb ends as a user error ("out of memory even at micro-batch 1")
        oom_events=len(ooms) + int(bool(failed and (failed.get("kind") == "oom"
                                                    or "out of memory" in (failed.get("error") or "")))),
        measured_reserved_gib=max((e.get("mem_peak_gib") or 0) for e in steps) if steps else None,
        measured_allocated_gib=(max((e.get("mem_peak_allocated_gib") or 0) for e in steps) or None) if steps else None,
        cuda_graphs=steps[-1].get("cuda_graphs") if steps else None,
        savers=started.get("savers"),
        load_peak=started.get("load_peak"),  # the loading's own peak (engines from run 4b on)
        seq=seq, rows_exact=not packed, max_steps=n_steps,
        engine_plan_keep=(started.get("plan") or {}).get("keep_blocks"),
        engine_plan_cap=(started.get("plan") or {}).get("allocator_cap_gib"),
        plan_file=(rd / "plan.json").is_file(),
        terminal=events[-1]["event"] if events else None,
    )
    if failed:
        res["error"] = (failed.get("error") or "")[:300]
    elif rc != 0:
        res["error"] = err
    return res


# ---- the longest length that trains (one process per model x card) -------------------------------

BISECT = r"""
import json, sys, time, gc
sys.path.insert(0, sys.argv[1])
import torch
from core import plan as P, savers
from core.catalog import spec_from_dir
from core.model import load_for_training
from bench.fit_truth import base_config
a = json.loads(sys.argv[2])
spec = spec_from_dir(a["model"])
if a["device"] == "cuda":
    dev = {"type": "cuda", "index": 0, "name": torch.cuda.get_device_properties(0).name, "capability": "8.6",
           "total_gib": torch.cuda.get_device_properties(0).total_memory / 2**30, "bf16": True}
else:
    dev = {"type": "cpu", "index": None, "name": "cpu", "total_gib": None, "bf16": False}
D = a["device"]
OOM = getattr(torch, "OutOfMemoryError", RuntimeError)
def plan_at(n):
    cfg = base_config(a["model"], n, 1, 2, a["budget"], a.get("profile", "rtx-3050"))
    return P.plan(cfg, spec, P.target_for_device(cfg, dev)), cfg
pl, cfg = plan_at(a["lengths"][0])
if D == "cuda":
    savers.apply_vram_budget(pl, 0)
model, _, _ = load_for_training(cfg, dev, source=a["model"], plan=pl)
params = [p for p in model.parameters() if p.requires_grad]
if D == "cuda":
    import bitsandbytes as bnb
    opt = bnb.optim.PagedAdamW8bit(params, lr=1e-5)
else:
    opt = torch.optim.AdamW(params, lr=1e-5)
model.train()
lo, hi = a["lo"], a["hi"]
def trains(n):
    pl, _ = plan_at(n)
    savers.install_savers(model, pl)
    if D == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(1):  # one optimizer step over 2 micro-batches: every gradient exists
            for _ in range(2):
                ids = torch.randint(0, 2000, (1, n), device=D)
                with torch.autocast(D, dtype=torch.bfloat16, enabled=D == "cuda"):
                    out = model(input_ids=ids, labels=ids)
                (out.loss / 2).backward()
                del out
            opt.step(); opt.zero_grad(set_to_none=True)
        if D == "cuda":
            torch.cuda.synchronize()
        ok = True
    except OOM as exc:
        if D != "cuda":
            raise
        ok = False
    opt.zero_grad(set_to_none=True)
    gc.collect()
    peak = alloc = 0.0
    if D == "cuda":
        torch.cuda.empty_cache()
        peak = torch.cuda.max_memory_reserved() / 2**30
        alloc = torch.cuda.max_memory_allocated() / 2**30
    print("@@" + json.dumps({"len": n, "ok": ok, "peak_reserved_gib": round(peak, 3),
                             "peak_allocated_gib": round(alloc, 3)}), flush=True)
    FAILED.append(n) if not ok else None
    return ok
FAILED = []
t_end = time.time() + a["time_s"]
step = a["step"]
# hi first: if it does not train, the longest is below it
if trains(hi):
    lo = hi
    while lo < a["max"] and time.time() < t_end:
        nxt = min(a["max"], (lo * 3 // 2) // step * step)
        if nxt <= lo or not trains(nxt):
            hi = nxt
            break
        lo = nxt
    else:
        hi = lo
while hi - lo > max(step, lo // 32) and time.time() < t_end:
    mid = (lo + hi) // 2 // step * step
    if mid <= lo:
        break
    if trains(mid):
        lo = mid
    else:
        hi = mid
print("@@" + json.dumps({"longest": lo, "fails_at": min(FAILED) if FAILED else None}), flush=True)
"""


def bisect_trial(shape: str, card: str, model_dir: Path, choice: int, max_len: int, budget: float,
                 profile: str = PROFILE, time_s: float = 150, timeout: float = 300, device: str = "cuda") -> dict:
    step = 64
    lo = max(step, choice // step * step)
    # if even lo / 0.85 does not train, the choice is >= 85% of the longest; the bisection narrows it
    hi = min(max_len, math.ceil(lo / 0.85 / step) * step)
    if hi <= lo:
        return {"longest": lo, "fails_at": None, "tries": [], "note": "the choice is the model's position limit"}
    args = {"model": str(model_dir), "budget": budget, "profile": profile, "lo": lo, "hi": hi, "max": max_len,
            "device": device,
            "step": step, "lengths": [hi], "time_s": time_s}
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    try:
        p = subprocess.run([sys.executable, "-c", BISECT, str(REPO), json.dumps(args)], capture_output=True,
                           text=True, env=env, timeout=timeout)
        out, err = p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        out, err = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
    recs = [json.loads(x[2:]) for x in out.splitlines() if x.startswith("@@")]
    tries = [r for r in recs if "len" in r]
    final = next((r for r in recs if "longest" in r), None)
    res = {"tries": tries}
    if final:
        res.update(final)
    else:
        ok = [t["len"] for t in tries if t["ok"]]
        bad = [t["len"] for t in tries if not t["ok"]]
        res.update(longest=max(ok) if ok else None, fails_at=min(bad) if bad else None,
                   error=(err or "")[-600:])
    return res


# ---- the whole matrix -----------------------------------------------------------------------------

DEADLINE = [float("inf")]  # wall clock after which no new trial starts (the device call's limit)


def _left() -> float:
    return DEADLINE[0] - time.time()


class MemPool:
    """Admit processes while their caps (+ context) fit in the GPU's memory."""

    def __init__(self, total_gib: float):
        self.free = total_gib
        self.cv = threading.Condition()

    def run(self, need: float, fn, *a, **k):
        with self.cv:
            self.cv.wait_for(lambda: self.free >= need)
            self.free -= need
        if _left() < 30:
            with self.cv:
                self.free += need
                self.cv.notify_all()
            return {"skipped": "out of time"}
        try:
            return fn(*a, **k)
        finally:
            with self.cv:
                self.free += need
                self.cv.notify_all()


def trial_steps(row: dict, steps: int) -> int:
    """Optimizer steps of an engine trial at a row's choice: `steps`, but 2 at least where the plan runs
    CUDA-graph steps (two micro-batches run eagerly before the capture: with accumulation 2 the graph's
    memory comes in the second optimizer step)."""
    return max(steps, 2) if (row.get("plan") or {}).get("cuda_graphs") else steps


def probe_length(choice: int, share: float, limit: int, step: int = 64) -> Optional[int]:
    """The length a probe of `share` trains: the choice over that share rounded down to a step of 64
    (so that running out of memory there puts the choice at `share` or more of the longest), at most
    the position limit; None when that is not above the choice (the choice is the limit)."""
    n = min(limit, math.floor(choice / share / step) * step)
    return n if n > choice else None


def run_matrix(shapes, cards, starts, root: Path, out: Path, *, smoke: bool = False, jobs: int = 15,
               mem_gib: float = 120.0, only_rows: Optional[list] = None, bisect_cards: Optional[list] = None,
               command: str = "", probes: Optional[list] = None, steps: int = 2, bisect_rows: Optional[list] = None,
               builders: int = 2, packed_rows: Optional[list] = None) -> dict:
    from core.catalog import catalog_lookup

    t0 = time.time()
    specs = {s: catalog_lookup(SHAPES[s]) for s in shapes} if not smoke else {s: _smoke_spec() for s in shapes}
    rows = []
    for s in shapes:
        for c in cards:
            for st in starts:
                rows.append(plan_row(s, c, st, spec=specs[s], budget=cards[c], profile=_profile(smoke)))
    if only_rows:  # in the order given: the device call's time runs out on the last ones first
        # (SHAPE:CARD:START:nokernels: the same row planned and trained with SNUGTUNE_KERNELS=off)
        keyed = {(r["shape"], r["card"], r["start"]): r for r in rows}
        rows = [plan_row(*k[:3], spec=specs[k[0]], budget=cards[k[1]], profile=_profile(smoke), kernels=False)
                if k[3:] == ("nokernels",) else keyed[tuple(k[:3])]
                for k in only_rows if tuple(k[:3]) in keyed]
        shapes = [s for s in dict.fromkeys(k[0] for k in only_rows) if s in specs]
    print(f"planned {len(rows)} rows in {time.time() - t0:.1f}s", flush=True)
    models: dict[str, Path] = {}
    built = {s: threading.Event() for s in shapes}

    todo = list(shapes)
    todo_lock = threading.Lock()
    # transformers' lazy imports are not thread-safe: two builders importing AutoConfig at once
    # failed one of them (run 4: "cannot import name 'AutoConfig'"); import once, here
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    def build_all():
        # two builders: saving is disk- and CPU-bound, and each holds one model's bf16 weights
        # on the device (at most ~6 GiB) while it saves
        while True:
            with todo_lock:
                if not todo:
                    return
                s = todo.pop(0)
            try:
                models[s] = build_model(root, s, spec=specs[s], device="cpu" if smoke else "cuda")
            except Exception as exc:  # noqa: BLE001 - the rows of this shape say why
                print(f"build {s} failed: {exc!r}", flush=True)
            built[s].set()
            print(f"built {s} at {time.time() - t0:.0f}s", flush=True)

    for _ in range(1 if smoke else builders):
        threading.Thread(target=build_all, daemon=True).start()
    pool = MemPool(mem_gib)
    work = root / "work"

    def do_engine(row):
        built[row["shape"]].wait()
        if row["shape"] not in models:
            row["engine"] = {"skipped": "model build failed"}
            return
        if not row["fits"]:
            row["engine"] = {"skipped": "auto-fit says nothing fits"}
            return
        # the cap (budget - 0.35) + the context outside it (0.74-0.81 GiB measured on the H200)
        need = (row["budget_gib"] or 0) + 0.5
        row["engine"] = pool.run(need, engine_trial, row, models[row["shape"]], work, _profile(smoke),
                                 timeout=120 if smoke else max(30, min(300, _left())), steps=trial_steps(row, steps))
        if packed_rows and (row["shape"], row["card"], row["start"]) in packed_rows and not row.get("kernels_off"):
            # the same choice on packed rows of whole samples (shorter than the length): what a user's
            # short samples give; shorter rows must not peak above the planned one (Plan.blocks_at)
            row["engine_packed"] = pool.run(need, engine_trial, row, models[row["shape"]], work, _profile(smoke),
                                            timeout=120 if smoke else max(30, min(300, _left())), steps=steps,
                                            packed=True)
            ep = row["engine_packed"]
            print(f"engine (packed rows) {row['shape']} {row['card']} {row['start']}: rc {ep.get('rc')} oom "
                  f"{ep.get('oom_events')} meas {ep.get('measured_reserved_gib')} / {ep.get('measured_allocated_gib')}",
                  flush=True)
        e = row["engine"]
        print(f"engine {row['shape']} {row['card']} {row['start']}: seq {row['seq']} x {row['micro_batch']} "
              f"rc {e.get('rc')} oom {e.get('oom_events')} meas {e.get('measured_reserved_gib')} "
              f"est {row['est_reserved_gib']} ({time.time() - t0:.0f}s)", flush=True)

    bis: dict[tuple, dict] = {}

    def do_bisect(shape, card):
        built[shape].wait()
        if shape not in models:
            bis[(shape, card)] = {"skipped": "model build failed"}
            return
        full = next((r for r in rows if r["shape"] == shape and r["card"] == card and r["start"] == "full"
                     and not r.get("kernels_off")), None)
        if full is None or not full["fits"]:
            bis[(shape, card)] = {"skipped": "nothing fits"}
            return
        choice = full["longest_est"]
        max_len = specs[shape].max_position_embeddings
        if smoke:  # the CPU never runs out of memory: a short climb exercises the same code
            choice, max_len = 128, 256
        bis[(shape, card)] = pool.run((cards[card] or 0) + 0.5, bisect_trial, shape, card, models[shape], choice,
                                      max_len, cards[card], _profile(smoke),
                                      time_s=20 if smoke else max(20, min(110, _left() - 40)),
                                      timeout=120 if smoke else max(30, min(240, _left())),
                                      device="cpu" if smoke else "cuda")
        print(f"bisect {shape} {card}: {json.dumps({k: v for k, v in bis[(shape, card)].items() if k != 'tries'})} "
              f"({time.time() - t0:.0f}s)", flush=True)

    probed: dict[tuple, list] = {}

    def do_probe(shape, card, share):
        # the real engine (`snugtune train`, micro-batch 1) at choice / share: if it runs out of
        # memory, the choice is at least `share` of the longest length that trains
        built[shape].wait()
        full = next((r for r in rows if r["shape"] == shape and r["card"] == card and r["start"] == "full"
                     and not r.get("kernels_off")), None)
        if shape not in models or full is None or not full["fits"]:
            return
        # (on the CPU a short probe above a pretend choice of 128 exercises the same code)
        n = probe_length(128 if smoke else full["seq"], share, 256 if smoke else specs[shape].max_position_embeddings)
        if n is None:
            return
        e = pool.run((full["budget_gib"] or 0) + 0.5, engine_trial, full, models[shape], work, _profile(smoke),
                     timeout=120 if smoke else max(30, min(300, _left())), seq=n, steps=1)
        status, oom = _status(e)
        ok = None if e.get("skipped") else (not oom and bool(e.get("steps")))
        if ok is False and not oom:
            ok = None  # neither trained nor ran out of memory (time): says nothing
        probed.setdefault((shape, card), []).append({
            "len": n, "ok": ok, "share": share, "engine": True, "status": status,
            "peak_reserved_gib": e.get("measured_reserved_gib"), "peak_allocated_gib": e.get("measured_allocated_gib"),
            "wall_s": e.get("wall_s"), "error": (e.get("error") or "")[:200] or None})
        print(f"probe {shape} {card} {n} (choice / {share}): {status} meas {e.get('measured_reserved_gib')} "
              f"({time.time() - t0:.0f}s)", flush=True)

    tasks = []
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        for s in shapes:  # bisections first: they take longest
            for c in cards:
                if bisect_cards is not None and c not in bisect_cards:
                    continue
                if bisect_rows is not None and (s, c) not in bisect_rows:
                    continue
                if any(r["shape"] == s and r["card"] == c and r["start"] == "full" for r in rows):
                    tasks.append(ex.submit(do_bisect, s, c))
        for item in (probes or []):  # in the order given, interleaved with the rows by the pool
            tasks.append(ex.submit(do_probe, *item))
        for r in rows:
            tasks.append(ex.submit(do_engine, r))
        for t in tasks:
            t.result()
    for r in rows:
        b = {} if r.get("kernels_off") else bis.get((r["shape"], r["card"]), {})
        r["longest_trains"] = b.get("longest")
        r["fails_at"] = b.get("fails_at")
        r["bisect_tries"] = b.get("tries")
        if b.get("error"):
            r["bisect_error"] = b["error"]
        if r["start"] == "full" and probed.get((r["shape"], r["card"])) and not r.get("kernels_off"):
            # the engine's probes count as tries: a length that trained, a length that ran out
            tries = list(r["bisect_tries"] or []) + [t for t in probed[(r["shape"], r["card"])] if t["ok"] is not None]
            r["probes"] = probed[(r["shape"], r["card"])]
            r["bisect_tries"] = tries
            ok = [t["len"] for t in tries if t["ok"]]
            bad = [t["len"] for t in tries if t["ok"] is False]
            e = r.get("engine") or {}
            if r["micro_batch"] == 1 and e.get("steps") and not e.get("oom_events"):
                ok.append(r["seq"])
            r["longest_trains"] = max(ok) if ok else r["longest_trains"]
            r["fails_at"] = min(bad) if bad else r["fails_at"]
    result = {"meta": {"command": command or ("PYTHONPATH=. python bench/fit_truth.py" + (" --smoke" if smoke else "")),
                       "wall_s": round(time.time() - t0, 1), "profile": _profile(smoke),
                       "held_out": sorted(HELD_OUT), "cards_gib": cards},
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    name = "fit_truth_smoke" if smoke else "fit_truth"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return result


def _profile(smoke: bool) -> str:
    return "cpu" if smoke else PROFILE


def _smoke_spec():
    from core.catalog import TINY_LLAMA

    return TINY_LLAMA


def _status(e: dict) -> tuple[str, bool]:
    """(what happened, ran out of memory) for one engine run's record."""
    if e.get("skipped"):
        return e["skipped"], False
    oom = bool(e.get("oom_events")) or "out of memory" in (e.get("error") or "")
    if oom:
        return "OUT OF MEMORY", True
    if e.get("rc") == 0:
        return "ok" + (f" ({e['run']})" if e.get("run") else ""), False
    if e.get("steps"):
        return f"{e['steps']} of {e.get('max_steps') or 2} steps, then the call's time ran out" + (f" ({e['run']})" if e.get("run") else ""), False
    return f"no step logged (rc {e.get('rc')})", False


def _position_limit(row: dict) -> Optional[int]:
    if row.get("position_limit"):
        return row["position_limit"]
    if row["shape"] not in SHAPES:
        return None
    from core.catalog import catalog_lookup

    return catalog_lookup(SHAPES[row["shape"]]).max_position_embeddings


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# fit_truth: auto-fit's choices, trained for real",
        "",
        f"Command: `{meta['command']}`. Cards: " +
        ", ".join(f"{k} = {v} GiB budget" for k, v in meta["cards_gib"].items()) +
        f", profile {meta['profile']} (allocator capped at budget - 0.35 GiB). Held out from every constant "
        f"fitted before fit_truth (bench/results/estimate_accuracy.json's models): {', '.join(meta['held_out'])} "
        f"(marked *); the two backward terms added after run 1 (ATTN_BWD_BYTES, NORM_BWD_BYTES in "
        f"core/estimate.py) were chosen on runs 1-2, and the verdict's allocator need (a share of per-step "
        f"memory only) on runs 1-3's 4 GB bisections, these rows included. Engine trials from run 5 on "
        f"train rows of exactly the chosen length (one sample a row, data.long_samples = 'truncate'); runs "
        f"1-4 trained packed rows of whole ~2,190-token samples, 80-99% of it. `longest that trains`: the "
        "longest length that trained at micro-batch 1 (the bisection's own loop, and from run 5 on the real "
        "engine's probes above the choice) and, in brackets, the shortest that ran out; the "
        "share is the choice over that range (the true longest lies in it). `allocated`: the estimate's "
        "and the engine's peak max_memory_allocated (logged from run 4 on).",
        "",
    ]
    if meta.get("estimates"):
        lines += [f"Estimates: {meta['estimates']}.", ""]
    lines += [
        "| model | card | start | choice (seq x mb x accum) | kept blocks | offload | est. reserved GiB | "
        "measured GiB | error % | allocated est. / measured GiB | run | longest that trains | choice / longest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    errs, ooms, lows, unknown = [], 0, [], 0
    for r in result["rows"]:
        e = r.get("engine") or {}
        plan = r.get("plan") or {}
        meas = e.get("measured_reserved_gib")
        err = 100 * (r["est_reserved_gib"] - meas) / meas if meas else None
        if err is not None:
            errs.append(abs(err))
        status, oom = _status(e)
        ooms += oom
        lt, fa = r.get("longest_trains"), r.get("fails_at")
        share = ""
        if r["start"] == "full" and r["fits"]:
            if lt and fa:
                # runs can disagree at the boundary (one trained a length another ran out below):
                # the share then lies between the two
                lo_share, hi_share = r["seq"] / max(fa, lt), min(1.0, r["seq"] / min(fa, lt))
                lows.append(lo_share)
                share = f"{lo_share:.0%}-{hi_share:.0%}" + (" (runs disagree at the boundary)" if lt > fa else "")
            elif lt and r["seq"] == _position_limit(r):
                share = "100% (position limit)"
            elif lt and _position_limit(r) and r["seq"] / _position_limit(r) >= 0.85:
                # no length past the position limit can be chosen: the limit bounds the longest
                lows.append(r["seq"] / _position_limit(r))
                share = f">= {r['seq'] / _position_limit(r):.0%} (position limit {_position_limit(r)})"
            elif lt:
                share = "no bracket (not bisected)"
                unknown += 1
            else:
                unknown += 1
        star = ("*" if r.get("held_out") else "") + (" (kernels off)" if r.get("kernels_off") else "")
        choice = f"{r['seq']} x {r['micro_batch']} x {r['grad_accum']}" if r["fits"] else "nothing fits"
        lt_s = "-" if lt is None else (f"{lt}" + (f" ({fa})" if fa else ""))
        ma = e.get("measured_allocated_gib")
        alloc_s = f"{r.get('est_allocated_gib', 0):.2f} / " + ("-" if ma is None else f"{ma:.2f}")
        lines.append(
            f"| {r['shape']}{star} | {r['card']} | {r['start']} | {choice} | {plan.get('keep_blocks', '-')} | "
            f"{'yes' if plan.get('offload') else 'no'} | {r['est_reserved_gib']:.2f} | "
            f"{'-' if meas is None else f'{meas:.2f}'} | {'-' if err is None else f'{err:+.1f}'} | {alloc_s} | "
            f"{status} | {lt_s if r['start'] == 'full' else ''} | {share} |")
    lines.append("")
    if errs:
        within = sum(1 for x in errs if x <= 5.0)
        lines.append(f"Estimate vs measured peak reserved: max |error| {max(errs):.1f}%, mean {sum(errs) / len(errs):.1f}% "
                     f"over {len(errs)} rows; {within} within 5%.")
    lines.append(f"Runs that ran out of memory at auto-fit's choice: {ooms}.")
    if lows:
        lines.append(f"Choice / longest length that trains, lower bound (full-context rows with both ends measured): "
                     f"min {min(lows):.0%} over {len(lows)} rows; {sum(1 for x in lows if x >= 0.85)} at 85% or more. "
                     f"{unknown} full-context rows have no bracket.")
    return "\n".join(lines) + "\n"


def rescore(path: Path) -> dict:
    """Today's estimator against stored measurements: each measured row re-estimated with the
    decisions it ran with (kept blocks, offload), the measurement untouched. Needs no GPU."""
    from core.catalog import catalog_lookup
    from core.estimate import estimate
    from core.gpu import resolve_gpu
    from core.plan import plan

    res = json.loads(Path(path).read_text())
    for r in res["rows"]:
        if not r.get("fits"):
            continue
        spec = catalog_lookup(SHAPES[r["shape"]])
        cfg = base_config(spec.id, r["seq"], r["micro_batch"], min(r["grad_accum"], 2), r["budget_gib"])
        gpu = resolve_gpu(res["meta"].get("profile", PROFILE), r["budget_gib"])
        ran = r.get("plan") or {}
        p = plan(cfg, spec, gpu, keep=ran.get("keep_blocks", 0))
        est = estimate(spec, cfg, gpu, plan=p, offload=ran.get("offload"))
        r["est_reserved_gib"] = round(est.reserved_gib, 4)
        r["est_total_gib"] = round(est.total_gib, 4)
    res["meta"]["estimates"] = f"rescored by today's estimator: python bench/fit_truth.py --rescore {path}"
    return res


def combine(paths: list[Path], bisect_paths: Optional[list] = None) -> dict:
    """Today's auto-fit choices, each with the measurement of a run that trained exactly that setting
    (the latest such run, named in the row), re-estimated by today's code; the longest length that
    trains from the tries of every run (the longest that trained) and the shortest that did not in
    the runs of `bisect_paths` (default: all; after an engine change that lowers memory, the runs with
    today's engine). Needs no GPU."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for res, p in zip(runs, paths):
        for r in res["rows"]:
            r["_run"] = Path(p).stem.replace("fit_truth_", "")
    bis_names = None if bisect_paths is None else {Path(p).stem.replace("fit_truth_", "") for p in bisect_paths}
    tries: dict[tuple, list] = {}
    ran: dict[tuple, list] = {}
    for res in runs:
        for r in res["rows"]:
            if r.get("kernels_off"):
                continue  # planned and trained with SNUGTUNE_KERNELS=off: not today's default choice
            key = (r["shape"], r["card"])
            # the other runs' lengths that trained still count (the engine change since, the offload
            # bound, only lowers memory), their out-of-memory lengths do not
            keep_all = bis_names is None or r["_run"] in bis_names
            tries.setdefault(key, []).extend(t for t in (r.get("bisect_tries") or []) if keep_all or t["ok"])
            ran.setdefault((r["shape"], r["card"], r["start"]), []).append(r)
    rows = []
    for shape in SHAPES:
        for card in CARDS:
            for start in STARTS:
                now = plan_row(shape, card, start)
                p = now.get("plan") or {}
                match = None
                for old in ran.get((shape, card, start), []):
                    op = old.get("plan") or {}
                    if ((old["seq"], old["micro_batch"], op.get("keep_blocks"), op.get("offload"))
                            == (now["seq"], now["micro_batch"], p.get("keep_blocks"), p.get("offload"))):
                        match = old  # later runs override earlier ones
                now["engine"] = dict(match["engine"]) if match else {"skipped": "this choice was not run"}
                if match is None:
                    now["engine"]["rc"] = None
                else:
                    now["engine"]["run"] = match["_run"]
                t = list(tries.get((shape, card), []))
                e = now["engine"]
                if start == "full" and now["micro_batch"] == 1 and e.get("steps") and not e.get("oom_events"):
                    t.append({"len": now["seq"], "ok": True})
                ok = [x["len"] for x in t if x["ok"]]
                bad = [x["len"] for x in t if not x["ok"]]
                now["longest_trains"] = max(ok) if ok else None
                now["fails_at"] = min(bad) if bad else None
                now["bisect_tries"] = t
                rows.append(now)
    meta = dict(runs[-1]["meta"])
    meta["cards_gib"] = dict(CARDS)
    meta["estimates"] = ("today's code: each row is today's auto-fit choice, with the measurement of the latest run "
                         "that trained exactly that setting (else 'not run')")
    meta["command"] = ("python bench/fit_truth.py --combine " + " ".join(str(p) for p in paths) +
                       (" --bisect-from " + " ".join(str(p) for p in bisect_paths) if bisect_paths else "") +
                       " (measurements: " + "; ".join(r["meta"]["command"] for r in runs) + ")")
    return {"meta": meta, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the tiny built-in model on the CPU (seconds)")
    ap.add_argument("--only", default=os.environ.get("FIT_ONLY", ""), help="comma-separated shapes")
    ap.add_argument("--cards", default="", help="comma-separated cards (4gb,6gb,8gb)")
    ap.add_argument("--table", metavar="FILE.json", help="re-render the markdown of a result file")
    ap.add_argument("--jobs", type=int, default=15)
    ap.add_argument("--combine", nargs="+", metavar="FILE.json",
                    help="today's choices with the measurements of the runs that trained them")
    ap.add_argument("--bisect-from", nargs="+", metavar="FILE.json",
                    help="with --combine: take the longest length that trains from these runs only")
    ap.add_argument("--rescore", metavar="FILE.json", help="today's estimator against a result file's measurements")
    ap.add_argument("--rows", default=os.environ.get("FIT_ROWS", ""),
                    help="only these rows, shape:card:start comma-separated, run in this order (the device "
                         "call's time runs out on the last ones first)")
    ap.add_argument("--bisect-cards", default="", help="bisect only on these cards (comma-separated)")
    ap.add_argument("--bisect-rows", default="", help="bisect only these SHAPE:CARD (comma-separated)")
    ap.add_argument("--probes", default="",
                    help="SHAPE:CARD:SHARE,...: the real engine at the full-context choice / SHARE (micro-batch 1, "
                         "one optimizer step): out of memory there means the choice is >= SHARE of the longest")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps of each engine trial at a choice")
    ap.add_argument("--builders", type=int, default=2, help="threads building the random-init models")
    ap.add_argument("--mem-gib", type=float, default=120.0, help="GPU memory the concurrent trials may take")
    ap.add_argument("--packed-rows", default="", help="SHAPE:CARD:START,...: these rows also on packed rows of whole "
                                                      "samples (shorter than the choice)")
    a = ap.parse_args(argv)
    if a.combine:
        res = combine([Path(x) for x in a.combine], [Path(x) for x in a.bisect_from] if a.bisect_from else None)
        out = Path(os.environ.get("OUT") or REPO / "bench" / "results")
        (out / "fit_truth.json").write_text(json.dumps(res, indent=1))
        (out / "fit_truth.md").write_text(markdown(res))
        print(markdown(res))
        return 0
    if a.rescore:
        res = rescore(Path(a.rescore))
        print(markdown(res))
        return 0
    if a.table:
        res = json.loads(Path(a.table).read_text())
        Path(a.table).with_suffix(".md").write_text(markdown(res))
        print(markdown(res))
        return 0
    out = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    root = Path(os.environ.get("FIT_ROOT") or tempfile.mkdtemp(prefix="fit-truth-"))
    DEADLINE[0] = time.time() + float(os.environ.get("FIT_DEADLINE_S", 1e9))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    probes = [(x.split(":")[0], x.split(":")[1], float(x.split(":")[2])) for x in a.probes.split(",") if x]
    if a.smoke:
        # the CPU "card": RAM is the budget; the tiny model's shape stands in for each real one
        res = run_matrix(["tiny"], {"cpu": None}, ["full", "preset"], root, out, smoke=True, jobs=2, mem_gib=1e9,
                         probes=[("tiny", "cpu", 0.85)] if a.probes else None, steps=a.steps,
                         packed_rows=[("tiny", "cpu", "preset")] if a.packed_rows else None)
        return 0 if all((r.get("engine") or {}).get("rc") == 0 for r in res["rows"]) else 1
    shapes = [s for s in (a.only.split(",") if a.only else SHAPES) if s]
    cards = {c: CARDS[c] for c in (a.cards.split(",") if a.cards else CARDS)}
    only_rows = [tuple(x.split(":")) for x in a.rows.split(",") if x] or None
    if only_rows:
        shapes = [s for s in dict.fromkeys(k[0] for k in only_rows)]
        cards = {c: CARDS[c] for c in dict.fromkeys(k[1] for k in only_rows)}
    command = "PYTHONPATH=. python bench/fit_truth.py " + " ".join(sys.argv[1:] if argv is None else argv)
    bisect_rows = [tuple(x.split(":")[:2]) for x in a.bisect_rows.split(",") if x] or None
    run_matrix(shapes, cards, list(STARTS), root, out, jobs=a.jobs, only_rows=only_rows,
               bisect_cards=[c for c in a.bisect_cards.split(",") if c] or None, command=command.strip(),
               probes=probes, steps=a.steps, bisect_rows=bisect_rows, builders=a.builders, mem_gib=a.mem_gib,
               packed_rows=[tuple(x.split(":")) for x in a.packed_rows.split(",") if x] or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
