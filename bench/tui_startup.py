"""Time to the wizard's first frame: `python bench/tui_startup.py [-n 15]`.

Each repetition starts a fresh interpreter running the wizard (`python -m tui.cli`, the same
process a user gets) with SNUGTUNE_EXIT_AFTER_FIRST_FRAME=FILE: the first step, once painted,
writes the time into FILE and exits. Measured: from just before the interpreter is spawned to
that first frame (interpreter start, every import, first layout and paint); the time to exit
(terminal restored) is reported beside it. The median of the repetitions is reported (the first
run warms the OS file cache and is reported apart).

The terminal: the app needs one; the bench runs it inside tmux (80x24) when stdout is not a
TTY, else in the current terminal.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def once_in_tmux(env: dict, preset: str | None) -> tuple[float, float]:
    session = f"snugtune-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        done, frame = Path(tmp) / "t", Path(tmp) / "frame"
        exports = " ".join(f"{k}={v}" for k, v in {**env, "SNUGTUNE_EXIT_AFTER_FIRST_FRAME": frame}.items())
        args = f"--preset {preset}" if preset else ""
        # the shell takes the start time, so tmux's own start is not counted
        cmd = (f"cd {ROOT} && s=$(date +%s.%N); env {exports} {sys.executable} -m tui.cli {args} >/dev/null; "
               f"e=$(date +%s.%N); echo \"$s $e\" > {done}")
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd], check=True)
        try:
            deadline = time.monotonic() + 30
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not done.exists() or not frame.exists():
                raise RuntimeError("the wizard did not paint and exit within 30 s")
            start, end = map(float, done.read_text().split())
            return float(frame.read_text()) - start, end - start
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def once_here(env: dict, preset: str | None) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        frame = Path(tmp) / "frame"
        start = time.time()
        subprocess.run([sys.executable, "-m", "tui.cli"] + (["--preset", preset] if preset else []),
                       env={**os.environ, **env, "SNUGTUNE_EXIT_AFTER_FIRST_FRAME": str(frame)}, cwd=ROOT, check=True)
        end = time.time()
        return float(frame.read_text()) - start, end - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=15, help="repetitions (default 15)")
    ap.add_argument("--preset", help="open with this preset (jumps to the settings step)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="snugtune-bench-")
    env = {"SNUGTUNE_RUNS_DIR": f"{tmp}/runs",
           "SNUGTUNE_CONFIG_DIR": f"{tmp}/config", "HF_HUB_OFFLINE": "1"}
    use_tmux = not sys.stdout.isatty()
    if use_tmux and shutil.which("tmux") is None:
        print("needs a terminal: run it in one, or install tmux", file=sys.stderr)
        return 2
    run = once_in_tmux if use_tmux else once_here
    first = run(env, args.preset)[0]
    pairs = [run(env, args.preset) for _ in range(args.n)]
    times, exits = [p[0] for p in pairs], [p[1] for p in pairs]
    result = {"what": "spawn to the wizard's first frame painted", "preset": args.preset,
              "repetitions": args.n, "median_s": round(statistics.median(times), 3),
              "min_s": round(min(times), 3), "max_s": round(max(times), 3), "first_s": round(first, 3),
              "median_to_exit_s": round(statistics.median(exits), 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"first frame: median {result['median_s']:.3f} s over {args.n} runs "
              f"(min {result['min_s']:.3f}, max {result['max_s']:.3f}; first run {result['first_s']:.3f}; "
              f"to exit {result['median_to_exit_s']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
