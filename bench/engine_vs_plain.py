"""The whole engine on a real-size architecture, beside the plain recipe, in one run.

`bench/run.py` drives the savers in a bare loop; this drives what a user runs: `snugtune train`
(Trainer, packing, events, savers) on a random-init model built from Qwen2.5-0.5B's real config,
and the plain recipe (bench/plain_recipe.py) on the same model at the same length, each in its
own process. A second engine run forces activation offload under a 2 GiB cap at micro-batch 4,
the setting that once gave a NaN gradient norm, and checks every logged loss is finite.

    PYTHONPATH=. python bench/engine_vs_plain.py      # ~3 min on one H200; writes $OUT/engine_vs_plain.{json,md}
    PYTHONPATH=. python bench/engine_vs_plain.py --edge SHAPE SEQ BUDGET_GIB   # the engine alone at a budget's edge
    PYTHONPATH=. python bench/engine_vs_plain.py --graphs-parity   # graphs on vs off: same losses (accumulation 4)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SEQ = 1024
SHAPE = "qwen2.5-0.5b"

PLAIN = r"""
import json, sys, time, torch, bitsandbytes as bnb
sys.path.insert(0, sys.argv[3])
from plain_recipe import load_plain
m = load_plain(sys.argv[1], "cuda"); seq = int(sys.argv[2])
opt = bnb.optim.PagedAdamW8bit([p for p in m.parameters() if p.requires_grad], lr=1e-4)
g = torch.Generator(device="cuda").manual_seed(0); torch.cuda.reset_peak_memory_stats()
for i in range(12):
    if i == 2: torch.cuda.synchronize(); t0 = time.perf_counter()
    ids = torch.randint(0, m.config.vocab_size, (1, seq), device="cuda", generator=g)
    out = m(input_ids=ids, labels=ids); out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
