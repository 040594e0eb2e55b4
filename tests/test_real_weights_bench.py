"""bench/real_weights.py's bookkeeping that a short GPU call depends on (no training here).

Run 5 ran inside a few minutes of device time: a child past --deadline-s is killed and still
reported (its losses so far, an estimator probe's shape), and each run's kernels are read back
from what the engine recorded, so the estimate is priced as the run was.
"""
from __future__ import annotations

import io
import json
import sys

from bench import real_weights as rw


def test_a_child_past_its_deadline_is_reported_with_its_losses_and_shape():
    log = io.StringIO()
    spec = {"variant": "est-512x4", "kind": "estimate", "seq": 512, "micro_batch": 4, "timeout": 6}
    # a stand-in child that logs two losses the way run_snugtune's probe does, then hangs (6 s: room
    # for a slow interpreter start on a loaded machine; the test waits that long)
    code = "import time; print('@@L 1.5', flush=True); print('@@L 1.25', flush=True); time.sleep(60)"
    r = rw.child(spec, log, argv=[sys.executable, "-c", code])
    assert r["rc"] == "timeout" and (r["seq"], r["micro_batch"]) == (512, 4)
    assert r["losses"] == [1.5, 1.25] and r["steps"] == 2
    assert json.loads(log.getvalue().splitlines()[0])["rc"] == "timeout"


def test_kernels_read_back_from_the_run():
    assert rw._kernels_of({"kernels": "fused: rms_norm x37, glu x18, rotary x18"}) is True
    assert rw._kernels_of({"savers": {"kernels": "off: SNUGTUNE_KERNELS=off"}}) is False
    assert rw._kernels_of({"savers": {"checkpointing": "0/18 blocks"}}) is False  # runs 1-4: before the kernels
    assert rw._kernels_of({}) is None


def test_nokern_variants_compare_against_their_kernels_on_twins():
    pairs = {(a, b) for a, b, _ in rw.PAIRS}
    assert ("sn-bf16-pack-nographs", "sn-bf16-pack-nographs-nokern") in pairs
    assert ("sn-fp16-pack", "sn-fp16-pack-nokern") in pairs
