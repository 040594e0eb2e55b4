"""7-8B models on 8 and 12 GB cards, and the 4 GB rows at their limits, through `snugtune train`.

Random-init models of the real shapes (memory does not depend on weight values), built once on
the GPU and saved in bf16 with the demo's tokenizer. Per row, two processes run concurrently,
each under its own allocator cap (per-process peaks stay valid):

* engine: `snugtune train` (launcher, plan, Trainer, savers) for 2 optimizer steps of one packed
  row of the target length, micro-batch 1, on gpu.profile = rtx-4060-ti-16gb (a bf16 consumer
  card: the plan assumes a 0.35 GiB CUDA context, so PyTorch's allocator is capped at the budget
  less 0.35 GiB: 3.65 / 7.65 / 11.65 GiB for 4 / 8 / 12 GB). Recorded: the plan's decisions,
  the savers applied, the peak reserved memory the engine logs, the losses, the peak host RAM.
* tries: one process loads the model through the engine's own loading path
  (core.model.load_for_training) and trains 2 optimizer steps at each listed (length, savers)
  pair, savers re-installed per length as the plan for that length decides; "none" forces the
  plan's CPU embedding and 8-bit head off, "emb" leaves only the CPU embedding: what each saver
  is worth, measured.

    PYTHONPATH=. python bench/big_models.py            # the GPU rows, ~5 min on one H200
    PYTHONPATH=. python bench/big_models.py --smoke    # the same code on the CPU, a tiny model
    python bench/big_models.py --table FILE.json       # re-render the markdown
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.fit_truth import build_model, write_data  # noqa: E402

PROFILE = "rtx-4060-ti-16gb"  # bf16, 0.35 GiB context assumed, 16 GB: any budget up to 12 GB is allowed
SHAPES = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",
    "gemma-2-2b": "google/gemma-2-2b",
}
CARDS = {"4gb": 4.0, "8gb": 8.0, "12gb": 12.0}
# Unsloth's published longest context for Llama 3.1 8B, QLoRA r=32, batch 1 (its benchmark table), and
# its 4 GB limits measured under the same 3.65 GiB cap (/work/shared/BASELINE.md).
UNSLOTH = {("llama-3.1-8b", "8gb"): "2,972 (published)", ("llama-3.1-8b", "12gb"): "21,848 (published)",
           ("qwen2.5-1.5b", "4gb"): "16,320", ("llama-3.2-1b", "4gb"): "16,576", ("qwen2.5-3b", "4gb"): "7,616",
           ("gemma-2-2b", "4gb"): "does not fit at 128"}
# (shape, card, LoRA rank, engine length = the target, tries: (length, savers) pairs)
ROWS = [
    ("llama-3.1-8b", "8gb", 32, 8192, [(8192, "none"), (12288, "emb"), (12288, "auto"), (16384, "auto")]),
    ("llama-3.1-8b", "8gb", 32, 16384, [(20480, "auto")]),
    ("llama-3.1-8b", "12gb", 32, 32768, [(32768, "none"), (40960, "auto")]),
    ("qwen2.5-7b", "8gb", 32, 8192, [(8192, "none"), (12288, "auto"), (16384, "auto")]),
    ("qwen2.5-1.5b", "4gb", 16, 32768, [(32768, "none"), (28672, "auto")]),
    ("llama-3.2-1b", "4gb", 16, 32768, [(26624, "auto"), (28672, "auto"), (30720, "auto")]),
    ("qwen2.5-3b", "4gb", 16, 16384, [(12288, "auto"), (14336, "auto")]),
    ("gemma-2-2b", "4gb", 16, 8192, [(8192, "none"), (6144, "auto")]),
]
# --set lean: the lean RMSNorm (added after runs 1-2) at the lengths that ran out there; `nolean` = it forced off
ROWS_LEAN = [
    ("llama-3.1-8b", "8gb", 32, 16384, [(14336, "nolean"), (14336, "auto")]),
    ("llama-3.2-1b", "4gb", 16, 28672, [(28672, "nolean"), (30720, "auto"), (32768, "auto")]),
    ("qwen2.5-3b", "4gb", 16, 18432, [(20480, "auto")]),
]
# --set autofit: the engine at auto-fit's choice from the model's full context (what `snugtune
# estimate --autofit --full-context` and the wizard pick), r = 32; tries at lengths around it,
# with the lean RMSNorm on (auto) and off, so its worth is measured beside the choice.
AUTOFIT = [("llama-3.1-8b", "8gb", 32, [12288, 14336]), ("llama-3.1-8b", "12gb", 32, [32768, 36864]),
           ("qwen2.5-7b", "8gb", 32, [16384, 18432])]
# --set run4: the lean norm with its outputs rebuilt (core/bigsavers.py _NormOutput) and priced as
# measured: the four 4 GB rows with train.big_savers = "on" (the 6th field), Llama-3.2-1B at 32,768
# beside `keepout` (the outputs kept, the lean norm of run 3) and `nolean`; the 7-8B rows at auto-fit's
# new choices (autofit_rows), with `keepout` beside `auto` at one shorter length.
RUN4_SMALL = [
    ("llama-3.2-1b", "4gb", 16, 32768, [(32768, "keepout"), (32768, "nolean"), (36864, "auto")], "on"),
    ("qwen2.5-1.5b", "4gb", 16, 32768, [], "on"),
    ("qwen2.5-3b", "4gb", 16, 16384, [(20480, "auto")], "on"),
    ("gemma-2-2b", "4gb", 16, 8192, [], "on"),
]
RUN4_TRIES = {("llama-3.1-8b", "8gb"): [(16384, "auto"), (16384, "keepout")],
              ("llama-3.1-8b", "12gb"): [],  # its engine row is the call's longest; host RAM for one 12 GB process
              ("qwen2.5-7b", "8gb"): [(20480, "auto"), (20480, "keepout")]}


def run4_rows() -> list:
    return RUN4_SMALL + [(shape, card, r, seq, RUN4_TRIES[(shape, card)])
                         for shape, card, r, seq, _ in autofit_rows()]


def estimated(shape, card, r, seq, big=None, model_id=None):
    """The estimate's reserved GiB at this row as the plan decides it (None where it cannot say)."""
    try:
        from core.catalog import catalog_lookup
        from core.config import RunConfig
        from core.estimate import estimate
        from core.gpu import resolve_gpu
        from core import plan as P

        spec = catalog_lookup(model_id or SHAPES[shape])
        gpu = resolve_gpu(PROFILE, CARDS[card])
        train = {"micro_batch": 1, "grad_accum": 1, **({"big_savers": big} if big else {})}
        cfg = RunConfig.from_dict({"gpu": {"profile": PROFILE, "vram_budget_gib": CARDS[card]},
                                   "model": {"name_or_path": spec.id}, "data": {"path": "(bench)", "max_seq_len": seq},
                                   "lora": {"r": r, "alpha": 2 * r}, "train": train})
        return round(estimate(spec, cfg, gpu, plan=P.plan(cfg, spec, gpu)).reserved_gib, 3)
    except Exception:  # noqa: BLE001 - the smoke run's tiny model is not in the catalog
        return None


