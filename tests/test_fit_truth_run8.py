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
RUN8B = RUN8.with_name("fit_truth_run8b.json")

# Outside 5% of the measured peak, each over it (the safe side), with its cause.
RESERVED_OVER = {
    # the allocator's cached share (5% of the allocated peak + a quarter of the largest block) is above what
    # max_memory_reserved showed on these long offloaded rows (0.03-0.17 GiB above allocated); allocated +2..+4%
    ("llama-3.2-1b", "8gb", "full", False), ("llama-3.2-1b", "4gb", "full", False),
    # graph steps with kept blocks: a recomputed block counted in flight beside the kept stores (README `know`)
    ("smollm2-1.7b", "8gb", "full", False),
}
ALLOCATED_OVER = {("smollm2-1.7b", "8gb", "full", False)}
# Under 85% of the longest length that trains: Qwen2.5-3B on 4 GB chose 14,400 tokens; 16,896 trained (at the
# cap) and 17,344 ran out (run 8b), so the choice is 83.0-85.2% of the longest. Its weights take 2 GiB of the 3.47 GiB cap: a
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
            assert 0.74 < share < 0.85, (r["shape"], r["card"], share)  # / 19,200 here; / 17,344 in run 8b
        else:
            assert share >= 0.85, (r["shape"], r["card"], share)
    assert bracketed == 9


@lru_cache(maxsize=1)
def _rows_8b():
    return json.loads(RUN8B.read_text())["rows"]


@needs_triton
def test_today_s_choices_are_run8_s_or_trained_in_run8b():
    """Every choice today is the one run 8 trained, or (moved since: the static mask no longer counted a kept
    block, which run 8 measured shared) the one run 8b trained: the same length, batch, kept blocks and offload,
    without running out of memory. A change that moves a choice again needs a new GPU run."""
    trained_8b = {_key(r): r for r in _rows_8b()}
    moved = []
    for r in _rows():
        k = _key(r)
        now = _now(*k)
        got = (now["seq"], now["micro_batch"], now["plan"]["keep_blocks"], now["plan"]["offload"])
        if got == (r["seq"], r["micro_batch"], r["plan"]["keep_blocks"], r["plan"]["offload"]):
            continue
        b = trained_8b.get(k)
        assert b is not None, (k, got)
        assert got == (b["seq"], b["micro_batch"], b["plan"]["keep_blocks"], b["plan"]["offload"]), (k, got)
        e = b["engine"]
        assert e["rc"] == 0 and not e.get("oom_events") and e["steps"] == e["max_steps"], k
        moved.append(k)
    assert len(moved) == 2  # SmolLM2-1.7B 8 GB (16 kept, was 10), its 4 GB preset (20, was 19)


def test_run8b_no_choice_ran_out_and_qwen25_3b_4gb_is_bracketed():
    """Run 8b trained the moved choices (0 out of memory) and probed Qwen2.5-3B 4 GB between run 8's 16,896 (trained)
    and 19,200 (out of memory): 17,344 and 17,984 ran out, so its choice of 14,400 is 83.0-85.2% of the longest."""
    for r in _rows_8b():
        e = r["engine"]
        assert e["rc"] == 0 and not e.get("oom_events"), _key(r)
    probes = {p["len"]: p["ok"] for r in _rows_8b() for p in r.get("probes") or []}
    assert probes == {17344: False, 17984: False}


@needs_triton
def test_run8_estimate_within_5_percent_of_the_measured_peaks():
    """Allocated and reserved within 5% on every row, presets and held-out shapes included, but the named rows,
    every one over the measurement (none under it by more than 5%)."""
    bad = []
    # run 8b's SmolLM2-1.7B 8 GB (16 kept) is +3.9% allocated, +6.1% reserved (its allocator slack)
    for r, alloc_over, res_over in ([(r, ALLOCATED_OVER, RESERVED_OVER) for r in _rows()]
                                    + [(r, set(), {("smollm2-1.7b", "8gb", "full", False)}) for r in _rows_8b()]):
        k = _key(r)
        alloc, res = _measured(r)
        est = _estimate_as_run(r, tail=True)
        ea = 100 * (est.allocated_gib - alloc) / alloc
        er = 100 * (est.reserved_gib - res) / res
        for err, over, what in ((ea, alloc_over, "allocated"), (er, res_over, "reserved")):
            if k in over:
                assert err > 5, (k, what, err)  # still an exception: drop it from the set once within 5%
            elif abs(err) > 5:
                bad.append(f"{k} {what} {err:+.1f}%")
    assert not bad, "\n".join(bad)
