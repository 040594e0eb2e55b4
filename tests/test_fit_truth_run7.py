"""fit_truth run 7 (one H200, session 6: the engine with core/kernels.py, before the loss-tail kernel and the
shared static mask): none of its choices ran out of memory, the lengths that did run out are not "fits" today,
and today's estimate of each setting as that engine ran it is within 5% of the measured peaks (named
exceptions, each on the conservative side). Today's choices are held to run 8's measurements
(tests/test_fit_truth_run8.py). bench/results/fit_truth_run7.md has the table; README section `know`."""
from __future__ import annotations

import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN7 = REPO / "bench" / "results" / "fit_truth_run7.json"
sys.path.insert(0, str(REPO))

# the plans of the kernels-on rows are core/kernels.py's: on a machine without Triton the plan runs
# transformers' modules and prices them (the CPU's, old cards' pricing), so those choices differ
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="the kernels' plan needs Triton importable (as on the GPU that ran them)")

# Rows whose engine trial gave no measurement, and why (from the run's own record).
NOT_MEASURED = {
    # the engine process ended (rc 1) right after preparing the data, without an error event: killed
    # beside 24 other trials, 7.7 GiB of pinned host memory for its offloaded inputs (host RAM, not
    # the GPU); its probe at 52,608 tokens ran out of GPU memory
    ("llama-3.2-3b", "8gb", "full", False),
}
# Outside 5% of the measured peak reserved: each over it (conservative), with its cause.
RESERVED_OVER = {
    # the allocator's cached share (5% of the allocated peak + a quarter of the largest block) is above what
    # max_memory_reserved showed with memory to spare on these long offloaded rows; allocated within 4%
    ("llama-3.2-1b", "8gb", "full", False), ("llama-3.2-1b", "6gb", "full", False),
    ("qwen2.5-3b", "6gb", "full", False), ("qwen2.5-0.5b", "4gb", "full", False),
    ("qwen2.5-1.5b", "6gb", "full", False),
}
# Measured on an engine that differs from today's where it matters: CUDA-graph steps with 11 kept blocks at
# 8,192 tokens, when each block's attention built and saved its own T x T mask (64-128 MiB a kept block);
# today's engine shares one (run 8 measured the row at 4.75 GiB allocated with 10 kept, run 7 6.22 with 11).
ENGINE_CHANGED = {("smollm2-1.7b", "8gb", "full", False)}
# Outside 5% on the unsafe side (estimate under the measured peak): none. (Gemma-3-1B without the kernels,
# -5.8% reserved / -4.3% allocated before its second rotary table was priced, is -4.9% / -3.4%.)
RESERVED_UNDER: set = set()


@lru_cache(maxsize=1)
def _rows():
    return json.loads(RUN7.read_text())["rows"]


def _key(r):
    return (r["shape"], r["card"], r["start"], bool(r.get("kernels_off")))


@lru_cache(maxsize=None)
def _now(shape, card, start, kernels_off):
    from bench.fit_truth import plan_row

    return plan_row(shape, card, start, kernels=not kernels_off)


def _measured(r):
    e = r.get("engine") or {}
    return e.get("measured_allocated_gib"), e.get("measured_reserved_gib")


def test_run7_covers_every_model_card_and_start():
    keys = {_key(r) for r in _rows()}
    from bench.fit_truth import CARDS, SHAPES

    full = {(s, c) for s, c, st, off in keys if st == "full" and not off}
    # every shape on the 4 GB card; on 6 / 8 GB every distinct plan (twins: the same plan on both)
    assert {(s, "4gb") for s in SHAPES} <= full
    assert len(full) >= 19 and {c for _, c in full} == set(CARDS)
    assert sum(1 for k in keys if k[3]) >= 4  # rows with SNUGTUNE_KERNELS=off
    assert sum(1 for k in keys if k[2] == "preset") >= 8