def autofit_rows() -> list:
    from core.catalog import catalog_lookup
    from core.estimate import fit_for
    from core.gpu import resolve_gpu
    from core.config import RunConfig

    rows = []
    for shape, card, r, around in AUTOFIT:
        spec = catalog_lookup(SHAPES[shape])
        cfg = RunConfig.from_dict({"gpu": {"profile": PROFILE, "vram_budget_gib": CARDS[card]},
                                   "model": {"name_or_path": spec.id},
                                   "data": {"path": "(bench)", "max_seq_len": spec.max_position_embeddings},
                                   "lora": {"r": r, "alpha": 2 * r}, "train": {"micro_batch": 1, "grad_accum": 8}})
        fit = fit_for(spec, cfg, resolve_gpu(PROFILE, CARDS[card]), from_full_context=True)
        tries = [(n, "auto") for n in around] + [(around[0], "nolean")]
        rows.append((shape, card, r, fit.max_seq_len, tries))
    return rows


NOTES = {"SmolLM2-1.7B": "its config's position limit is 8,192 tokens: no longer row is tried"}
DEADLINE = [float("inf")]


def _left() -> float:
    return DEADLINE[0] - time.time()


def run_toml(model_dir: Path, data: Path, seq: int, budget, r: int, name: str, profile: str, big=None) -> str:
    gpu = f'[gpu]\nprofile = "{profile}"\n' + (f"vram_budget_gib = {budget}\n" if budget else "")
    return (gpu + f'[model]\nname_or_path = "{model_dir}"\n'
            f'[data]\npath = "{data}"\nformat = "text"\nmax_seq_len = {seq}\neval_fraction = 0.0\npacking = true\n'
            f"[lora]\nr = {r}\nalpha = {2 * r}\n"
            f"[train]\nmicro_batch = 1\ngrad_accum = 1\nmax_steps = 2\nsave_steps = 1000\nlogging_steps = 1\n"
            + (f'big_savers = "{big}"\n' if big else "") +
            f'[output]\nname = "{name}"\n')


