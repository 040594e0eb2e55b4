"""fit_truth run 8 (one H200, session 7: the engine with the loss-tail kernel and one shared static mask, the
estimate with the kernels credited in kept blocks and the loss tail priced): none of auto-fit's 32 choices ran
out of memory, every length that ran out is not "fits" today, the choices are at least 85% of the longest
length that trains wherever a probe bracketed it (one named miss), today's choices stay under the allocator cap
by run 8's measurements, and the estimate is within 5% of the measured peaks (named exceptions, all over the
measurement). bench/results/fit_truth_run8.md has the table; README section `know` the numbers."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tests.test_fit_truth_run7 import _estimate_as_run, _key, _measured, _now, needs_triton

RUN8 = Path(__file__).resolve().parents[1] / "bench" / "results" / "fit_truth_run8.json"

# Outside 5% of the measured peak, each over it (the safe side), with its cause.
RESERVED_OVER = {
    # the allocator's cached share (5% of the allocated peak + a quarter of the largest block) is above what
    # max_memory_reserved showed on these long offloaded rows (0.03-0.17 GiB above allocated); allocated +2..+4%
    ("llama-3.2-1b", "8gb", "full", False), ("llama-3.2-1b", "4gb", "full", False),
    # graph steps with kept blocks: a recomputed block counted in flight beside the kept stores (README `know`)
    ("smollm2-1.7b", "8gb", "full", False),
}
ALLOCATED_OVER = {("smollm2-1.7b", "8gb", "full", False)}
# At most 85% of a length that trained: Qwen2.5-3B on 4 GB chose 14,400 tokens; 16,896 trained (at the cap)
# and 19,200 ran out, so the choice is 75-85% of the longest. Its weights take 2 GiB of the 3.47 GiB cap: a
# token costs little, and the verdict's 3% of the budget is ~2,000 tokens (README `know`).
UNDER_85 = {("qwen2.5-3b", "4gb")}


@lru_cache(maxsize=1)
def _rows():
    return json.loads(RUN8.read_text())["rows"]


def test_run8_no_choice_ran_out_of_memory():
    rows = _rows()
    assert len(rows) == 32
    for r in rows:
        e = r["engine"]
        assert not e.get("oom_events") and e["rc"] == 0 and e["steps"] == e["max_steps"], _key(r)
        assert e.get("measured_allocated_gib"), _key(r)


@needs_triton
def test_run8_lengths_that_ran_out_are_not_fits_and_bracket_the_choices():
    """Every probe that ran out of memory (the real engine, micro-batch 1) is not "fits" today; each bracketed
    choice is at least 85% of the shortest length that ran out, but the named one."""
    from bench.fit_truth import SHAPES, base_config
    from core.catalog import catalog_lookup
    from core.estimate import estimate
    from core.gpu import resolve_gpu

    bracketed = 0
    for r in _rows():
        out = [p["len"] for p in r.get("probes") or [] if p["ok"] is False]
        if not out:
            continue
        spec = catalog_lookup(SHAPES[r["shape"]])
        for n in out:
            est = estimate(spec, base_config(spec.id, n, 1, 2, r["budget_gib"]), resolve_gpu("rtx-3050", r["budget_gib"]))
            assert est.verdict != "fits", (r["shape"], r["card"], n)
        bracketed += 1
        share = _now(*_key(r))["seq"] / min(out)
        if (r["shape"], r["card"]) in UNDER_85:
            assert 0.70 < share < 0.85, (r["shape"], r["card"], share)
        else:
            assert share >= 0.85, (r["shape"], r["card"], share)
    assert bracketed == 9


@needs_triton
def test_today_s_choices_stay_under_the_cap_by_run8_s_measurements():
    """A choice that moved since run 8 (more kept blocks: the static mask no longer counted a kept block, which
    run 8 measured shared) is held to run 8's measurement: the peak measured at run 8's setting, plus what the
    estimate says the move adds, plus the allocator's measured slack above allocated, stays under the cap."""
    moved = 0
    for r in _rows():
        k = _key(r)
        alloc, res = _measured(r)
        now = _now(*k)
        was = (r["seq"], r["micro_batch"], r["plan"]["keep_blocks"], r["plan"]["offload"])
        got = (now["seq"], now["micro_batch"], now["plan"]["keep_blocks"], now["plan"]["offload"])
        if got == was:
            continue
        moved += 1
        assert now["seq"] == r["seq"] and now["plan"]["offload"] == r["plan"]["offload"], k  # more kept blocks only
        today = dict(r, plan=dict(r["plan"], keep_blocks=now["plan"]["keep_blocks"], cuda_graphs=now["plan"]["cuda_graphs"]))
        delta = _estimate_as_run(today, tail=True).allocated_gib - _estimate_as_run(r, tail=True).allocated_gib
        assert alloc + delta + (res - alloc) < r["budget_gib"] - 0.35, (k, alloc, delta)
    assert moved <= 6


@needs_triton
def test_run8_estimate_within_5_percent_of_the_measured_peaks():
    """Allocated and reserved within 5% on every row, presets and held-out shapes included, but the named rows,
    every one over the measurement (none under it by more than 5%)."""
    bad = []
    for r in _rows():
        k = _key(r)
        alloc, res = _measured(r)
        est = _estimate_as_run(r, tail=True)
        ea = 100 * (est.allocated_gib - alloc) / alloc
        er = 100 * (est.reserved_gib - res) / res
        for err, over, what in ((ea, ALLOCATED_OVER, "allocated"), (er, RESERVED_OVER, "reserved")):
            if k in over:
                assert err > 5, (k, what, err)  # still an exception: drop it from the set once within 5%
            elif abs(err) > 5:
                bad.append(f"{k} {what} {err:+.1f}%")
    assert not bad, "\n".join(bad)
