"""On the CPU: 4-bit QLoRA (bitsandbytes' CPU kernels) against 16-bit LoRA (no quantization), same run.

    python bench/cpu_lora.py builtin:tiny-llama --steps 4 --seq 256
    python bench/cpu_lora.py /path/to/gemma-3-270m --steps 3 --seq 128

Each variant runs snugtune's engine (python -m core.train) in its own process for --steps
optimizer steps of micro-batch 1 on the demo data, packed to --seq tokens; tokens/s is the
mean of the steps after the first (which pays the warm-up). The machine's load average is
recorded beside the numbers: on a shared machine it moves them.
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
    from core.config import RunConfig
    from core.events import read_events
    from core.runs import create_run_dir

    cfg = RunConfig.from_dict({
        "gpu": {"profile": "cpu"},
        "model": {"name_or_path": model, "load_in_4bit": four_bit},
        "data": {"path": "builtin:python-docs-qa", "max_seq_len": seq, "eval_fraction": 0.0, "packing": True},
        "lora": {"r": 16, "alpha": 32},
        "train": {"micro_batch": 1, "grad_accum": 1, "max_steps": steps, "warmup_ratio": 0.0,
                  "save_steps": 10_000, "logging_steps": 1},
        "output": {"runs_dir": str(runs)},
    })
    run_dir = create_run_dir(cfg)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "core.train", str(run_dir)], cwd=ROOT, capture_output=True, text=True)
    ev = list(read_events(run_dir))
    steps_ev = [e for e in ev if e["event"] == "step_logged"]
    tps = [e["tokens_per_s"] for e in steps_ev[1:]] or [e["tokens_per_s"] for e in steps_ev]
    return {"model": model, "load_in_4bit": four_bit, "seq": seq, "steps": len(steps_ev), "rc": p.returncode,
            "tokens_per_s": round(sum(tps) / max(len(tps), 1), 1), "losses": [e["loss"] for e in steps_ev],
            "wall_s": round(time.time() - t0, 1), "loadavg_before": os.getloadavg()[0],
            "error": None if p.returncode == 0 else p.stderr[-800:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two variants this many times")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    res = []
    with tempfile.TemporaryDirectory() as d:
        for four in [True, False] * a.repeat:
            r = one(a.model, four, a.steps, a.seq, Path(d))
            r["loadavg_after"] = os.getloadavg()[0]
            print(json.dumps(r), flush=True)
            res.append(r)
    if a.out:
        Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "threads": os.cpu_count(), "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
