"""The estimate prices core/kernels.py where the plan runs it: what each fused kernel keeps for the
backward, by hand on a small shape, and only for the model types whose modules the kernels patch."""
from __future__ import annotations

from dataclasses import replace

import pytest

from core import estimate as E
from core import plan as P
from core.catalog import ModelSpec, catalog_lookup

from tests.test_estimate import GIB, SMALL, card, cfg


def test_kernels_price_what_each_fused_kernel_keeps(monkeypatch):
    """SMALL (h 64, q 64, kv 32, I 128) at 128 tokens: a recomputed block keeps the second norm's
    2-byte input (2h) where transformers' norms keep two fp32 copies (8h), three I-wide MLP tensors
    where transformers keeps four (no activation output), and in the backward the attention holds
    ROPE_BWD_BYTES a q element less and the norm no fp32 temporary."""
    monkeypatch.delenv("SNUGTUNE_KERNELS", raising=False)
    p = P.plan(cfg(), SMALL, card())
    on = E.estimate(SMALL, cfg(), card(), "snugtune", plan=replace(p, kernels=True), keep_layers=0)
    off = E.estimate(SMALL, cfg(), card(), "snugtune", plan=replace(p, kernels=False), keep_layers=0)
    a_on, a_off = on.components["activations"] * GIB, off.components["activations"] * GIB
    # off (tests/test_estimate.py by hand): one input 16384 + block 344064 + repeated k/v 16384
    # + MLP transient 98304 (over the attention's 128 * 64 * 10) + norm backward 128 * 64 * 4
    # + the CUDA-graph steps' one additive mask (128 x 128 x 2), in both
    mask = 128 * 128 * 2
    assert a_off == pytest.approx(16384 + 344064 + 16384 + 98304 + 32768 + mask)
    # on: block 128 * (2*64 + 2*(6*64 + 2*64 + 2*32)) + 128 * 3*128*2 = 163840 + 98304; the MLP's
    # transient (98304) still beats the attention's 128 * 64 * (10 - 4); no norm temporary
    assert a_on == pytest.approx(16384 + 163840 + 98304 + 16384 + 98304 + mask)
    assert E.ROPE_BWD_BYTES == 4 and E.ATTN_BWD_BYTES == 10


def test_long_rows_save_14h_a_token_as_run_6_measured():
    """Llama and Qwen2.5 shapes (q = h): 6h (norm copies) + 4h (norm temporary) + 4q (rotary) = 14 h
    bytes a token at long, attention-bound rows, the saving fit_truth runs 5/6 measured (13.8-14.0 h)."""
    spec = catalog_lookup("meta-llama/Llama-3.2-1B")
    gpu = card(7.79)
    c = cfg(seq=63040, accum=2, offload="on", r=16)
    p = P.plan(c, spec, gpu, keep=0)
    on = E.estimate(spec, c, gpu, "snugtune", plan=replace(p, kernels=True))
    off = E.estimate(spec, c, gpu, "snugtune", plan=replace(p, kernels=False))
    saved = (off.allocated_gib - on.allocated_gib) * GIB / (63040 * spec.hidden_size)
    assert saved == pytest.approx(14.0, abs=0.3)


def test_kernels_are_priced_only_where_the_plan_runs_them(monkeypatch):
    """No credit on the CPU, with SNUGTUNE_KERNELS=off, nor for model types the kernels do not patch; under the
    fp16 guard (its norms fused too) the fp32 stream still costs more than bf16's."""
    spec = catalog_lookup("Qwen/Qwen2.5-1.5B")
    c = cfg(seq=8192, accum=2)
    monkeypatch.setenv("SNUGTUNE_KERNELS", "off")
    off = E.estimate(spec, c, card(), "snugtune")
    assert not off.plan.kernels
    assert E.estimate(spec, c, card(), "snugtune", plan=replace(off.plan, kernels=True)).allocated_gib < off.allocated_gib
    other = replace(spec, id="x", model_type="phi3")  # not patched by core/kernels.py
    po = P.plan(c, other, card())
    assert not po.kernels and po.kernels_why == "no fused kernels for phi3 blocks: transformers' path"
    assert (E.estimate(other, c, card(), "snugtune", plan=replace(po, kernels=True)).allocated_gib
            == E.estimate(other, c, card(), "snugtune", plan=po).allocated_gib)
    pg = replace(off.plan, fp16_guard=True)
    guarded = E.estimate(spec, c, card(), "snugtune", plan=replace(pg, kernels=True))
    fused = E.estimate(spec, c, card(), "snugtune", plan=replace(off.plan, kernels=True))
    assert guarded.allocated_gib > fused.allocated_gib  # the fp32 stream: block inputs, the pre-MLP norm's input


def test_kernel_types_are_the_model_types_core_kernels_patches():
    """core.plan.KERNEL_TYPES (the estimate's list, torch-free) names the model types whose norm, MLP and
    attention classes core/kernels.py patches."""
    kernels = pytest.importorskip("core.kernels")
    classes = kernels.LLAMA_NORMS | kernels.GEMMA_NORMS | kernels.MLP_CLASSES | kernels.ATTN_CLASSES
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "gemma": "Gemma",
              "gemma2": "Gemma2", "gemma3_text": "Gemma3"}
    assert set(prefix) == set(P.KERNEL_TYPES)
    for t, name in prefix.items():
        assert {f"{name}RMSNorm", f"{name}MLP", f"{name}Attention"} <= classes, t
    covered = {c.replace("RMSNorm", "").replace("MLP", "").replace("Attention", "") for c in classes}
    assert covered == set(prefix.values())
