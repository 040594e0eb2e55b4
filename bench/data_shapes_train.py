"""Every dataset shape of issue 12 trained for two steps on the demo model (or refused), in-process:
`SNUGTUNE_CACHE=/tmp/cache python bench/data_shapes_train.py [OUT_DIR]`.

The shape files are tests/test_data_formats.py's, written into OUT_DIR/shapes; runs go to
OUT_DIR/runs. One line per shape: the engine's exit code, its last event, steps, training
samples, the error (refused shapes) and the wall time. tests/test_data_formats.py runs four of
these shapes in CI; this runs all of them.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    from conftest import make_tiny_config
    from test_data_formats import ACCEPTED, MAPPED, REFUSED, _write

    from core import runs
    from core.events import read_events
    from core.train import Engine

    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    d = out / "shapes"
    d.mkdir(parents=True, exist_ok=True)
    for name, spec in {**ACCEPTED, **REFUSED}.items():
        _write(d / name, spec[0], spec[1])
    for name in list(ACCEPTED) + list(REFUSED):
        sets = [f"data.path='{d / name}'", "train.max_steps=2", "data.eval_fraction=0.0", "train.micro_batch=2",
                "data.max_seq_len=512"]
        if name in MAPPED:
            sets.append("data.columns={" + ", ".join(f"{f}='{c}'" for f, c in MAPPED[name].items()) + "}")
        t = time.time()
        run_dir = runs.create_run_dir(make_tiny_config("builtin:tiny-llama", d / name, out / "runs", *sets))
        rc = Engine(run_dir).run()
        events = read_events(run_dir)
        last = events[-1]
        prep = next((e for e in events if e["event"] == "data_prepared"), {})
        error = (last.get("error") or "").splitlines()[0][:80] if last.get("error") else ""
        print(f"{name:24} rc={rc} {last['event']:12} steps={last.get('steps')} "
              f"train_samples={prep.get('train_samples')} {error} {time.time() - t:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
