"""The fused NF4 + LoRA node sums the LoRA term into the frozen projection in fp32 and rounds once.

Before (run 3 of bench/real_weights.py), the 16-bit base output was rounded first and the small
LoRA term added to it: in bf16 most of an early update never reached the forward, so snugtune's
bf16 learned slower than guarded fp16 in its first steps. bench/lora_sum_precision.py measures
one Adam step's loss drop against fp32 (real Gemma 3 270M weights: 26% of fp32's with the old sum,
102% with the new one); here the same check on the demo model, and the node's values directly.
"""
from __future__ import annotations

import json

import pytest
import torch

from core import savers


@pytest.fixture
def restore_flag():
    old = savers.LORA_SUM_FP32
    yield
    savers.LORA_SUM_FP32 = old


def _node(dtype):
    """A real NF4 weight (bitsandbytes on the CPU) behind _LoRA4bitLinear, with A and a small B."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=dtype, quant_type="nf4")
    # a 16-bit weight quantizes to a quant state of that dtype: the node computes in it
    lin.weight = bnb.nn.Params4bit((torch.randn(96, 64) * 0.05).to(dtype), requires_grad=False, quant_type="nf4")
    lin = lin.to("cpu")  # quantizes
    spec = savers._QSpec(lin.weight, None, cache_absmax=False)
    assert spec.dtype == dtype
    A = (torch.randn(16, 64) / 8).requires_grad_(True)
    B = torch.zeros(96, 16, requires_grad=True)
    x = torch.randn(4, 32, 64).to(dtype)
    return spec, A, B, x


def _kept(dtype, fp32_sum: bool) -> float:
    savers.LORA_SUM_FP32 = fp32_sum
    spec, A, B, x = _node(dtype)
    with torch.no_grad():
        y0 = savers._LoRA4bitLinear.apply(x, A, B, spec, 2.0).float()
        B.fill_(3e-5)  # Adam's first step at run 3's warm-up lr: lr x sign(g)
        B.mul_(torch.sign(torch.randn_like(B)))
        y1 = savers._LoRA4bitLinear.apply(x, A, B, spec, 2.0).float()
        exact = 2.0 * (x.float() @ A.t()) @ B.t()
    return float(((y1 - y0) * exact).sum() / (exact * exact).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_small_lora_term_reaches_the_16bit_output(restore_flag, dtype):
    kept_new = _kept(dtype, True)
    assert 0.9 < kept_new < 1.1, kept_new
    if dtype == torch.bfloat16:
        # the old sum (round, then add and round again) lost most of it in bf16
        assert _kept(dtype, False) < 0.6


def test_the_backward_is_the_same_with_either_sum(restore_flag):
    grads = {}
    for fp32_sum in (False, True):
        savers.LORA_SUM_FP32 = fp32_sum
        spec, A, B, x = _node(torch.bfloat16)
        with torch.no_grad():
            B.normal_(0, 0.01)
        x.requires_grad_(True)
        y = savers._LoRA4bitLinear.apply(x, A, B, spec, 2.0)
        assert y.dtype == torch.bfloat16 and y.shape == (4, 32, 96)
        y.float().pow(2).sum().backward()
        grads[fp32_sum] = (x.grad.float(), A.grad, B.grad)
    for a, b in zip(grads[False], grads[True]):
        # the outputs differ by bf16 rounding only, so the gradients (which read them) nearly agree
        assert float((a - b).norm() / b.norm()) < 2e-2


def test_one_adam_step_reaches_the_forward_in_bf16(tmp_path, restore_flag):
    """bench/lora_sum_precision.py --smoke (the demo model through load_for_training)."""
    from bench.lora_sum_precision import main

    out = tmp_path / "r.json"
    assert main(["--smoke", "--modes", "fp32,bf16-oldsum,bf16", "--lr", "3.3e-5", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["modes"]
    assert res["bf16"]["fused_lora_4bit"] and res["bf16"]["lr=3.3e-05"]["drop"] > 0
    assert 0.9 < res["bf16"]["lr=3.3e-05"]["drop_vs_fp32"] < 1.1
    assert res["bf16-oldsum"]["lr=3.3e-05"]["drop_vs_fp32"] < 0.7
    assert savers.LORA_SUM_FP32 is True  # the bench puts the flag back