# `snugtune train` in a process that reports its peak host RAM (VmHWM: pinned buffers included) on exit
WRAP = r"""
import atexit, runpy, sys
def _rss():
    # the CLI trains in a child process (core.runs): the largest waited-for child's peak, and ours
    import resource
    kib = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print("@@RSS " + str(kib / 2**20), file=sys.stderr, flush=True)
atexit.register(_rss)
sys.argv = ["snugtune", "train", sys.argv[1]]
runpy.run_module("tui.cli", run_name="__main__")
"""


def _peak_rss(err: str):
    vals = [float(x.split()[1]) for x in err.splitlines() if x.startswith("@@RSS ")]
    return round(max(vals), 2) if vals else None


def engine_trial(shape, card, r, seq, model_dir: Path, work: Path, budget, profile=PROFILE, timeout=400.0,
                 big=None) -> dict:
    name = f"{shape}-{card}-{seq}"
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    data = write_data(d / "data.jsonl", seq * 3)
    cfg = d / "run.toml"
    cfg.write_text(run_toml(model_dir, data, seq, budget, r, name, profile, big))
    env = {**os.environ, "SNUGTUNE_RUNS_DIR": str(d / "runs"),
           "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-c", WRAP, str(cfg)], env=env, capture_output=True, text=True,
                           cwd=REPO, timeout=timeout)
        rc, err = p.returncode, p.stderr or ""
    except subprocess.TimeoutExpired as exc:
        rc, err = -1, f"timed out after {timeout:.0f}s " + (exc.stderr.decode() if isinstance(exc.stderr, bytes)
                                                           else (exc.stderr or ""))[-400:]
    res = {"rc": rc, "wall_s": round(time.time() - t0, 1), "host_peak_gib": _peak_rss(err)}
    run_dirs = sorted((d / "runs").glob(f"{name}*"))
    if not run_dirs:
        res["error"] = err[-800:]
        return res
    events = [json.loads(x) for x in (run_dirs[-1] / "events.jsonl").read_text().splitlines() if x.strip()]
    steps = [e for e in events if e["event"] == "step_logged"]
    started = next((e for e in events if e["event"] == "run_started"), {})
    failed = next((e for e in events if e["event"] == "run_failed"), None)
    plan = started.get("plan") or {}
    res.update(
        steps=len(steps), losses=[e.get("loss") for e in steps],
        measured_reserved_gib=max((e.get("mem_peak_gib") or 0) for e in steps) if steps else None,
        oom_events=sum(1 for e in events if e["event"] == "oom_recovered"),
        plan={k: plan.get(k) for k in ("allocator_cap_gib", "cpu_embedding", "head_8bit", "big_savers_why",
                                       "offload", "keep_blocks", "cuda_graphs", "ce_chunk_tokens", "mlp_tile_tokens")},
        savers=started.get("savers"), terminal=events[-1]["event"] if events else None,
    )
    if failed:
        res["error"] = (failed.get("error") or "")[:300]
    elif rc != 0:
        res["error"] = err[-800:]
    if rc != 0 and (run_dirs[-1] / "engine.log").exists():
        # the work folder is removed at the end: keep what the run said (run 4's 12 GB row left none)
        res["engine_log_tail"] = (run_dirs[-1] / "engine.log").read_text(errors="replace")[-1500:]
    return res


