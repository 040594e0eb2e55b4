"""The estimator against real_weights run 4's measured Gemma 3 270M peaks (H200, bench/results/).

Run 4 measured 3 steps at 512 and 2,048 tokens x micro-batch 1 and 4, every block kept
un-checkpointed (the plan's choice on the H200). The estimate for the same plan must be within
5% of each measured peak, allocated and reserved (the issue's bar). The model's config is the
real one (Gemma 3 270M, as converted from its GGUF), so no weights are needed.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GEMMA3_270M = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 256, "hidden_size": 640,
    "intermediate_size": 2048, "num_attention_heads": 4, "num_hidden_layers": 18, "num_key_value_heads": 1,
    "max_position_embeddings": 32768, "sliding_window": 512, "tie_word_embeddings": True, "vocab_size": 262144,
    "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": None, "final_logit_softcapping": None,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "attention_bias": False,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
}


def _rows():
    res = json.loads((ROOT / "bench/results/real_weights_run4.json").read_text())
    return res["estimator"]


@pytest.mark.parametrize("row", _rows(), ids=lambda r: r["variant"])
def test_estimate_within_5_percent_of_run4(row, monkeypatch):
    from bench.real_weights import _cfg, _kept_blocks, _kernels_of
    from core import plan as plan_mod
    from core.catalog import spec_from_config
    from core.estimate import estimate
    from core.gpu import resolve_gpu

    # run 4 predates core/kernels.py: priced without them, whatever this machine's Triton says
    assert _kernels_of(row) is False
    monkeypatch.setattr(plan_mod, "_kernels", lambda *_a, **_k: (False, "run 4 had no fused kernels"))

    spec = spec_from_config(GEMMA3_270M, "gemma-3-270m", source="local")
    cfg = _cfg("gemma-3-270m", "(none)", "/tmp", 3, "bf16", True, False, row["seq"], row["micro_batch"],
               responses_only=False)
    gpu = replace(resolve_gpu("h200"), total_gib=139.81, budget_gib=139.81)
    est = estimate(spec, cfg, gpu, "snugtune", keep_layers=_kept_blocks(row))
    for got, want in ((est.allocated_gib, row["peak_alloc_gib"]), (est.reserved_gib, row["peak_reserved_gib"])):
        assert abs(got - want) / want <= 0.05, (row["variant"], got, want)