def _estimate_as_run(r, tail: bool = False):
    """Today's estimate of the setting a row ran (its length, batch, kept blocks, offload, kernels), with the
    loss as run 7's engine ran it (`tail` True: as today's engine runs it)."""
    from dataclasses import replace

    from bench.fit_truth import SHAPES, base_config
    from core.catalog import catalog_lookup
    from core.estimate import estimate
    from core.gpu import resolve_gpu
    from core.plan import plan

    spec = catalog_lookup(SHAPES[r["shape"]])
    cfg = base_config(spec.id, r["seq"], r["micro_batch"], min(r["grad_accum"], 2), r["budget_gib"])
    gpu = resolve_gpu("rtx-3050", r["budget_gib"])
    p = replace(plan(cfg, spec, gpu, keep=r["plan"]["keep_blocks"]), kernels=r["plan"]["kernels"],
                cuda_graphs=r["plan"]["cuda_graphs"])
    # run 7's engine ran the chunked loss's tail in PyTorch operations (core.kernels.ce_tail came after it)
    return estimate(spec, cfg, gpu, plan=p, offload=r["plan"]["offload"], loss_tail=tail)


def test_run7_no_choice_ran_out_of_memory():
    for r in _rows():
        e = r["engine"]
        assert not e.get("oom_events") and "out of memory" not in (e.get("error") or ""), _key(r)
        if _key(r) in NOT_MEASURED:
            assert e["rc"] != 0 and not e.get("steps")
            continue
        assert e["rc"] == 0 and e["steps"] == e["max_steps"], _key(r)
    packed = [r["engine_packed"] for r in _rows() if r.get("engine_packed")]
    assert packed and all(p["rc"] == 0 and not p["oom_events"] for p in packed)


@needs_triton
def test_run7_lengths_that_ran_out_of_memory_are_not_fits():
    """Each probe at choice / 0.85 that ran out of memory (the real engine, micro-batch 1) is not "fits"
    today, and proves its choice at least 85% of the longest length that trains."""
    from bench.fit_truth import SHAPES, base_config
    from core.catalog import catalog_lookup
    from core.estimate import estimate
    from core.gpu import resolve_gpu

    ran_out = 0
    for r in _rows():
        for p in r.get("probes") or []:
            if p["ok"] is not False:
                continue
            ran_out += 1
            spec = catalog_lookup(SHAPES[r["shape"]])
            est = estimate(spec, base_config(spec.id, p["len"], 1, 2, r["budget_gib"]), resolve_gpu("rtx-3050", r["budget_gib"]))
            assert est.verdict != "fits", (r["shape"], r["card"], p["len"])
            assert r["seq"] >= 0.85 * p["len"] - 64, (r["shape"], r["card"])
    assert ran_out >= 7


def test_run7_the_two_probes_that_trained_are_the_named_misses():
    """The 4 GB choices of the two 3B shapes are under 85% of a length that trained (the longest is not
    bracketed): Qwen2.5-3B 13,632 of >= 16,000, Llama-3.2-3B 5,824 of >= 6,848."""
    trained = {(r["shape"], r["card"]): p["len"] for r in _rows() for p in r.get("probes") or [] if p["ok"]}
    assert trained == {("qwen2.5-3b", "4gb"): 16000, ("llama-3.2-3b", "4gb"): 6848}


@needs_triton
def test_run7_estimate_within_5_percent_of_the_measured_peaks():
    """Allocated within 5% on every row, presets included (kernels on and off); reserved within 5% but for the
    named rows, every one over the measurement."""
    bad = []
    for r in _rows():
        k = _key(r)
        alloc, res = _measured(r)
        if alloc is None:
            assert k in NOT_MEASURED
            continue
        if k in ENGINE_CHANGED:
            continue
        est = _estimate_as_run(r)
        ea = 100 * (est.allocated_gib - alloc) / alloc
        er = 100 * (est.reserved_gib - res) / res
        if abs(ea) > 5:
            bad.append(f"{k} allocated {ea:+.1f}%")
        if k in RESERVED_OVER:
            assert er > 5, (k, er)  # still an exception: drop it from RESERVED_OVER once within 5%
        elif k in RESERVED_UNDER:
            assert -7 < er < -5, (k, er)
        elif abs(er) > 5:
            bad.append(f"{k} reserved {er:+.1f}%")
    assert not bad, "\n".join(bad)
