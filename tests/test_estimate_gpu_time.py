"""bench/gpu_time.py runs 3 and 4 (one H200, session 6: bench/results/gpu_time_run3.json, _run4.json) measured
snugtune's peak allocated memory on Qwen2.5-1.5B (1,024 tokens with 14 of 28 blocks kept, 4,096 with 2) and
Llama-3.1-8B (2,048, 7 of 32 kept), normal and CUDA-graph steps, kernels on and off, before (run 3) and after
(run 4) the chunked loss's tail kernel (core.kernels.ce_tail). Today's estimate of those exact settings:
the kept blocks with the kernels credited, the loss tail at 2 bytes a logit."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from core import estimate as E
from core import plan as P
from core.catalog import catalog_lookup
from core.config import RunConfig
from core.gpu import GpuTarget

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = {"qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B", "llama-3.1-8b": "meta-llama/Llama-3.1-8B"}


def _rows():
    out = []
    for run in (3, 4):
        for r in json.loads((RESULTS / f"gpu_time_run{run}.json").read_text())["results"]:
            if r.get("part") == "result" and r["engine"] == "snugtune":
                out.append((run, r))
    return out


def _estimate(run, r, monkeypatch):
    """The estimate of a gpu_time trial as bench/gpu_time.py's Snug.install planned it (bench/trial.py::
    plan_for: the allocator cap as the budget, no context; batch 1, r=16 on all seven projections; one
    optimizer step a micro-batch), with the kept blocks, kernels and graphs the trial ran."""
    a, spec = r["applied"], catalog_lookup(IDS[r["shape"]])
    cfg = RunConfig.from_dict({
        "model": {"name_or_path": spec.id}, "data": {"path": "(bench)", "max_seq_len": r["seq"]},
        "lora": {"r": 16, "alpha": 32, "target_modules": TARGETS},
        "train": {"chunked_loss": True, "gradient_checkpointing": True, "offload_activations": "auto",
                  "micro_batch": 1, "grad_accum": 1}})
    gpu = GpuTarget(name="bench", label="bench", budget_gib=r["cap_gib"], bf16=True, compute_capability=(8, 0),
                    fp16_tflops=300.0, bandwidth_gbs=3000.0, total_gib=139.0, cuda_context_gib=0.0,
                    budget_source="vram")
    kernels = "without the kernels" not in r["variant"]
    monkeypatch.setenv("SNUGTUNE_KERNELS", "on" if kernels else "off")
    p = replace(P.plan(cfg, spec, gpu, keep=a["uncheckpointed_blocks"]), kernels=kernels,
                cuda_graphs=r["variant"] == "graphs", offload=a["offload"])
    assert p.keep_blocks == a["uncheckpointed_blocks"] and p.ce_chunk_tokens == a["ce_chunk_tokens"]
    return E.estimate(spec, cfg, gpu, plan=p, offload=a["offload"], loss_tail=run >= 4)


def test_kept_blocks_with_the_kernels_within_2_percent(monkeypatch):
    """1,024 tokens, 14 kept blocks: -1.9..-0.4% with the kernels (before the credit: +12..+21%), and the
    kernels-off trial -1.2%; Llama-3.1-8B with 7 kept at 2,048 tokens +1.8 / +2.4%."""
    seen = 0
    for run, r in _rows():
        if r["seq"] == 4096:
            continue
        est = _estimate(run, r, monkeypatch)
        err = 100 * (est.allocated_gib - r["peak_allocated_gib"]) / r["peak_allocated_gib"]
        assert abs(err) < 2.5 if r["shape"] == "qwen2.5-1.5b" else 0 < err < 3, (run, r["seq"], r["variant"], err)
        seen += 1
    assert seen == 7


def test_the_loss_tail_kernel_lowers_the_estimate_as_it_lowered_the_peak(monkeypatch):
    """Runs 3 -> 4 are the same trials but for core.kernels.ce_tail: measured -0.170 / -0.159 GiB at 1,024 tokens
    (normal / graphs), where the loss is the peak; the estimate's 10 -> 2 bytes a logit of the 201-token chunk
    moves it by as much (within 15 MiB)."""
    by = {(run, r["seq"], r["variant"]): r for run, r in _rows()}
    for variant in ("normal", "graphs"):
        before, after = by[(3, 1024, variant)], by[(4, 1024, variant)]
        measured = after["peak_allocated_gib"] - before["peak_allocated_gib"]
        est = (_estimate(4, after, monkeypatch).allocated_gib - _estimate(3, before, monkeypatch).allocated_gib)
        assert measured < -0.15 and abs(est - measured) < 0.015, (variant, measured, est)


def test_the_named_overestimate_two_kept_blocks_at_4096(monkeypatch):
    """Not within 5%: 4,096 tokens with 2 kept blocks is estimated 4-11% over (its backward peak counts a
    recomputed block in flight beside both kept blocks' stores, while the kept blocks' backward runs first and
    frees them: a block's count too many, on the safe side; graph steps also the mask copies a kept block
    counted until a GPU run measures them shared). Held here so that a fix shows."""
    for run, r in _rows():
        if r["seq"] != 4096:
            continue
        est = _estimate(run, r, monkeypatch)
        err = 100 * (est.allocated_gib - r["peak_allocated_gib"]) / r["peak_allocated_gib"]
        assert 3 < err < 15, (run, r["variant"], err)
