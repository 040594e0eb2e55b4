"""On the CPU: 4-bit QLoRA (bitsandbytes' CPU kernels) against 16-bit LoRA (no quantization), same run.

    python bench/cpu_lora.py builtin:tiny-llama --steps 4 --seq 256
    python bench/cpu_lora.py /path/to/gemma-3-270m --steps 3 --seq 128

Each variant runs snugtune's engine (core.train.Engine) in its own process for --steps
optimizer steps of micro-batch 1 on the demo data, packed to --seq tokens. Two figures per
variant, over the steps after the first (which pays the warm-up): wall-clock tokens/s, and
CPU seconds per 1,000 tokens (the process's user+system time: on a shared machine the wall
clock also counts waiting for the cores, the CPU time counts only the work, so it is the
fairer comparison; the load average is recorded beside both).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(model: str, four_bit: bool, steps: int, seq: int, runs: Path) -> dict:
    """Runs in a fresh process (see --one): the engine in-process, timed per step."""
    from transformers import TrainerCallback

    from core.config import RunConfig
    from core.events import read_events
    from core.runs import create_run_dir
    from core.train import Engine

    cfg = RunConfig.from_dict({
        "gpu": {"profile": "cpu"},
        "model": {"name_or_path": model, "load_in_4bit": four_bit},
        "data": {"path": "builtin:python-docs-qa", "max_seq_len": seq, "eval_fraction": 0.0, "packing": True},
        "lora": {"r": 16, "alpha": 32},
        "train": {"micro_batch": 1, "grad_accum": 1, "max_steps": steps, "warmup_ratio": 0.0,
                  "save_steps": 10_000, "logging_steps": 1},
        "output": {"runs_dir": str(runs)},
    })
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.monotonic(), time.process_time()))

    run_dir = create_run_dir(cfg)
    load0 = os.getloadavg()[0]
    rc = Engine(run_dir, callbacks=[Clock()], install_signal_handlers=False).run()
    ev = list(read_events(run_dir))
    steps_ev = [e for e in ev if e["event"] == "step_logged"]
    started = next((e for e in ev if e["event"] == "run_started"), {})
    toks = [e["tokens_seen"] for e in steps_ev]
    res = {"model": model, "load_in_4bit": four_bit, "seq": seq, "steps": len(steps_ev), "rc": rc,
           "linear4bit_layers": (started.get("model") or {}).get("linear4bit_layers"),
           "losses": [round(e["loss"], 4) for e in steps_ev], "loadavg_before": round(load0, 2),
           "loadavg_after": round(os.getloadavg()[0], 2)}
    if len(marks) >= 2 and len(toks) >= 2:
        n = toks[-1] - toks[0]  # tokens of steps 2..N
        res["tokens_per_s"] = round(n / (marks[-1][0] - marks[0][0]), 1)
        res["cpu_s_per_1k_tokens"] = round(1000 * (marks[-1][1] - marks[0][1]) / n, 2)
    if rc != 0:
        res["error"] = ev[-1].get("error") if ev else None
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two variants this many times")
    ap.add_argument("--out")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        spec = json.loads(a.one)
        print("@@ " + json.dumps(one(**{**spec, "runs": Path(spec["runs"])})), flush=True)
        return 0
    res = []
    with tempfile.TemporaryDirectory() as d:
        for four in [True, False] * a.repeat:
            spec = {"model": a.model, "four_bit": four, "steps": a.steps, "seq": a.seq, "runs": d}
            p = subprocess.run([sys.executable, __file__, "x", "--one", json.dumps(spec)], cwd=ROOT,
                               capture_output=True, text=True)
            lines = [ln[3:] for ln in p.stdout.splitlines() if ln.startswith("@@ ")]
            r = json.loads(lines[0]) if lines else {"rc": p.returncode, "error": p.stderr[-800:], "load_in_4bit": four}
            print(json.dumps(r), flush=True)
            res.append(r)
    summary = {}
    for four in (False, True):
        rs = [r for r in res if r.get("load_in_4bit") == four and "cpu_s_per_1k_tokens" in r]
        if rs:
            summary["4bit" if four else "unquantized"] = {
                "cpu_s_per_1k_tokens": round(sum(r["cpu_s_per_1k_tokens"] for r in rs) / len(rs), 2),
                "tokens_per_s": round(sum(r["tokens_per_s"] for r in rs) / len(rs), 1)}
    print(json.dumps(summary))
    if a.out:
        Path(a.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "cores": os.cpu_count(),
                                           "summary": summary, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