TRIES = r"""
import json, sys, time, gc, math
sys.path.insert(0, sys.argv[1])
from dataclasses import replace
import torch
from core import plan as P, savers, bigsavers
from core.catalog import spec_from_dir
from core.estimate import estimate
from core.config import RunConfig
from core.model import load_for_training
a = json.loads(sys.argv[2])
D = a["device"]
spec = spec_from_dir(a["model"])
if D == "cuda":
    pr = torch.cuda.get_device_properties(0)
    dev = {"type": "cuda", "index": 0, "name": pr.name, "capability": "8.9", "total_gib": pr.total_memory / 2**30,
           "bf16": True}
else:
    dev = {"type": "cpu", "index": None, "name": "cpu", "total_gib": None, "bf16": False}
OOM = getattr(torch, "OutOfMemoryError", RuntimeError)
def plan_at(n, savers_mode):
    gpu = {"profile": a["profile"]}
    if a["budget"]:
        gpu["vram_budget_gib"] = a["budget"]
    cfg = RunConfig.from_dict({"gpu": gpu, "model": {"name_or_path": a["model"]},
                               "data": {"path": "(bench)", "max_seq_len": n},
                               "lora": {"r": a["r"], "alpha": 2 * a["r"]},
                               "train": {"micro_batch": 1, "grad_accum": 1,
                                         **({"big_savers": a["big"]} if a.get("big") else {})}})
    pl = P.plan(cfg, spec, P.target_for_device(cfg, dev))
    bigsavers.REBUILD_NORM_OUTPUTS = savers_mode != "keepout"  # keepout: the lean norm of run 3
    if savers_mode == "none":
        pl = replace(pl, cpu_embedding=False, head_8bit=False)
    elif savers_mode == "emb":
        pl = replace(pl, cpu_embedding=True, head_8bit=False)
    elif savers_mode == "nolean":
        pl = replace(pl, lean_norms=False)
    elif savers_mode == "both":  # the smoke test: both savers on the CPU (where the plan never turns them on)
        pl = replace(pl, cpu_embedding=True, head_8bit=True, lean_norms=True, cuda_graphs=False)
    return pl, cfg
pl, cfg = plan_at(a["tries"][0][0], a["tries"][0][1])
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
print("@@" + json.dumps({"loaded_s": round(time.time() - float(a["t0"]), 1)}), flush=True)
for n, mode in a["tries"]:
    if time.time() > a["deadline"]:
        print("@@" + json.dumps({"len": n, "savers": mode, "skipped": "out of time"}), flush=True)
        continue
    pl, tcfg = plan_at(n, mode)
    applied = savers.install_savers(model, pl)
    est = round(estimate(spec, tcfg, P.target_for_device(tcfg, dev), plan=pl).reserved_gib, 3)
    gc.collect()
    if D == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    losses, err = [], None
    try:
        for _ in range(2):  # 2 optimizer steps of one row each
            ids = torch.randint(0, 2000, (1, n), device=D)
            with torch.autocast(D, dtype=torch.bfloat16, enabled=D == "cuda"):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            losses.append(float(out.loss.detach()))
            del out
            opt.step(); opt.zero_grad(set_to_none=True)
        if D == "cuda":
            torch.cuda.synchronize()
        ok = all(math.isfinite(x) for x in losses)
    except OOM as exc:
        if D != "cuda":
            raise
        ok, err = False, str(exc).split("\n")[0][:160]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    peak = torch.cuda.max_memory_reserved() / 2**30 if D == "cuda" else 0.0
    peak_alloc = torch.cuda.max_memory_allocated() / 2**30 if D == "cuda" else 0.0
    if D == "cuda":
        torch.cuda.empty_cache()
    rss = 0.0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) / 2**20
    print("@@" + json.dumps({"len": n, "savers": mode, "ok": ok, "peak_reserved_gib": round(peak, 3),
                             "peak_allocated_gib": round(peak_alloc, 3), "estimate_reserved_gib": est,
                             "losses": [round(x, 4) for x in losses], "s": round(time.time() - t, 1),
                             "cpu_embedding": pl.cpu_embedding, "head_8bit": pl.head_8bit, "offload": pl.offload,
                             "lean_norms": pl.lean_norms, "applied": {k: applied.get(k) for k in ("cpu_embedding", "head_8bit", "lean_norms", "offload")},
                             "host_peak_gib": round(rss, 2), "error": err}), flush=True)
"""