torch.cuda.synchronize(); dt = time.perf_counter() - t0
print("@@" + json.dumps(dict(tokens_per_s=10 * seq / dt, peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                             peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30, loss=float(out.loss))))
"""


def build_model(root: Path) -> Path:
    from plain_recipe import build

    from core.demo import resolve_builtin

    path = Path(build(SHAPE, str(root), "cuda"))
    # the engine needs a tokenizer: the demo's (2,048 ids, all valid in a 151,936 vocabulary)
    demo = Path(resolve_builtin("builtin:tiny-llama"))
    for f in demo.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, path / f.name)
    return path


def engine_run(model: Path, runs: Path, name: str, sets: list[str]) -> dict:
    cfg = runs / f"{name}.toml"
    cfg.write_text(
        f'[gpu]\nprofile = "auto"\n[model]\nname_or_path = "{model}"\n'
        f'[data]\npath = "builtin:python-docs-qa"\nmax_seq_len = {SEQ}\neval_fraction = 0.0\n'
        f'[train]\nmicro_batch = 1\ngrad_accum = 1\nmax_steps = 30\nlearning_rate = 1e-4\nsave_steps = 1000\n'
        f'[output]\nname = "{name}"\n'
    )
    env = {**os.environ, "SNUGTUNE_RUNS_DIR": str(runs), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    cmd = [sys.executable, "-m", "tui.cli", "train", str(cfg)] + [a for s in sets for a in ("--set", s)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=240)
    run_dirs = sorted(runs.glob(f"{name}-*"))
    res = {"name": name, "rc": p.returncode, "wall_s": round(time.time() - t0, 1), "sets": sets}
    if not run_dirs:
        res["error"] = p.stderr[-1500:]
        return res
    events = [json.loads(l) for l in (run_dirs[-1] / "events.jsonl").read_text().splitlines() if l.strip()]
    steps = [e for e in events if e["event"] == "step_logged"]
    started = next((e for e in events if e["event"] == "run_started"), {})
    losses = [e.get("loss") for e in steps]
    tps = [e["tokens_per_s"] for e in steps[5:] if e.get("tokens_per_s")]
    res.update(
        steps=len(steps),
        losses=losses,
        all_finite=bool(losses) and all(x is not None and math.isfinite(x) for x in losses),
        tokens_per_s_median=round(statistics.median(tps), 1) if tps else None,
        peak_reserved_gib=max((e.get("mem_reserved_gib") or 0) for e in steps) if steps else None,
        peak_gib=max((e.get("mem_peak_gib") or 0) for e in steps) if steps else None,
        savers=started.get("savers"),
        last_cuda_graphs=steps[-1].get("cuda_graphs") if steps else None,
        terminal=events[-1]["event"] if events else None,
    )
    if p.returncode != 0:
        res["error"] = (p.stderr or "")[-1500:]
    return res


def edge(shape: str, seq: int, budget: float) -> int:
    """--edge: the engine alone at the edge of a budget (CUDA graphs on by default there too)."""
    global SHAPE, SEQ
    SHAPE, SEQ = shape, seq
    out = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    root = Path(tempfile.mkdtemp(prefix="snug-edge-"))
    model = build_model(root)
    runs = root / "runs"
    runs.mkdir()
    res = engine_run(model, runs, "edge", [f"gpu.vram_budget_gib={budget}", "train.max_steps=12"])
    res["cuda_graphs"] = res.pop("last_cuda_graphs", None)
    print("edge", json.dumps({k: v for k, v in res.items()}), flush=True)
    (out / f"engine_edge_{shape}_{seq}.json").write_text(json.dumps(dict(res, shape=shape, seq=seq, budget_gib=budget,
        command=f"PYTHONPATH=. python bench/engine_vs_plain.py --edge {shape} {seq} {budget}"), indent=1))
    return 0 if res.get("rc") == 0 and res.get("all_finite") else 1


def parity() -> int:
    """--graphs-parity: the engine twice on the same data and seed, CUDA-graph steps on and off, with
    micro-batch 2 and gradient accumulation 4 (the graph's gradients accumulated over micro-batches)."""
    out = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    root = Path(tempfile.mkdtemp(prefix="snug-par-"))
    model = build_model(root)
    runs = root / "runs"
    runs.mkdir()
    common = ["train.micro_batch=2", "train.grad_accum=4", "train.max_steps=8", "train.learning_rate=1e-3"]
    on = engine_run(model, runs, "graphs", common + ["train.cuda_graphs=auto"])
    off = engine_run(model, runs, "eager", common + ["train.cuda_graphs=off"])
    pairs = list(zip(on.get("losses") or [], off.get("losses") or []))
    worst = max((abs(a - b) / abs(b) for a, b in pairs), default=None)
    res = {"graphs": on, "eager": off, "max_rel_loss_diff": worst, "steps_compared": len(pairs),
           "command": "PYTHONPATH=. python bench/engine_vs_plain.py --graphs-parity"}
    print("parity", json.dumps({"max_rel_loss_diff": worst, "steps": len(pairs),
                                "graphs": on.get("last_cuda_graphs"), "tok_s_graphs": on.get("tokens_per_s_median"),
                                "tok_s_eager": off.get("tokens_per_s_median"), "rc": [on.get("rc"), off.get("rc")],
                                "err": (on.get("error") or off.get("error") or "")[-600:]}), flush=True)
    (out / "engine_graphs_parity.json").write_text(json.dumps(res, indent=1))
    return 0 if worst is not None and worst < 0.01 else 1


def main() -> int:
    if sys.argv[1:] == ["--graphs-parity"]:
        return parity()
    if len(sys.argv) == 5 and sys.argv[1] == "--edge":
        return edge(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    out = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    root = Path(tempfile.mkdtemp(prefix="snug-evp-"))
    model = build_model(root)
    runs = root / "runs"
    runs.mkdir()
    p = subprocess.run([sys.executable, "-c", PLAIN, str(model), str(SEQ), str(REPO / "bench")],
                       capture_output=True, text=True, timeout=240)
    plain = next((json.loads(l[2:]) for l in p.stdout.splitlines() if l.startswith("@@")), {"error": p.stderr[-1500:]})
    print("plain", json.dumps(plain), flush=True)
    eng = engine_run(model, runs, "engine", [])
    print("engine", json.dumps({k: v for k, v in eng.items() if k != "losses"}), flush=True)
    tight = engine_run(model, runs, "tight", ["train.offload_activations=on", "gpu.vram_budget_gib=2.0",
                                              "train.micro_batch=4", "train.max_steps=10"])
    print("tight", json.dumps(tight), flush=True)
    result = {"shape": SHAPE, "seq": SEQ, "plain": plain, "engine": eng, "tight": tight,
              "command": "PYTHONPATH=. python bench/engine_vs_plain.py"}
    (out / "engine_vs_plain.json").write_text(json.dumps(result, indent=1))
    ratio = (eng.get("tokens_per_s_median") or 0) / plain["tokens_per_s"] if plain.get("tokens_per_s") else None
    md = [
        f"Command: `{result['command']}` — random-init {SHAPE}, {SEQ}-token sequences, batch 1.",
        "",
        "| system | tokens/s | peak reserved GiB | ratio |",
        "|---|---|---|---|",
        f"| plain recipe (random tokens) | {plain.get('tokens_per_s', 0):,.0f} | {plain.get('peak_reserved_gib', 0):.2f} | 1.00 |",
        f"| snugtune train (packed demo data, Trainer, events) | {eng.get('tokens_per_s_median') or 0:,.0f} | "
        f"{eng.get('peak_reserved_gib') or 0:.2f} | {ratio or 0:.2f} |",
        "",
        f"Offload forced, 2 GiB cap, micro-batch 4: {tight.get('steps')} steps, every loss finite: {tight.get('all_finite')}, "
        f"peak reserved {tight.get('peak_reserved_gib')} GiB, ended with {tight.get('terminal')}.",
    ]
    (out / "engine_vs_plain.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
