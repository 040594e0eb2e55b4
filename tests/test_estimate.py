"""core.estimate: each component by hand for a small config, the plain recipe against the
measured numbers of /work/shared/BASELINE.md, the verdict, autofit, and the GPU bench's pure parts."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from core import estimate as E
from core.catalog import ModelSpec, catalog_lookup, spec_from_param_count
from core.config import RunConfig
from core.errors import UserError
from core.gpu import GpuTarget, resolve_gpu
from core.plan import plan

GIB = 2**30


def cfg(seq=128, mb=1, r=8, gc=True, optim="paged_adamw_8bit", accum=1, offload="auto", targets="all-linear"):
    return RunConfig.from_dict({
        "model": {"name_or_path": "x"},
        "data": {"path": "x", "max_seq_len": seq},
        "lora": {"r": r, "alpha": 2 * r, "target_modules": targets},
        "train": {"micro_batch": mb, "grad_accum": accum, "optimizer": optim, "gradient_checkpointing": gc,
                  "offload_activations": offload},
    })


def card(budget=4.0, ctx=0.35) -> GpuTarget:
    return GpuTarget(name="card", label="test card", budget_gib=budget, bf16=True, compute_capability=(8, 6),
                     fp16_tflops=20.0, bandwidth_gbs=300.0, total_gib=budget, cuda_context_gib=ctx)


# hidden 64, 2 layers, 4 heads (head_dim 16), 2 kv heads, MLP 128, vocab 256, tied.
SMALL = ModelSpec(id="small", model_type="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, vocab_size=256, tie_word_embeddings=True,
                  max_position_embeddings=2048)


def test_small_model_counts_by_hand():
    # per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 + gate/up/down 3 * 64*128 = 36864
    assert SMALL.params_quantizable == 2 * 36864 == 73728
    # embedding 256*64 (tied) + 2 RMSNorms of 64 per layer + the final one
    assert SMALL.params_other == 256 * 64 + 2 * 2 * 64 + 64 == 16704
    # LoRA r=8: 8 * (in + out): q 128, k 96, v 96, o 128, gate 192, up 192, down 192 -> 8192 a layer
    assert SMALL.lora_params(8) == 2 * 8 * (128 + 96 + 96 + 128 + 192 * 3) == 16384


def test_plain_components_by_hand():
    est = E.estimate(SMALL, cfg(), card(), "plain")
    c = {k: v * GIB for k, v in est.components.items()}
    # 4-bit: 0.5 B + a uint8 absmax per 64 + fp32 per 64*256 -> 36864 + 1152 + 18 bytes; the rest fp32
    assert c["weights"] == pytest.approx(73728 * 0.5 + 73728 / 64 + 73728 * 4 / 16384 + 16704 * 4)
    assert c["adapters"] == pytest.approx(16384 * 4)
    assert c["optimizer"] == pytest.approx(16384 * (2 + 8 / 256))  # 8-bit Adam, two states + absmax
    # T=128 tokens. Kept block inputs (fp32 stream): 2 layers * 128 * 64 * 4 = 65536.
    # 4 query heads on 2 kv heads (GQA) with fp32 q/k/v: SDPA's math kernel, fp32 scores
    # 1 x 4 x 128 x 128 x 4 = 262144 bytes; a block keeps one, its recompute holds 3.7.
    # One block (22h + 14q + 8kv + 18I bytes a token) = 128 * 4864 = 622592, + 262144;
    # its backward's transients 128 * (8*128 + 8*64) = 196608, + 2.7 * 262144.
    # Loss moment: 65536 + 2*128*64*4 (final hidden) + 4 fp32 copies of 128 x 256 = 655360
    # Backward moment (the last block: all inputs stored, one block's LoRA grads 32768; the
    # first block's end is the same sum): 65536 + 884736 + 196608 + 2.7 * 262144, the fp32 logits the output
    # still holds (131072), grads 32768 -> the peak
    assert est.peak_phase == "backward"
    assert c["activations"] == pytest.approx(65536 + 884736 + 196608 + 2.7 * 262144)
    assert c["logits"] == pytest.approx(128 * 256 * 4)
    assert c["gradients"] == pytest.approx(16384 * 4 / 2)
    assert c["workspace"] == pytest.approx(E.WORKSPACE_GIB * GIB)
    # the part needed under pressure: 0.8 of the largest block (here a score tensor)
    assert c["allocator_overhead"] == pytest.approx(0.8 * 262144)
    assert c["cuda_context"] == pytest.approx(0.35 * GIB)
    assert est.total_gib == pytest.approx(sum(est.components.values()))
    # paged optimizer states are outside PyTorch's allocator
    alloc = c["weights"] + c["adapters"] + c["gradients"] + c["activations"] + c["logits"] + c["workspace"]
    assert est.allocated_gib * GIB == pytest.approx(alloc)
    # reserved with memory to spare: half the bf16 copies the fp32 cast freed + 0.8 of a score block
    cached = 0.5 * 16704 * 2 + 0.8 * 262144
    assert est.reserved_gib * GIB == pytest.approx(alloc + cached)
    # NVML's per-process number: reserved + context, without the paged (managed) states
    assert est.device_gib * GIB == pytest.approx(alloc + cached + 0.35 * GIB)


def test_snugtune_components_by_hand(monkeypatch):
    # transformers' modules (core/kernels.py off: the CPU, cards before compute capability 7.0, no Triton,
    # SNUGTUNE_KERNELS=off); with the kernels: tests/test_estimate_kernels.py
    monkeypatch.setenv("SNUGTUNE_KERNELS", "off")
    est = E.estimate(SMALL, cfg(), card(), "snugtune", keep_layers=0)  # the need (no spare-memory blocks)
    assert not est.plan.kernels
    c = {k: v * GIB for k, v in est.components.items()}
    assert c["weights"] == pytest.approx(38034 + 16704 * 2)  # non-quantized weights stay 16-bit
    # kept inputs, 2-byte stream: 2 * 128 * 64 * 2 = 32768 (offload: 32 KiB < 10% of 4 GiB -> off)
    # one block: 128 * (8*64 + 2*(6*64 + 2*64 + 2*32)) + 128 * 4*128*2 = 212992 + 131072 = 344064
    # (MLP tile = 256 MiB / (8 * 128) tokens, far above 128: not tiled)
    # transients: 2 more I-wide tensors in the MLP's backward 128 * 2*128*2 + 128 * 2*64*2 = 98304
    assert est.knobs["offload"] is False and est.knobs["mlp_tile_tokens"] is None
    # loss chunk: min(256 MiB, 4 GiB / 16) / (256 vocab * 8 bytes) tokens, capped by T=128;
    # 10 bytes a logit live: 128 * 256 * 10 = 327680 at the loss moment, below the backward's
    assert est.knobs["ce_chunk_tokens"] == 256 * 2**20 // (256 * 8)
    assert est.peak_phase == "backward"
    # the first block's backward is the worse end: one stored input (16384) and all LoRA
    # grads (65536), against all inputs (32768) and one block's grads (32768)
    # + SDPA's k/v repeated to 4 query heads: 128 * 2*(64-32)*2 = 16384 in the block; the
    # transient is the larger of the MLP's (98304) and the attention's 128 * 64 q * 10 (81920),
    # + RMSNorm's fp32 backward 128 * 64 * 4 = 32768
    # and CUDA-graph steps' one additive mask, 1 x 128 x 128 x 2 bytes (rows of 128: already 16-aligned)
    assert est.plan.cuda_graphs
    assert c["activations"] == pytest.approx(16384 + 344064 + 16384 + 98304 + 32768 + 128 * 128 * 2)
    assert c["gradients"] == pytest.approx(16384 * 4)
    alloc = c["weights"] + c["adapters"] + c["gradients"] + c["activations"] + c["workspace"]
    # the need above allocated: a share of what comes and goes each step (activations, gradients;
    # not the weights, adapters and workspace allocated once at load) + a share of the largest block
    assert c["allocator_overhead"] == pytest.approx(
        E.SNUG_OVERHEAD_SHARE * (c["activations"] + c["gradients"]) + E.SNUG_FRAGMENT_SHARE * 262144)
    # what max_memory_reserved shows with memory to spare keeps the share of everything
    assert est.reserved_gib * GIB == pytest.approx(alloc * (1 + E.SNUG_OVERHEAD_SHARE) + E.SNUG_FRAGMENT_SHARE * 262144)


def test_loss_moment_dominates_large_vocab_and_accumulated_grads_count_there():
    spec = catalog_lookup("Qwen/Qwen2.5-0.5B")
    one = E.estimate(spec, cfg(seq=1024, r=16), card(), "plain")
    assert one.peak_phase == "loss" and one.components["gradients"] == 0  # set_to_none after each step
    acc = E.estimate(spec, cfg(seq=1024, r=16, accum=4), card(), "plain")
    assert acc.components["gradients"] == pytest.approx(spec.lora_params(16) * 4 / GIB)
    # 4 fp32 token x vocab tensors: 4 * 1024 * 151936 * 4 bytes
    assert one.components["logits"] == pytest.approx(4 * 1024 * 151936 * 4 / GIB)


# ---- the plain recipe against BASELINE.md ------------------------------------------------------------

# /work/shared/BASELINE.md, "Peak memory and speed, batch 1": one H200, torch 2.11, transformers
# 5.17, peft 0.21, bitsandbytes 0.50.2, random-init models, qlora_probe.py (r=16, alpha 32, all 7
# projections, non-reentrant checkpointing, paged 8-bit AdamW, grad_accum 1, 8 timed steps).
BASELINE_PEAKS = [  # model, seq, peak allocated GiB, peak reserved GiB
    ("Qwen/Qwen2.5-0.5B", 512, 2.00, 2.21),
    ("Qwen/Qwen2.5-0.5B", 2048, 5.54, 6.24),
    ("Qwen/Qwen2.5-1.5B", 512, 2.84, 3.37),
    ("Qwen/Qwen2.5-1.5B", 1024, 4.08, 4.53),
    ("Qwen/Qwen2.5-1.5B", 2048, 6.57, 7.27),
    ("meta-llama/Llama-3.2-1B", 1024, 3.59, 4.11),
    ("HuggingFaceTB/SmolLM2-1.7B", 1024, 2.18, 2.46),
    ("google/gemma-2-2b", 1024, 8.39, 9.40),
    ("Qwen/Qwen2.5-3B", 1024, 5.25, 5.74),
    ("Qwen/Qwen2.5-3B", 2048, 7.86, 8.74),
]


@pytest.mark.parametrize("model,seq,alloc,reserved", BASELINE_PEAKS)
def test_plain_recipe_matches_baseline_peaks_within_10_percent(model, seq, alloc, reserved):
    est = E.estimate(catalog_lookup(model), cfg(seq=seq, r=16), resolve_gpu("h200"), "plain")
    assert est.allocated_gib == pytest.approx(alloc, rel=0.10)
    assert est.reserved_gib == pytest.approx(reserved, rel=0.10)


def test_baseline_after_prepare_weights():
    # BASELINE.md: "the 4-bit Qwen2.5-1.5B weighs 1.08 GiB after loading and 1.51 GiB after" the fp32 cast
    spec = catalog_lookup("Qwen/Qwen2.5-1.5B")
    plain = E.estimate(spec, cfg(r=16), resolve_gpu("h200"), "plain").components["weights"]
    snug = E.estimate(spec, cfg(r=16), resolve_gpu("h200"), "snugtune", keep_layers=0).components["weights"]
    assert plain == pytest.approx(1.51, rel=0.03)
    assert snug == pytest.approx(1.08, rel=0.03)


# BASELINE.md, "Longest sequence that trains inside a 4 GiB card": allocator capped at 3.65 GiB
# (4 GiB minus 0.35 of CUDA context), bisection in steps of 64 down to a 128-token gap, so
# max + 128 ran out of memory. The estimate must never say "fits" there.
BASELINE_MAXCTX = [
    ("Qwen/Qwen2.5-0.5B", 1088),
    ("meta-llama/Llama-3.2-1B", 704),
    ("Qwen/Qwen2.5-1.5B", 576),
    ("HuggingFaceTB/SmolLM2-1.7B", 2112),
    ("Qwen/Qwen2.5-3B", 192),
]


@pytest.mark.parametrize("model,max_seq", BASELINE_MAXCTX)
def test_never_fits_where_the_plain_recipe_ran_out(model, max_seq):
    spec = catalog_lookup(model)
    over = E.estimate(spec, cfg(seq=max_seq + 128, r=16), card(4.0, 0.35), "plain")
    assert over.verdict != "fits"
    longest = E.longest_seq(spec, cfg(r=16), card(4.0, 0.35), "plain")
    assert 0.75 * max_seq <= longest < max_seq + 128  # conservative, but not uselessly so


def test_gemma2_does_not_fit_4gib_with_the_plain_recipe():
    spec = catalog_lookup("google/gemma-2-2b")
    assert E.estimate(spec, cfg(seq=128, r=16), card(4.0, 0.35), "plain").verdict == "does not fit"


# ---- behaviour -----------------------------------------------------------------------------------------

def test_verdict_thresholds():
    total = E.estimate(SMALL, cfg(), card(100.0), "plain").total_gib
    assert E.estimate(SMALL, cfg(), card(total * 1.2), "plain").verdict == "fits"
    assert E.estimate(SMALL, cfg(), card(total * 1.02), "plain").verdict == "tight"  # < 5% headroom
    low = E.estimate(SMALL, cfg(), card(total * 0.9), "plain")
    assert low.verdict == "does not fit" and low.headroom_gib < 0


def test_savers_change_what_they_should():
    spec = catalog_lookup("Qwen/Qwen2.5-1.5B")
    plain = E.estimate(spec, cfg(seq=2048, r=16), card(24), "plain")
    snug = E.estimate(spec, cfg(seq=2048, r=16), card(24), "snugtune", keep_layers=0)  # the need
    assert snug.total_gib < 0.5 * plain.total_gib  # no full logits, 2-byte stream, no fp32 upcast
    gc_off = E.estimate(spec, cfg(seq=2048, r=16, gc=False), card(24), "snugtune")
    assert gc_off.components["activations"] > 3 * snug.components["activations"]
    on = E.estimate(spec, cfg(seq=8192, r=16, offload="on"), card(24), "snugtune", keep_layers=0)
    off = E.estimate(spec, cfg(seq=8192, r=16, offload="off"), card(24), "snugtune", keep_layers=0)
    # offload keeps 2 block inputs instead of 28: saves 26 * 8192 * 1536 * 2 bytes
    saved = (off.components["activations"] - on.components["activations"]) * GIB
    # (the run without offload takes CUDA-graph steps, whose one 8,192 x 8,192 additive mask it also holds)
    assert off.plan.cuda_graphs and not on.plan.cuda_graphs
    assert saved == pytest.approx(26 * 8192 * 1536 * 2 + 8192 * 8192 * 2)
    # the engine's auto rule: offload when the kept inputs exceed 10% of the budget
    assert E.estimate(spec, cfg(seq=8192, r=16), card(4), "snugtune").knobs["offload"] is True
    assert E.estimate(spec, cfg(seq=512, r=16), card(80), "snugtune").knobs["offload"] is False
    # at long context the MLP is tiled
    assert on.knobs["mlp_tile_tokens"] == 256 * 2**20 // (8 * 8960) // 256 * 256
    # rank grows adapters, gradients and optimizer linearly
    r64 = E.estimate(spec, cfg(seq=2048, r=64), card(24), "snugtune")
    assert r64.components["adapters"] == pytest.approx(4 * E.estimate(spec, cfg(seq=2048, r=16), card(24)).components["adapters"])


def test_optimizers():
    spec = catalog_lookup("Qwen/Qwen2.5-0.5B")
    n = spec.lora_params(16)
    by = {o: E.estimate(spec, cfg(r=16, optim=o), card(), "snugtune") for o in ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")}
    assert by["adamw_torch"].components["optimizer"] * GIB == pytest.approx(n * 8)
    assert by["adamw_8bit"].components["optimizer"] * GIB == pytest.approx(n * (2 + 8 / 256))
    # paged states are on the card but outside the allocator: same total, less "allocated"
    assert by["paged_adamw_8bit"].allocated_gib < by["adamw_8bit"].allocated_gib


def test_cpu_target_has_no_context_and_runs_fp32():
    est = E.estimate(SMALL, cfg(optim="auto"), resolve_gpu("cpu"), "snugtune")
    assert est.components["cuda_context"] == 0 and est.components["allocator_overhead"] == 0
    assert est.knobs["optimizer"] == "adamw_torch"
    assert est.components["weights"] * GIB == pytest.approx(38034 + 16704 * 4)


def test_inexact_specs_get_a_margin():
    guess = spec_from_param_count("x/y", 1_500_000_000)
    est = E.estimate(guess, cfg(seq=1024, r=16), card(24))
    assert est.components["margin"] > 0 and any("margin" in n for n in est.notes)
    body = est.total_gib - est.components["margin"] - est.components["cuda_context"]
    assert est.components["margin"] == pytest.approx(E.INEXACT_MARGIN * body)


def test_bad_input():
    spec = catalog_lookup("Qwen/Qwen2.5-0.5B")
    with pytest.raises(UserError, match="larger than the narrowest"):
        E.estimate(spec, cfg(r=256), card())  # k/v projections are 128 wide
    with pytest.raises(UserError, match="matches no linear layer"):
        E.estimate(spec, cfg(targets=["c_attn"]), card())
    with pytest.raises(UserError, match="unknown recipe"):
        E.estimate(spec, cfg(), card(), "fast")


def test_autofit_keeps_the_effective_batch():
    spec = catalog_lookup("Qwen/Qwen2.5-1.5B")
    fit = E.autofit(spec, cfg(seq=4096, r=16, mb=1, accum=16), card(4.0), "plain")
    assert fit.fits and fit.max_seq_len < 4096 and fit.max_seq_len % 64 == 0
    assert fit.estimate.verdict == "fits" and fit.effective_batch == 16
    assert fit.micro_batch * fit.grad_accum == 16
    # one step longer would not fit
    assert E.estimate(spec, cfg(seq=fit.longest_seq_len + 64, r=16), card(4.0), "plain").verdict != "fits"
    big = E.autofit(spec, cfg(seq=256, r=16, mb=1, accum=8), card(24.0), "snugtune")
    # a setting that fits keeps its length; another micro-batch only when the estimate says faster
    assert big.max_seq_len == 256 and big.micro_batch * big.grad_accum == 8

    def per_seq(mb):
        c = cfg(seq=256, r=16, mb=mb, accum=8 // mb)
        return E.estimate_step_time(spec, c, card(24.0)) / 8

    # within the 2% a change must beat to be taken
    assert per_seq(big.micro_batch) * 0.98 <= min(per_seq(mb) for mb in (1, 2, 4, 8))
    nothing = E.autofit(catalog_lookup("google/gemma-2-2b"), cfg(seq=512, r=16), card(2.0), "plain")
    assert not nothing.fits and nothing.longest_seq_len == 0


def test_step_time_is_rough_but_sane():
    spec = catalog_lookup("Qwen/Qwen2.5-0.5B")
    t1 = E.estimate_step_time(spec, cfg(seq=1024, accum=1), resolve_gpu("rtx-3060-12gb"))
    t8 = E.estimate_step_time(spec, cfg(seq=1024, accum=8), resolve_gpu("rtx-3060-12gb"))
    fast = E.estimate_step_time(spec, cfg(seq=1024, accum=1), resolve_gpu("h100"))
    assert 0 < fast < t1 and t8 > 7 * t1
    assert 0.01 < t1 < 60


def test_step_time_follows_cuda_graphs():
    """Graphed steps lose the per-launch host time; long rows, offload, fp16 cards and `off` keep it.
    Against bench run 5 (H200, Qwen2.5-1.5B, 1,024 tokens): 0.274 s eager, 0.066 s graphed."""
    spec = catalog_lookup("Qwen/Qwen2.5-1.5B")
    h200 = resolve_gpu("h200", vram_budget_gib=4.0)
    graphed = E.estimate_step_time(spec, cfg(seq=1024, accum=1), h200)
    off = RunConfig.from_dict({**cfg(seq=1024, accum=1).to_dict(), "train": {**cfg(seq=1024).to_dict()["train"],
                                                                              "cuda_graphs": "off"}})
    eager = E.estimate_step_time(spec, off, h200)
    assert plan(cfg(seq=1024, accum=1), spec, h200).cuda_graphs
    assert 0.066 / 1.6 < graphed < 0.066 * 1.6 and 0.274 / 1.6 < eager < 0.274 * 1.6
    assert not plan(cfg(seq=16384, accum=1), spec, h200).cuda_graphs  # over 8,192 tokens (and offloaded)
    assert not plan(cfg(seq=1024, accum=1), spec, resolve_gpu("gtx-1650")).cuda_graphs  # fp16 card


# ---- bench/estimate_accuracy.py's pure parts (the GPU run itself happens on the GPU machine) ----------

@pytest.fixture
def bench():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import estimate_accuracy

        yield estimate_accuracy
    finally:
        sys.path.pop(0)


def test_bench_matrix_covers_what_the_issue_asks(bench):
    cases = bench.config_matrix()
    assert len(cases) >= 12
    specs = {c.model: catalog_lookup(bench.MODELS[c.model]) for c in cases}
    assert len({s.model_type for s in specs.values()}) >= 5
    assert any(s.vocab_size >= 256000 for s in specs.values())  # gemma-2-2b
    assert min(c.seq for c in cases) <= 256 and max(c.seq for c in cases) >= 4096
    assert {c.micro_batch for c in cases} >= {1, 2, 4}
    assert min(c.rank for c in cases) <= 8 and max(c.rank for c in cases) >= 64
    assert {c.grad_ckpt for c in cases} == {True, False}
    assert len({c.name for c in cases}) == len(cases)
    for c in cases:  # every case estimates under both recipes
        for r in ("plain", "snugtune"):
            e = bench.estimate_case(c, r)
            assert e["total_gib"] > e["allocated_gib"] > 0
            assert e["device_gib"] > e["reserved_gib"] >= e["allocated_gib"]


def test_bench_builds_configs_transformers_accepts(bench):
    from transformers import AutoConfig

    for name, mid in bench.MODELS.items():
        spec = catalog_lookup(mid)
        hf = AutoConfig.for_model(spec.model_type, **bench.hf_config_kwargs(spec))
        from core.catalog import spec_from_config

        assert spec_from_config(hf.to_dict(), mid).params_total == spec.params_total, name


def test_bench_report_files(bench, tmp_path):
    results = [
        {"case": "a", "recipe": "plain", "measured": {"peak_reserved_gib": 2.0, "peak_alloc_gib": 1.8, "nvml_process_gib": 2.5},
         "estimated": {"reserved_gib": 2.2, "allocated_gib": 1.8, "device_gib": 2.4}},
        {"case": "a", "recipe": "snugtune", "error": "CUDA out of memory", "estimated": {"reserved_gib": 1.0}},
    ]
    js, md = bench.write_report(results, tmp_path, {"steps": 3})
    data = json.loads(js.read_text())
    assert data["results"][0]["case"] == "a" and data["meta"]["steps"] == 3
    text = md.read_text()
    assert "| a | plain | 2.00 | 2.20 | +10.0 | 1.80 | 1.80 | +0.0 | 2.50 | 2.40 | -4.0 |" in text
    assert "CUDA out of memory" in text and "max 10.0%" in text
    assert bench.error_pct(2.0, 1.5) == pytest.approx(-25.0) and bench.error_pct(None, 1.0) is None


def test_calibration_is_stored_per_card_and_applied_to_detected_cards(config_dir):
    spec = catalog_lookup("Qwen/Qwen2.5-0.5B")
    detected = replace(card(8.0), detected=True)
    base = E.estimate(spec, cfg(seq=1024, r=16), detected)
    path = E.save_calibration("card", "snugtune", 1.1, [{"case": "x", "measured_gib": 1.1, "estimated_gib": 1.0}])
    assert path.parent == config_dir and json.loads(path.read_text())["card"]["snugtune"]["factor"] == 1.1
    cal = E.estimate(spec, cfg(seq=1024, r=16), detected)
    assert cal.allocated_gib == pytest.approx(1.1 * base.allocated_gib)
    assert cal.components["cuda_context"] == base.components["cuda_context"]  # outside the allocator: unscaled
    assert any("calibrated" in n for n in cal.notes)
    # a profile (not this machine's card) and the other recipe stay uncalibrated
    assert E.estimate(spec, cfg(seq=1024, r=16), card(8.0)).allocated_gib == pytest.approx(base.allocated_gib)
    assert E.load_calibration("card", "plain") == 1.0
    with pytest.raises(UserError, match="outside"):
        E.save_calibration("card", "plain", 3.0)


def test_bench_calibration_factor_takes_the_worst_run(bench):
    assert bench.calibration_factor([(1.1, 1.0), (2.0, 2.0)]) == pytest.approx(1.1)
    with pytest.raises(ValueError):
        bench.calibration_factor([(None, 1.0)])


# ---- the H200 bench's measurements (bench/results/estimate_accuracy.json) ---------------------------

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "estimate_accuracy.json"
TOLERANCE = 5.0  # % of the measured value, either way (issue 9's target; was 10%)
# (case, recipe, quantity) left out of the +-5% assertion, each with its reason. They are
# still checked against a looser bound below, so they fail visibly if they get worse, and they
# must stay conservative (over the measurement: never a "fits" that runs out).
NOT_WITHIN_10: dict = {
    ("q3-0.6-512-b2-nogc-adamw", "snugtune", "reserved"): "no checkpointing: every block's count runs 6.5% over",
    ("q3-0.6-512-b2-nogc-adamw", "snugtune", "device"): "the same row through NVML (+7.1%)",
    ("slm-1024", "plain", "device"): "StableLM-2 plain: NVML's outside-allocator memory 0.1 GiB under the "
                                     "0.81 GiB context assumed for Hopper",
}
LOOSE = 8.0


def _bench_rows():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import estimate_accuracy as bench
    finally:
        sys.path.pop(0)
    rows = []
    for r in json.loads(RESULTS.read_text())["results"]:
        if r.get("error"):
            continue
        m = r["measured"]
        e = bench.estimate_case(bench.Case(**r["config"]), r["recipe"], r.get("total_memory_gib", 139.81),
                                kernels=r.get("kernels", False))  # measured before core/kernels.py
        rows.append((r["case"], r["recipe"], {
            "allocated": bench.error_pct(m["peak_alloc_gib"], e["allocated_gib"]),
            "reserved": bench.error_pct(m["peak_reserved_gib"], e["reserved_gib"]),
            "device": bench.error_pct(m.get("nvml_process_gib"), e["device_gib"]),
        }))
    return rows


def test_estimates_within_5_percent_of_the_h200_measurements():
    rows = _bench_rows()
    assert len(rows) == 28 and {r for _, r, _ in rows} == {"plain", "snugtune"}
    bad = []
    for case, recipe, errs in rows:
        for what in ("allocated", "reserved", "device"):
            err = errs[what]
            if err is None:
                continue
            limit = LOOSE if (case, recipe, what) in NOT_WITHIN_10 else TOLERANCE
            if abs(err) > limit:
                bad.append(f"{case} {recipe} {what}: {err:+.1f}% (limit {limit}%)")
    assert not bad, "\n".join(bad)
    # the exceptions are still exceptions (drop them from NOT_WITHIN_10 once they are within 5%)
    for (case, recipe, what), reason in NOT_WITHIN_10.items():
        err = next(e[what] for c, r, e in rows if (c, r) == (case, recipe))
        assert abs(err) > TOLERANCE and err > 0, (case, recipe, what, err, reason)
    reserved = [abs(e["reserved"]) for _, _, e in rows]
    assert sum(reserved) / len(reserved) < 3.0  # mean reserved error (2.4%; was 8.5% before the first fixes)


def test_cuda_context_measured_on_hopper_assumed_on_consumer_cards():
    assert E.context_gib(resolve_gpu("h200")) == pytest.approx(0.81)  # NVML - reserved on the H200
    assert E.context_gib(resolve_gpu("h100")) == pytest.approx(0.81)  # same architecture
    assert E.context_gib(resolve_gpu("gtx-1650")) == pytest.approx(0.35)  # BASELINE.md's assumption
    assert E.context_gib(resolve_gpu("cpu")) == 0
    spec = catalog_lookup("Qwen/Qwen2.5-0.5B")
    est = E.estimate(spec, cfg(seq=512, r=16), resolve_gpu("h200"))
    assert est.components["cuda_context"] == pytest.approx(0.81)
    assert est.device_gib == pytest.approx(est.reserved_gib + 0.81)


def test_bench_rescore_rewrites_the_markdown_from_stored_measurements(bench, tmp_path):
    data = json.loads(RESULTS.read_text())
    row = next(r for r in data["results"] if r["case"] == "q05-512" and r["recipe"] == "snugtune")
    row = dict(row, estimated={"reserved_gib": 99.0, "allocated_gib": 99.0, "device_gib": 99.0})  # stale
    path = tmp_path / "estimate_accuracy.json"
    path.write_text(json.dumps({"meta": {"steps": 3}, "results": [row]}))
    before = path.read_text()
    assert bench.main(["--rescore", str(path)]) == 0
    md = (tmp_path / "estimate_accuracy.md").read_text()
    fresh = bench.estimate_case(bench.Case(**row["config"]), "snugtune", row["total_memory_gib"], kernels=False)
    assert f"| q05-512 | snugtune | {row['measured']['peak_reserved_gib']:.2f} | {fresh['reserved_gib']:.2f} |" in md
    assert "99.00" not in md and "--rescore" in md
    assert path.read_text() == before  # the GPU's record is left as it is
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a bench result file"):
        bench.main(["--rescore", str(bad)])


# ---- auto-fit against real training (bench/results/fit_truth_run4*.json, _run5.json, today's engine) -----

FIT_TRUTH = [Path(__file__).resolve().parents[1] / "bench" / "results" / f"fit_truth_run{n}.json" for n in ("4", "4b", "5", "5b")]


def _run7_kernels_off_rows():
    path = FIT_TRUTH[0].parent / "fit_truth_run7.json"
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text())["rows"] if r.get("kernels_off")]


def _fit_truth_rows():
    rows = []
    for path in FIT_TRUTH:
        rows += json.loads(path.read_text())["rows"]
    return rows


def test_no_length_that_ran_out_of_memory_is_called_fits(monkeypatch):
    """Every length the H200 bisection saw run out of memory under a card's allocator cap (the engine
    before core/kernels.py: planned here with SNUGTUNE_KERNELS=off, as that engine ran) is not "fits"
    by today's estimate, and auto-fit's choice for that model and card is shorter than all of them: a
    "fits" that then runs out of memory is what the estimator exists to prevent. (Today's engine with
    the kernels: tests/test_fit_truth_run7.py.)"""
    monkeypatch.setenv("SNUGTUNE_KERNELS", "off")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.fit_truth import SHAPES, base_config, plan_row

    failed: dict[tuple, set] = {}
    for r in _fit_truth_rows():
        for t in r.get("bisect_tries") or []:
            if not t["ok"]:
                failed.setdefault((r["shape"], r["card"], r["budget_gib"]), set()).add(t["len"])
    assert len(failed) >= 6  # the 4 GB card's six models whose choice is under their position limit
    for (shape, card, budget), lengths in failed.items():
        spec = catalog_lookup(SHAPES[shape])
        gpu = resolve_gpu("rtx-3050", budget)
        for n in sorted(lengths):
            assert E.estimate(spec, base_config(spec.id, n, 1, 2, budget), gpu).verdict != "fits", (shape, card, n)
        assert plan_row(shape, card, "full")["seq"] < min(lengths), (shape, card)


def test_fit_truth_choices_that_ran_are_today_s_choices(monkeypatch):
    """The run 4-5b rows (the engine before core/kernels.py) were trained at exactly what auto-fit
    chooses today without the kernels (SNUGTUNE_KERNELS=off, the CPU's and old cards' pricing): a change
    to that pricing that moves a choice must come with a new GPU run (bench/fit_truth.py --rows
    SHAPE:CARD:START). Today's engine's choices: tests/test_fit_truth_run7.py."""
    monkeypatch.setenv("SNUGTUNE_KERNELS", "off")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.fit_truth import plan_row

    rows = _fit_truth_rows()
    trained: dict[tuple, int] = {}  # the longest length that trained at micro-batch 1 in those runs
    for r in rows:
        key = (r["shape"], r["card"])
        for t in r.get("bisect_tries") or []:
            if t["ok"]:
                trained[key] = max(trained.get(key, 0), t["len"])
        e = r.get("engine") or {}
        if r["micro_batch"] == 1 and e.get("steps") and not e.get("oom_events"):
            trained[key] = max(trained.get(key, 0), r["seq"])
    for r in _run7_kernels_off_rows():  # today's engine with SNUGTUNE_KERNELS=off at today's kernels-off choice
        e = r.get("engine") or {}
        if r["micro_batch"] == 1 and e.get("steps") and not e.get("oom_events"):
            key = (r["shape"], r["card"])
            trained[key] = max(trained.get(key, 0), r["seq"])
    moved = []
    for r in rows:
        if r.get("engine", {}).get("skipped"):
            continue
        now = plan_row(r["shape"], r["card"], r["start"])
        got = (now["seq"], now["micro_batch"], now["plan"]["keep_blocks"], now["plan"]["offload"])
        if got == (r["seq"], r["micro_batch"], r["plan"]["keep_blocks"], r["plan"]["offload"]):
            continue
        if (now["seq"], now["micro_batch"], now["plan"]["offload"]) == (r["seq"], r["micro_batch"], r["plan"]["offload"]) \
                and now["plan"]["keep_blocks"] < r["plan"]["keep_blocks"]:
            # fewer kept blocks than the plan that trained (Gemma-3-1B's 4 GB preset: its second rotary
            # table, priced since, put the 18th past 90% of the budget; the graphed rows since a mask copy a
            # kept block is counted): no more memory than that one
            continue
        # the attention's backward without the MLP's store (core/estimate.py, session 6) moved the long
        # SDPA rows' choices: 6/8 GB down, 4 GB up; every one is at or below a length that trained there
        # (these runs' choices and probes; run 7's rows with SNUGTUNE_KERNELS=off)
        assert r["start"] == "full" and now["micro_batch"] == 1 and now["seq"] <= trained.get((r["shape"], r["card"]), 0), (
            r["shape"], r["card"], r["start"], got)
        moved.append((r["shape"], r["card"]))
    assert len(set(moved)) <= 10, moved