def tries_trial(shape, card, r, tries, model_dir: Path, budget, profile=PROFILE, device="cuda",
                timeout=400.0, big=None) -> dict:
    args = {"model": str(model_dir), "budget": budget, "profile": profile, "r": r, "tries": tries, "big": big,
            "device": device, "t0": time.time(), "deadline": DEADLINE[0] - 20}
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    try:
        p = subprocess.run([sys.executable, "-c", TRIES, str(REPO), json.dumps(args)], capture_output=True,
                           text=True, env=env, timeout=timeout)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
        err, rc = "timeout", -1
    recs = [json.loads(x[2:]) for x in out.splitlines() if x.startswith("@@")]
    res = {"rc": rc, "tries": [x for x in recs if "len" in x]}
    ld = next((x for x in recs if "loaded_s" in x), None)
    if ld:
        res["loaded_s"] = ld["loaded_s"]
    if rc != 0:
        res["error"] = (err or "")[-800:]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (seconds; no numbers)")
    ap.add_argument("--only", default="", help="comma-separated shapes")
    ap.add_argument("--cards", default="", help="comma-separated cards (4gb, 8gb, 12gb)")
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--table", metavar="FILE.json")
    ap.add_argument("--name", default="big_models_run1")
    ap.add_argument("--set", default="issue", choices=["issue", "lean", "autofit", "run4"],
                    help="issue: the issue's rows (runs 1-2); lean: the lean RMSNorm where runs 1-2 ran out; "
                         "autofit: auto-fit's 7-8B choices (run 3); run4: the 4 GB rows with big_savers on and "
                         "auto-fit's 7-8B choices, the norm outputs rebuilt")
    a = ap.parse_args(argv)
    if a.table:
        res = json.loads(Path(a.table).read_text())
        Path(a.table).with_suffix(".md").write_text(markdown(res))
        print(markdown(res))
        return 0
    out = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    root = Path(os.environ.get("BIG_ROOT") or tempfile.mkdtemp(prefix="big-models-"))
    DEADLINE[0] = time.time() + float(os.environ.get("BIG_DEADLINE_S", 1e9))
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    t0 = time.time()
    if a.smoke:
        from core.catalog import TINY_LLAMA

        specs = {"tiny": TINY_LLAMA}
        rows = [("tiny", "cpu", 8, 256, [(128, "none"), (256, "both"), (256, "nolean"), (256, "keepout")], "on")]
        budgets = {"cpu": None}
        profile, device = "cpu", "cpu"
    else:
        from core.catalog import catalog_lookup

        only = {s for s in a.only.split(",") if s}
        pool = {"autofit": autofit_rows, "run4": run4_rows, "lean": lambda: ROWS_LEAN, "issue": lambda: ROWS}[a.set]()
        cards = {c for c in a.cards.split(",") if c}
        rows = [r for r in pool if (not only or r[0] in only) and (not cards or r[1] in cards)]
        specs = {s: catalog_lookup(SHAPES[s]) for s in dict.fromkeys(r[0] for r in rows)}
        budgets, profile, device = CARDS, PROFILE, "cuda"
    env_info = _machine()
    print(json.dumps(env_info), flush=True)
    models: dict[str, Path] = {}
    built = {s: threading.Event() for s in specs}
    # two builders: the 7-9B shapes one after the other, largest first (their long rows are the last
    # to end), the small shapes beside them, smallest first. Not one builder per big shape: saving
    # a checkpoint passes it through this process's memory, and every trial process forked after
    # that inherits the high-water mark (run 4: all reported 33.05 GiB), and two at once left less
    # host RAM for the trials (run 4's 12 GB row died without an error event, host memory the
    # likeliest cause).
    order = sorted(specs, key=lambda s: specs[s].params_total)
    big_first = [s for s in reversed(order) if specs[s].params_total >= 5e9]
    small = [s for s in order if s not in big_first]

    def build_all(order=order):
        for s in order:
            tb = time.time()
            try:
                models[s] = build_model(root, s, spec=specs[s], device=device)
            except Exception as exc:  # noqa: BLE001 - the rows of this shape say why
                print(f"build {s} failed: {exc!r}", flush=True)
            built[s].set()
            print(f"built {s} in {time.time() - tb:.0f}s (at {time.time() - t0:.0f}s)", flush=True)

    for part in (big_first, small):
        if part:
            threading.Thread(target=build_all, args=(part,), daemon=True).start()
    results = []
    lock = threading.Lock()

    def one(kind, row):
        shape, card, r, seq, tries, *rest = row
        big = rest[0] if rest else None
        built[shape].wait()
        rec = {"kind": kind, "shape": shape, "card": card, "budget_gib": budgets[card], "r": r, "seq": seq,
               "model_id": specs[shape].id, "max_positions": specs[shape].max_position_embeddings,
               "big_savers": big}
        if kind == "engine" and not a.smoke:
            rec["estimate_reserved_gib"] = estimated(shape, card, r, seq, big, specs[shape].id)
        if shape not in models:
            rec["skipped"] = "model build failed"
        elif _left() < 40:
            rec["skipped"] = "out of time"
        elif kind == "engine":
            rec.update(engine_trial(shape, card, r, seq, models[shape], root / "work", budgets[card], profile,
                                    timeout=max(30, min(900, _left())), big=big))
        else:
            rec.update(tries_trial(shape, card, r, tries, models[shape], budgets[card], profile, device,
                                   timeout=max(30, min(900, _left())), big=big))
        with lock:
            results.append(rec)
        brief = {k: rec.get(k) for k in ("rc", "measured_reserved_gib", "losses", "host_peak_gib", "skipped", "error")}
        if kind == "tries":
            brief["tries"] = [(t["len"], t["savers"], t.get("ok"), t.get("peak_reserved_gib")) for t in rec.get("tries", [])]
        print(f"{kind} {shape} {card} {seq}: {json.dumps(brief)[:900]} (at {time.time() - t0:.0f}s)", flush=True)

    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        futs = []
        for row in rows:  # in order of the table: the big rows' processes start first once built
            futs.append(ex.submit(one, "engine", row))
            if row[4]:
                futs.append(ex.submit(one, "tries", row))
        for f in futs:
            f.result()
    cmd = "PYTHONPATH=. python bench/big_models.py" + (" --smoke" if a.smoke else "") + \
        (f" --only {a.only}" if a.only else "") + (f" --cards {a.cards}" if a.cards else "") + \
        (f" --set {a.set}" if a.set != "issue" else "")
    res = {"meta": {"command": cmd, "wall_s": round(time.time() - t0, 1), "profile": profile,
                    "machine": env_info, "cards_gib": budgets}, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    name = "big_models_smoke" if a.smoke else a.name
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{name}.md").write_text(markdown(res))
    print(markdown(res), flush=True)
    if not a.smoke:
        shutil.rmtree(root, ignore_errors=True)
    ok = all(not r.get("error") and not r.get("skipped") for r in results)
    return 0 if ok else 1


def _machine() -> dict:
    info = {}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        import transformers

        info["transformers"] = transformers.__version__
    except Exception as exc:  # noqa: BLE001
        info["error"] = repr(exc)
    try:
        with open("/proc/meminfo") as fh:
            info["host_ram_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
        info["cpus"] = os.cpu_count()
        du = shutil.disk_usage(tempfile.gettempdir())
        info["tmp_free_gib"] = round(du.free / 2**30, 1)
    except OSError:
        pass
    return info


def _fmt_len(n):
    return f"{n:,}" if isinstance(n, int) else str(n)


def markdown(res: dict) -> str:
    meta = res["meta"]
    m = meta.get("machine", {})
    L = ["# big_models: 7-8B models on 8 / 12 GB, the 4 GB rows at their limits", "",
         f"Command: `{meta['command']}` on {m.get('gpu', '?')} (torch {m.get('torch')}, transformers "
         f"{m.get('transformers')}; host {m.get('host_ram_gib')} GiB RAM, {m.get('cpus')} CPUs), wall "
         f"{meta['wall_s']} s. Budgets {', '.join(f'{k} = {v} GiB' for k, v in meta['cards_gib'].items())}, "
         f"gpu.profile {meta['profile']} (allocator capped at budget - 0.35 GiB). Random-init models of the real "
         "shapes, packed rows of random words, micro-batch 1, 2 optimizer steps per trial, LoRA on all seven "
         "projections (alpha = 2 r).", "",
         "## Through `snugtune train` at the issue's target length", "",
         "| model | card | LoRA r | length | big_savers | result | peak reserved GiB | estimate GiB | losses | plan: embedding / head / offload | host RAM peak GiB | Unsloth |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        if r["kind"] != "engine":
            continue
        p = r.get("plan") or {}
        if r.get("skipped"):
            status = r["skipped"]
        elif r.get("rc") == 0 and r.get("steps", 0) >= 2 and not r.get("oom_events"):
            status = "trains" if all(isinstance(x, (int, float)) and x == x for x in r.get("losses") or []) else "NaN"
        elif r.get("oom_events") or "out of memory" in (r.get("error") or ""):
            status = "OUT OF MEMORY"
        else:
            status = f"failed (rc {r.get('rc')})"
        losses = ", ".join(f"{x:.3f}" for x in (r.get("losses") or []) if isinstance(x, (int, float)))
        pl = (f"{'CPU' if p.get('cpu_embedding') else 'card'} / {'8-bit' if p.get('head_8bit') else '16-bit'} / "
              f"{'yes' if p.get('offload') else 'no'}") if p else ""
        L.append(f"| {r['model_id']} | {r['card']} | {r['r']} | {_fmt_len(r['seq'])} | {r.get('big_savers') or 'auto'} | "
                 f"{status} | {r.get('measured_reserved_gib') or ''} | {r.get('estimate_reserved_gib') or ''} | "
                 f"{losses} | {pl} | {r.get('host_peak_gib') or ''} | "
                 f"{UNSLOTH.get((r['shape'], r['card']), '')} |")
    L += ["", "## Each saver's worth: the same process, other lengths and savers (2 steps each)", "",
          "`none`: the CPU embedding and the 8-bit head forced off; `emb`: the CPU embedding only; `nolean`: "
          "the lean RMSNorm forced off; `keepout`: the lean RMSNorm with its outputs kept (run 3's); `auto`: what "
          "the plan decides.", "",
          "| model | card | length | savers | plan: embedding / head / offload | result | peak reserved GiB | peak allocated GiB | estimate GiB | host RAM GiB | losses |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        if r["kind"] != "tries":
            continue
        if r.get("skipped") or (not r.get("tries") and r.get("error")):
            L.append(f"| {r['model_id']} | {r['card']} | | | | {r.get('skipped') or 'failed: ' + r['error'][-120:]} | | | | | |")
        for t in r.get("tries", []):
            if t.get("skipped"):
                L.append(f"| {r['model_id']} | {r['card']} | {_fmt_len(t['len'])} | {t['savers']} | | {t['skipped']} | | | | | |")
                continue
            st = "trains" if t["ok"] else ("OUT OF MEMORY" if t.get("error") else "NaN loss")
            pl = (f"{'CPU' if t.get('cpu_embedding') else 'card'} / {'8-bit' if t.get('head_8bit') else '16-bit'} / "
                  f"{'yes' if t.get('offload') else 'no'}")
            L.append(f"| {r['model_id']} | {r['card']} | {_fmt_len(t['len'])} | {t['savers']} | {pl} | {st} | "
                     f"{t.get('peak_reserved_gib')} | {t.get('peak_allocated_gib', '')} | {t.get('estimate_reserved_gib') or ''} | "
                     f"{t.get('host_peak_gib')} | "
                     f"{', '.join(f'{x:.3f}' for x in t.get('losses') or [])} |")
    L += ["", "Position limits: " + "; ".join(f"{k}: {v}" for k, v in NOTES.items()) + "."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
