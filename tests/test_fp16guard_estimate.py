"""The estimator's fp16-guard lines with the guard's norms fused (core/fp16guard.py, session 7).

With core/kernels.py on, the guard's norms are the fused RMSNorm too, so a recomputed block gets the
kernels' credit under the guard as in bf16, less one thing: the pre-MLP norm reads the fp32 stream and
keeps it (4 bytes an element where bf16 keeps 2). No weights: Gemma 3 270M's real config.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from tests.test_real_weights_estimate import GEMMA3_270M

GIB = 2**30


def _est(monkeypatch, dtype: str, kernels: bool, seq: int = 2048, mb: int = 4, keep: int = 0):
    from bench.real_weights import _cfg
    from core import plan as plan_mod
    from core.catalog import spec_from_config
    from core.estimate import estimate
    from core.gpu import resolve_gpu

    monkeypatch.setattr(plan_mod, "_kernels", lambda *_a, **_k: (kernels, "as the test says"))
    spec = spec_from_config(GEMMA3_270M, "gemma-3-270m", source="local")
    cfg = _cfg("gemma-3-270m", "(none)", "/tmp", 3, dtype, True, False, seq, mb, responses_only=False)
    gpu = replace(resolve_gpu("h200"), total_gib=139.81, budget_gib=139.81)
    return estimate(spec, cfg, gpu, "snugtune", keep_layers=keep)


def test_guarded_block_gets_the_fused_norms_credit_less_the_fp32_pre_mlp_input(monkeypatch):
    # 2,048 x 4 tokens, every block checkpointed: the peak is a recomputed block's backward
    T, h = 2048 * 4, 640
    bf_on, bf_off = _est(monkeypatch, "bf16", True), _est(monkeypatch, "bf16", False)
    g_on, g_off = _est(monkeypatch, "fp16", True), _est(monkeypatch, "fp16", False)
    assert {e.peak_phase for e in (bf_on, bf_off, g_on, g_off)} == {"backward"}
    assert any("fp16 guard on" in n for n in g_on.notes)
    credit_bf16 = (bf_off.allocated_gib - bf_on.allocated_gib) * GIB
    credit_guard = (g_off.allocated_gib - g_on.allocated_gib) * GIB
    assert credit_guard > 0  # before session 7 the guard's norms were not fused: no credit (0)
    assert credit_bf16 - credit_guard == pytest.approx(T * h * 2, rel=1e-3)
    # the guard's fp32 block inputs (2 bytes more each, 18 blocks) are what is left between the two
    assert (g_on.allocated_gib - bf_on.allocated_gib) * GIB == pytest.approx(18 * T * h * 2, rel=1e-3)

