"""Will it fit? The peak GPU memory of a QLoRA run, broken into its parts, before any download.

Two recipes are modelled:

* "plain": /work/shared/reference/qlora_probe.py, the by-hand transformers+peft+bitsandbytes
  recipe. prepare_model_for_kbit_training casts every non-quantized parameter to fp32, so the
  residual stream is fp32 too (bitsandbytes casts its output back to its input's dtype); the
  model's own loss keeps ~4 token x vocab fp32 tensors alive at the start of backward (the
  logits held by the output object, log_softmax's output, its gradient, the logits' gradient),
  one more with Gemma-2's softcapping. fp32 q/k/v with grouped-query attention send SDPA to
  its math kernel (fp32 S x S scores per head); Gemma-2 runs eager attention. Calibrated on every number of /work/shared/BASELINE.md
  (see tests/test_estimate.py).
* "snugtune": our engine with core/savers.py's savers: 16-bit non-quantized weights, a 2-byte
  residual stream, chunked linear+cross-entropy (no full logits), per-block checkpointing
  (optionally offloaded to CPU), sequence-tiled MLP, O(T) attention. The savers' sizing rules
  (chunk and tile sizes, auto offload) are mirrored here without importing torch; a test
  checks the constants still match core/savers.py.

The peak is the largest of three moments of a step: the end of the forward (the loss's
working set on top of the kept activations), the backward of the last block (all stored block
inputs, that block's recomputed activations, one block's LoRA gradients) and the backward of
the first block (one stored input, all LoRA gradients). Components describe the peak moment
and sum to the total. Every term was checked against the H200 bench
(bench/results/estimate_accuracy.json, 14 configurations x 2 recipes; tests/test_estimate.py
keeps each within 10%) and BASELINE.md; the comments on the constants cite what was measured. Allocator overhead (PyTorch's reserved minus allocated) is its own component;
the CUDA context (outside PyTorch's allocator) is another; paged 8-bit optimizer states live
in CUDA unified memory, outside the allocator but on the card.

Pure Python, no torch: the wizard calls this in-process.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

from core.catalog import ModelSpec
from core.errors import UserError
from core import plan as P
from core.gpu import GpuTarget

GIB = 2**30

# NF4 with double quantization: 4 bits a weight, one uint8 absmax per 64-weight block, and the
# absmaxes' own fp32 scale per 256 blocks (bitsandbytes' defaults: blocksize 64, nested 256).
BYTES_PER_NF4_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# cuBLAS workspace, the RNG state, small buffers: fitted as the constant of BASELINE.md's
# measurements (their intercept at zero tokens sits ~0.03 GiB above weights + adapters).
WORKSPACE_GIB = 0.03
# 8-bit Adam: two uint8 states a parameter + one fp32 absmax per 256-value block for each.
BYTES_ADAM8 = 2 + 2 * 4 / 256
BYTES_ADAM32 = 8

# The engine's rules (chunk and tile sizes, offload, kept blocks, attention path) are decided once,
# in core.plan; the estimate prices the Plan it is given.
ATTN_TILE_ELEMS = P.ATTN_TILE_ELEMS
# A block left un-checkpointed makes the fused 4-bit path keep the double-quantized block scales
# expanded to fp32 (core/savers.py::_QSpec): 4 bytes per 64 weights, 1/8 of the 4-bit weights.
CACHED_SCALE_BYTES = 4 / 64
# The block backward's transients that grow with the row once the MLP is tiled (see estimate()):
# the attention's backward, bytes per q-wide element (the gradient arriving at its output, dq / dk
# / dv for every query head, k and v being repeated to them, and part of the kernel's fp32 dq
# accumulator), and RMSNorm's backward, which computes in fp32 (one 4-byte h-wide temporary).
# Both chosen on fit_truth's measurements (runs 1 and 2, 35 rows at 1-33k tokens, 4-8 GB caps):
# of the (attention, norm) pairs tried, (10, 4) leaves 3 rows outside +-5% and is over the cap at
# every length that ran out of memory there; (12, 0) left 8 rows out, (0, 8) 7 and too long a
# choice, (0, 0) 17 and said "fits" where Qwen2.5-1.5B ran out (bench/results/fit_truth.md).
ATTN_BWD_BYTES = 10
NORM_BWD_BYTES = 4
# core/kernels.py (the fused Triton RMSNorm, SwiGLU / GeGLU and rotary, where Plan.kernels says) keeps
# less for the backward than transformers' modules, and the estimate counts what each keeps:
# * RMSNorm keeps its 16-bit input and 1/rms (4 bytes a row), not an fp32 copy of the input: the two
#   block norms' 2 x 4h become the second norm's 2-byte input (the first one's is the block input,
#   stored anyway), a kept block's 2 x 2h; Qwen3's q/k norms keep the raw 2-byte projections instead of
#   fp32 copies (2 bytes an element less); and its backward writes dx alone, without transformers'
#   fp32 T x h temporary (NORM_BWD_BYTES).
# * SwiGLU / GeGLU keeps gate and up, not the activation's output: one I-wide tensor (of the MLP's four)
#   less per (tile) token.
# * rotary's backward writes dq / dk in one pass where transformers' rotate_half backward holds the
#   products of the gradient with cos and sin and the zero-filled gradients of its two half slices:
#   ROPE_BWD_BYTES fewer a q-wide element in the attention's backward.
# Measured (fit_truth runs 5 and 6: the same plans, one H200, without and with the kernels): the peak
# allocated fell by 13.8-14.0 bytes a token per unit of hidden size on the 12 offloaded long rows of the
# Llama and Qwen2.5 shapes (q = h there: 6h + 4h + 4q = 14h), 17h on Qwen3-1.7B (+2 (q + kv) = 3h).
ROPE_BWD_BYTES = 4

# Plain recipe's allocator overhead with memory to spare (max_memory_reserved - allocated).
# The fp32 cast frees the bf16 copies of the embedding (and head, norms) into the cache, and
# later allocations reuse part of them; the step's large blocks fragment the cache a little.
# Two sets of measurements bound it: BASELINE.md (10 steps in one long-lived process: gaps
# 0.21-1.01 GiB, about the bf16 copies) and the H200 bench (3 steps, a fresh process per
# case: 0.07-0.36 GiB at the loss moment). Half the copies + 0.1 of a token x vocab block
# sits inside +-10% of both. When the peak is a block's backward (long sequences, small
# vocabularies), the large transients there (fp32 attention scores) are allocated and freed
# once a block, and most of one stays cached: SmolLM2-360M at 4,096 tokens, 0.82 GiB above
# allocated with 0.94 GiB score tensors; the same 0.8 of a block as the need below.
PLAIN_COPIES_CACHED = 0.5
PLAIN_FRAGMENT_SHARE = 0.1
# Under memory pressure the caching allocator gives cached blocks back and retries before it
# reports OOM, so the cached bf16 copies are not a need; but near the limit the token x vocab
# blocks fragment what is left: BASELINE.md's 4 GiB runs ran out with 0.36-0.44 GiB still free
# (0.6-1.1 of a block). 0.8 of a block sets the verdict: it never says "fits" at a length that
# ran out there, and says "fits" at the longest lengths that ran within ~15%.
PLAIN_NEED_FRAGMENT_SHARE = 0.8
# snugtune runs with expandable_segments (set by the launcher), which removes most
# fragmentation; what is left is taken as a share of the allocated peak plus a share of the
# largest transient block: what max_memory_reserved shows above allocated with memory to spare
# (`reserved_gib`; the fit_truth and estimate_accuracy rows are compared on it).
SNUG_OVERHEAD_SHARE = 0.05
SNUG_FRAGMENT_SHARE = 0.25
# What a run NEEDS above allocated (the verdict's `allocator_overhead`) is less: the share counts
# only memory that comes and goes each step (activations, loss, LoRA gradients), not the weights,
# adapters and workspace, which are allocated once at load and never freed, so they fragment
# nothing. Measured: reserved - allocated was 0.09-0.17 GiB on all 12 chunked-loss snugtune runs
# of bench/results/estimate_accuracy.json, with no trend over allocated peaks of 0.8-4.1 GiB
# (least-squares slope -0.004), where the 5%-of-everything share grows to 0.2 GiB; and under a
# 3.47 GiB cap every length that trained had an estimated reserved of 3.50-3.64 GiB (the 4 GB
# bisections of bench/results/fit_truth_run1-3.json): the caching allocator gives its cache back
# before it fails. Counting the weights there held auto-fit at 77-83% of the longest length that
# trains for the weight-heavy models (Qwen2.5-3B, Llama-3.2-3B, Gemma-2-2B, 4 GB card); without
# them every 4 GB choice trained in fit_truth run 4 (no out-of-memory run), at 87-95% of the
# longest length that trains, Qwen2.5-3B at 82-85% (bench/results/fit_truth.md).
# With the model's own (unchunked) loss, token x vocab tensors of two sizes (2- and 4-byte
# logits) come and go each step and about one 4-byte block stays unusable even with
# expandable segments: measured 0.37 and 0.66 GiB above allocated with 0.38 GiB blocks
# (StableLM-2 slm-1024 and slm-256-b4 on the H200; the 0.25 share gave 0.10-0.26), i.e.
# 0.6 of a block beside the 5% share.
SNUG_OWN_LOSS_FRAGMENT_SHARE = 0.6

# The chunked loss keeps 10 bytes a logit of one chunk alive, not the 8 the savers size their
# chunks by (fp32 logits 4 + 2-byte matmul output 2 + 2-byte probabilities 2): every loss-phase
# snugtune run of the H200 bench (5 models, 152k/128k/49k vocabularies, all ~33.5M-logit
# chunks) peaked 0.055-0.061 GiB above the 8-byte sum, i.e. one more 2-byte copy of the chunk
# (the probabilities' gradient on its way into the hidden-state gradient matmul).
CE_LIVE_BYTES = 10
# With core/kernels.py's loss tail (CUDA, where the plan runs the kernels; not with softcapping) the
# chunk's log-sum-exp, NLL and logit gradient are one kernel that writes the gradient over the 16-bit
# logits in place: no fp32 copy, no probabilities. What lives of a chunk is the matmul's 2-byte output
# and, as with the PyTorch tail above, one more 2-byte copy on its way into the hidden-state gradient
# matmul: 4 bytes a logit. Measured on loss-bound peaks: real_weights run 6 (Gemma 3 270M, 262k
# vocabulary, 512 tokens x 1 / x 4, all blocks kept) 0.055 / 0.078 GiB above 2 bytes a logit of its
# 33.5M-logit chunk, +1.0 / -1.0% with 4; fit_truth run 8's Llama-3.2-1B 4 GB preset -2.8% with 2, -0.3%
# with 4. gpu_time runs 3 -> 4 (Qwen2.5-1.5B, 1,024 tokens) lowered the peak by 0.17 GiB.
CE_TAIL_LIVE_BYTES = 4
# A model's own loss on 16-bit logits (the engine cannot chunk it, e.g. StableLM): bf16 logits
# held by the output (2), fp32 upcast / log_softmax output / its gradient / the logits'
# gradient (4 + 4 + 4), and the previous step's output, which a training loop written as
# `out = model(...)` (the bench, /work/shared/reference/qlora_probe.py) still references
# while the next forward runs (2): 16 bytes a logit. Measured: slm-1024 snugtune, 3.04 GiB
# allocated where 14 bytes a logit gave 2.89. HF Trainer drops the output, so the engine
# needs up to 2 bytes a logit less: conservative.
OWN_LOSS_BYTES = 16
# Attention scores in the plain recipe. Its q/k/v are fp32 (the upcast residual stream), so
# SDPA cannot use flash attention; with grouped-query attention transformers passes
# enable_gqa, which the memory-efficient kernel refuses, so SDPA falls back to the math
# kernel: fp32 scores B x Hq x S x S. A block keeps one (softmax's output, also matmul's
# input); recomputing it holds scores + softmax output + a 1-byte -inf mask + the masked
# copy (_safe_softmax) = 3.25 at once, and its backward 3. Measured: SmolLM2-360M (15 heads,
# 5 kv) at 4,096 tokens, 5.49 GiB allocated where the O(T) assumption gave 3.89; Qwen3-0.6B
# without checkpointing (B=2 x 512), 1.03 GiB over 28 blocks ~ one fp32 score tensor a block.
# Gemma-2 (attention softcapping) runs eager attention: tanh's output and softmax's output
# are kept (2), 3 live in the recompute.
MATH_ATTN_KEPT, MATH_ATTN_PEAK = 1.0, 3.7
EAGER_ATTN_KEPT, EAGER_ATTN_PEAK = 2.0, 3.0
EAGER_PLAIN = {"gemma2", "gemma3_text"}

# The CUDA context outside PyTorch's allocator: core.plan.context_gib (measured for Hopper).
MEASURED_CONTEXT_GIB = P.MEASURED_CONTEXT_GIB

# Verdict thresholds: "tight" when the headroom is under this share of the budget. On a detected
# card's free memory (shared with a desktop: a browser tab, allocator noise can eat 5%) 5%; on a
# budget given for this run (a profile's memory, gpu.vram_budget_gib: the whole of it is the
# run's) 3%: at the longest lengths that trained under 4 GB caps the estimated allocator peak was
# -0.2% to +8% of the measured one (14 lengths, bench/results/fit_truth.md), so 3% on top keeps
# the margin without giving up a tenth of the length on weight-heavy models.
TIGHT_SHARE = 0.05
TIGHT_SHARE_GIVEN = 0.03
# Specs guessed from a parameter count or an unknown architecture get this extra margin.
INEXACT_MARGIN = 0.25

RECIPES = ("snugtune", "plain")
OPTIMIZERS = P.OPTIMIZERS


@dataclass
class Estimate:
    """The peak memory of one training step, by component (GiB), and the verdict."""

    recipe: str
    model_id: str
    gpu: str
    seq_len: int
    micro_batch: int
    components: dict[str, float]
    total_gib: float
    budget_gib: float
    verdict: str  # "fits" | "tight" | "does not fit"
    headroom_gib: float
    allocated_gib: float  # PyTorch's peak allocated (what torch.cuda.max_memory_allocated reports)
    reserved_gib: float  # PyTorch's peak reserved with memory to spare (max_memory_reserved)
    device_gib: float  # what nvidia-smi would show with memory to spare: reserved + context + paged states
    peak_phase: str  # "loss" (end of forward) or "backward" (first block's backward)
    notes: list[str] = field(default_factory=list)
    knobs: dict = field(default_factory=dict)
    plan: Optional[P.Plan] = field(default=None, repr=False, compare=False)  # what was priced

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "plan"}
        d = json_copy(d)
        d["plan"] = self.plan.to_dict() if self.plan is not None else None
        d["components"] = {k: round(v, 4) for k, v in self.components.items()}
        for k in ("total_gib", "budget_gib", "headroom_gib", "allocated_gib", "reserved_gib", "device_gib"):
            d[k] = round(d[k], 4)
        return d


@dataclass
class FitResult:
    """What autofit chose: the sequence length and micro-batch to use, and the estimate there."""

    max_seq_len: int  # the sequence length to train with: the requested one, or less if it does not fit
    longest_seq_len: int  # the longest sequence that fits at micro-batch 1 (0: nothing fits)
    micro_batch: int
    grad_accum: int
    effective_batch: int
    estimate: Estimate
    fits: bool
    notes: list[str] = field(default_factory=list)
    # when nothing fits: the smallest changes that would, each a sentence
    suggestions: list[str] = field(default_factory=list)
    changed: bool = True  # False: the configuration given already was the best that fits

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "estimate"}
        d = json_copy(d)
        d["estimate"] = self.estimate.to_dict()
        return d


def json_copy(d: dict) -> dict:
    import copy

    return copy.deepcopy(d)


# ---- inputs ----------------------------------------------------------------------------------------

def check_inputs(spec: ModelSpec, cfg, recipe: str = "snugtune") -> None:
    """UserError for numbers that make no sense for this model (the config validates the rest)."""
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    seq = cfg.data.max_seq_len
    if seq <= 0:
        raise UserError(f"sequence length must be positive, got {seq}")
    targeted = spec.targeted(cfg.lora.target_modules)
    if not targeted:
        names = ", ".join(n for n, _, _ in spec.linear_shapes())
        raise UserError(
            f"lora.target_modules {cfg.lora.target_modules!r} matches no linear layer of {spec.id}",
            hint=f"its layers are: {names} (or 'all-linear')",
        )
    narrow = min(min(a, b) for _, a, b in targeted)
    if cfg.lora.r > narrow:
        raise UserError(
            f"LoRA rank {cfg.lora.r} is larger than the narrowest adapted layer of {spec.id} ({narrow} wide)",
            hint=f"use a rank of at most {narrow} (8-64 is usual)",
        )


context_gib = P.context_gib


# ---- the model ---------------------------------------------------------------------------------------

def estimate(
    spec: ModelSpec,
    cfg,
    gpu: GpuTarget,
    recipe: str = "snugtune",
    *,
    plan: Optional[P.Plan] = None,
    ce_chunk_bytes: int = P.CE_CHUNK_BYTES,
    mlp_tile_bytes: int = P.MLP_TILE_BYTES,
    offload: Optional[bool] = None,
    keep_layers: Optional[int] = None,
    chunked_loss: Optional[bool] = None,
    overhead_share: Optional[float] = None,
    calibration: Optional[float] = None,
    loss_tail: Optional[bool] = None,
) -> Estimate:
    """The peak memory of training `spec` with `cfg` on `gpu` under `recipe`: the price of a Plan.

    `plan` is core.plan.plan(cfg, spec, gpu) unless given; its decisions (optimizer, chunk and
    tile sizes, offload, un-checkpointed blocks and their cached block scales) are what is
    priced, so the number is what the engine that executes the same plan needs. Knobs for the
    GPU benchmark's calibration override single decisions: `ce_chunk_bytes` and
    `mlp_tile_bytes` (the savers' working-set sizes), `offload`, `keep_layers` (0 = the need),
    `overhead_share` (allocator overhead), `calibration` (a per-GPU multiplier on the
    allocator's part, from a calibration probe), `loss_tail` (False: the chunked loss's tail in
    PyTorch operations, as engines before core.kernels.ce_tail ran it; for rescoring their runs).
    """
    check_inputs(spec, cfg, recipe)
    if plan is None:
        plan = P.plan(cfg, spec, gpu)
    notes: list[str] = []
    if calibration is None:
        calibration = load_calibration(gpu.name, recipe) if gpu.detected else 1.0
        if calibration != 1.0:
            notes.append(f"calibrated for this card: x{calibration:.3f} (stored by bench/estimate_accuracy.py --calibrate)")
    plain = recipe == "plain"
    cpu = gpu.is_cpu
    seq, B = cfg.data.max_seq_len, cfg.train.micro_batch
    T = seq * B  # tokens in one micro-batch
    h, I, L, V = spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.vocab_size
    q, kv = spec.q_dim, spec.kv_dim
    softcap = spec.final_logit_softcap is not None
    gc_on = cfg.train.gradient_checkpointing
    budget_bytes = int(gpu.budget_gib * GIB)

    # Dtypes: 16-bit compute on GPUs (bf16 or fp16); fp32 on the CPU (core.model does so).
    c = 4 if cpu else 2
    s = 4 if (plain or cpu) else 2  # residual stream: fp32 after the plain recipe's upcast
    if seq > spec.max_position_embeddings:
        notes.append(
            f"sequence {seq} is longer than the model's {spec.max_position_embeddings} positions; "
            "quality degrades past it"
        )

    # -- static: weights, adapters, optimizer ------------------------------------------------------
    wq = spec.params_quantizable * (BYTES_PER_NF4_WEIGHT if cfg.model.load_in_4bit else c)
    other_bytes = 4 if (plain or cpu) else 2  # prepare_model_for_kbit_training's fp32 upcast
    wo = spec.params_other * other_bytes
    n_lora = spec.lora_params(cfg.lora.r, cfg.lora.target_modules)
    adapters = n_lora * 4  # LoRA weights are fp32 in both recipes (peft's autocast_adapter_dtype)
    grads = n_lora * 4
    opt = plan.optimizer
    opt_bytes = n_lora * (BYTES_ADAM32 if opt == "adamw_torch" else BYTES_ADAM8)
    opt_outside = opt == "paged_adamw_8bit" and not cpu  # cudaMallocManaged, not PyTorch's allocator
    workspace = 0 if cpu else WORKSPACE_GIB * GIB
    accum = cfg.train.grad_accum

    # -- activations ---------------------------------------------------------------------------------
    use_offload = False
    host_pinned = 0  # bytes the plan keeps in pinned CPU memory (core.preflight checks them against the RAM)
    tile = T
    gemma3_last_untiled = 0  # the tile transient a Gemma 3 whose last block is global does not add there
    last_store = 0  # what the last block keeps (freed after its backward)
    # Qwen3 / Gemma-3 normalise each head's q and k: the RMSNorm keeps its input upcast to fp32
    # (pow and x * rsqrt save it), 4 bytes per q and k element; its output replaces the raw
    # projection as rope's input, and the weight product saves nothing (frozen weight). Same
    # 4 bytes in both recipes (plain: the raw fp32 projection is kept, plus the norm's output).
    # core/kernels.py where the plan runs it (the snugtune recipe on CUDA, the model's modules patched):
    # `kn` its RMSNorms (not core/bigsavers.py's lean ones; the fp16 guard's are fused too, see below), `kg`
    # its SwiGLU / GeGLU, `kr` its rotary; what each saves is described at ROPE_BWD_BYTES
    kern = bool(plan.kernels) and not plain and not cpu and spec.model_type in P.KERNEL_TYPES
    kn = kern and not plan.lean_norms
    kg = kr = kern
    qk_norm_bytes = T * (c if kn else 4) * (q + kv) if spec.qk_norm else 0
    held_logits = 0  # logits the output object holds through the backward
    # The rotary tables (cos and sin, T x head_dim each, in the compute dtype) live from the forward to the
    # last block's backward (the checkpointed blocks keep them for their recompute). One pair (256-512 bytes
    # a token at head_dim 64-128) is inside the terms fitted on the other models (counted apart, it moved
    # every measured long choice by 0.2-1.3%); Gemma 3 has a second pair (its sliding-window layers' local
    # base beside its global layers' own), of head_dim 256: 1 KiB a token more, 32 MiB at 32,768 tokens.
    rope_tables = 2 * T * spec.head_dim * c if (not plain and spec.model_type in ("gemma3_text", "gemma3")) else 0
    # CUDA-graph steps (core.graphs' static mode) attend through one additive B x 1 x S x S mask in the
    # compute dtype, rows padded to 16 elements, built at the first block and referenced to the end of the
    # backward (core/savers.py::_static_mask); the query-tiled attention builds its masks per tile instead.
    # 8 MiB at 2,048 tokens, 128 MiB at the graphs' limit of 8,192.
    static_mask = (B * seq * (-(-seq // 16) * 16) * c
                   if (not plain and not cpu and plan.cuda_graphs and not plan.tiled_attention) else 0)
    if plain:
        k_layer = T * h * s  # a checkpointed block's input (fp32 stream)
        # One block's saved tensors a token (fp32 stream, bf16 copies that bitsandbytes saves):
        # attention 10h + 14q + 8kv (norm out, 3 bf16 input copies, q/k/v, rope outputs, sdpa
        # output and its reshape, o_proj's bf16 input), MLP 12h + 18I (residual, norm out, 2 bf16
        # copies; gate, up, act, product in fp32 and the product's bf16 copy).
        block = T * (22 * h + 14 * q + 8 * kv + 18 * I) + qk_norm_bytes
        transient = T * (8 * I + 8 * h)  # the block's backward: fp32 grads of gate/up, hidden grads
        score = B * spec.num_heads * seq * seq * 4  # one fp32 attention-score tensor
        # The 14q above includes the math kernel's own fp32 copies, each saved by its matmuls:
        # q x scale, and k x scale and v repeated to all query heads (12q; every GQA model
        # measured takes this path). Eager attention (Gemma-2) repeats k and v (8q: 4q less);
        # full multi-head attention (StableLM-2, SmolLM2-1.7B) runs the memory-efficient
        # kernel on q/k/v as they are (12q less). Measured without checkpointing: StableLM-2
        # (slm-256-b4 plain) 7.48 GiB allocated where keeping the 12q gave 8.25.
        if spec.model_type in EAGER_PLAIN:
            block += EAGER_ATTN_KEPT * score - T * 4 * q
            transient += (EAGER_ATTN_PEAK - EAGER_ATTN_KEPT) * score
        elif spec.num_kv_heads < spec.num_heads:
            block += MATH_ATTN_KEPT * score
            transient += (MATH_ATTN_PEAK - MATH_ATTN_KEPT) * score
        else:
            block -= T * 12 * q
        loss_copies = 4 + (1 if softcap else 0)
        loss_ws = T * V * 4 * loss_copies
        loss_hidden = 2 * T * h * s  # final norm's output and the head's input, kept for backward
        largest_block = T * V * 4
        held_logits = T * V * 4  # the fp32 logits stay referenced by the output during backward
        kept = L * k_layer if gc_on else 0
    else:
        if offload is None:
            use_offload = plan.offload
        else:
            use_offload = bool(offload) and not cpu and gc_on
        # LayerNorm models (StableLM) under autocast: layer_norm runs in fp32 (autocast's fp32
        # list), so each projection reading a norm gets an fp32 input. The engine's fused
        # NF4+LoRA node (core/savers.py::_LoRA4bitLinear) returns its output in the input's
        # dtype, fp32: gate, up and SiLU's output are kept in fp32 (+2 bytes each: +6I a
        # token), and down_proj's fp32 output turns the residual stream fp32 (4-byte block
        # inputs). Each node keeps its own 2-byte copy of the fp32 input (5 x 2h); these take
        # the place of the 2-byte norm outputs the RMSNorm formula counts among its six h-wide
        # inputs (nothing saves LayerNorm's fp32 output itself), so they are not added: with
        # them the one measurement was overestimated by 0.28 GiB. Rope's products with cos/sin
        # save only the frozen cos/sin, so q and k add nothing. Measured without checkpointing
        # (slm-256-b4-r32-nogc-8bit): 6.06 GiB allocated where the RMSNorm formula gave 5.44.
        ln_fp32 = spec.norm == "layer" and not cpu
        if ln_fp32:
            s = 4
        if not cpu and plan.fp16_guard:
            # core/fp16guard.py keeps the residual stream fp32 in fp16 (Gemma 2/3): 4-byte block
            # inputs (+2 L T h kept) and hidden-state copies; attention and MLP stay 2-byte
            s = 4
            notes.append("fp16 guard on (this model's activations overflow fp16): the residual stream is fp32, "
                         f"+{L * T * h * 2 / GIB:.2f} GiB of block inputs")
        k_layer = T * h * s
        kept = 0 if not gc_on else (2 if use_offload else L) * k_layer
        if use_offload:
            notes.append(f"activation offload on: {L * T * h * s / GIB:.2f} GiB of block inputs in pinned CPU memory")
            host_pinned += L * T * h * s
        if gc_on:
            tm = P.mlp_tile_tokens(I, B, mlp_tile_bytes) * B
            # the savers tile rows of two tiles' worth and more (tiled_mlp_forward: T >= 2 x tile);
            # `> 2 x tm` here once priced SmolLM2 at exactly 8,192 tokens untiled (+9% over measured)
            tile = tm if T >= 2 * tm else T
        # One block's saved tensors a token, counted with saved_tensors_hooks on the engine's
        # path (16-bit weights, LoRA under autocast as the Trainer runs it): the RMSNorms' fp32
        # internals 2 x 4h, six h-wide projection inputs, q and attention output, k and v, and
        # the MLP's gate, up, act and product: 8h + s(6h + 2q + 2kv) + 4I s (tiled: per tile).
        # (with core/kernels.py's norms the 8h is the second norm's 2-byte input; with its GLU 3 I-wide)
        block = (T * ((c * h if kn else 8 * h) + c * (6 * h + 2 * q + 2 * kv)) + tile * (3 if kg else 4) * I * c
                 + qk_norm_bytes)
        if kn and plan.fp16_guard:
            # core/fp16guard.py's norms run as the fused kernel too (session 7): the post-norms keep their
            # fp16 inputs and the q/k norms theirs, as in bf16, but the pre-MLP norm reads the fp32 stream
            # and keeps it: 4 bytes an element where bf16 keeps 2 (the first norm's is the block input,
            # counted in k_layer).
            block += T * h * (s - c)
        if ln_fp32:
            block += tile * 6 * I
        # The MLP's backward: of gate, up, act and product (in `block`), the product is freed
        # once down_proj's backward has used it, while the gradients of product, act and up
        # exist: 3 + 3 I-wide tensors at most, i.e. 2 above the block's 4 (the hidden-state
        # gradients 2h s beside them). Measured: with 4 (the old count) every backward-peaked
        # H200 run was overestimated, by up to 10% (l1-512-b4-r64).
        transient = tile * 2 * I * (4 if ln_fp32 else c) + T * 2 * h * s
        # The attention's backward comes after the MLP's (whose tensors are freed by then), so the
        # larger of the two counts; the MLP's wins at 1-4k tokens, and once it is tiled it stops
        # growing while the attention's (ATTN_BWD_BYTES a q-wide element) does. Beside either,
        # RMSNorm's fp32 backward temporary (NORM_BWD_BYTES an h-wide element). Without them
        # auto-fit's 30,848 tokens for Qwen2.5-1.5B and 25,408 for Llama-3.2-1B on a 4 GB card
        # ran out of memory (fit_truth run 1).
        attn_bytes = ATTN_BWD_BYTES - (ROPE_BWD_BYTES if kr else 0)
        norm_bwd = 0 if kn else NORM_BWD_BYTES
        attn_bwd = T * q * attn_bytes
        if plan.tiled_attention:
            # fp32 scores + 2-byte copies of one query tile (core/savers.py::_tiled_attention), during
            # the attention's backward (the MLP's are gone by then: the larger counts, not the sum;
            # the sum put Gemma-2-2B 5-8% over at 2.5-5k tokens under a 4 GB cap). A tile holds
            # ATTN_TILE_ELEMS scores for EACH of the B rows (its query count ignores B): measured on
            # Gemma 3 270M at 2,048 tokens x 4 rows, 1.81 GiB allocated where one tile for all rows
            # gave 1.15 (bench/results/real_weights.json).
            seq_len = T // max(B, 1)
            attn_bwd += max(B, 1) * min(spec.num_heads * seq_len * seq_len, ATTN_TILE_ELEMS) * 12
        # The attention's backward comes after the MLP's: the MLP's saved tensors (per tile: gate, up,
        # act and product, `block`'s tile term) are freed by then, and beside the attention's
        # transients exist the gradient arriving at the block's output and the one it passes on (2 h
        # wide). Counted as if the MLP's store lived on, long rows (attention-bound) were priced ~0.2 GiB
        # high at zero length and 2.5-3.3 h bytes a token low in slope (fit_truth runs 5 and 6, 4/6/8
        # GB rows of Llama-3.2-1B/3B and Qwen2.5-1.5B), under the measured peak past the lengths measured.
        # Not for the query-tiled attention (Gemma-2/3): their four norms a block (the two after the
        # attention keep fp32 copies `block` does not count) and the tiles' own copies are not separated,
        # and their count stays the one fitted on Gemma-2-2B's 4 GB bisections (runs 1-4): this rule
        # called 5,440 tokens "fits" there, which ran out of memory.
        mlp_store = tile * (3 if kg else 4) * I * c + (tile * 6 * I if ln_fp32 else 0)
        attn_side = 0 if plan.tiled_attention else T * 2 * h * s - mlp_store
        untiled = max(transient, T * q * attn_bytes + attn_side) + T * h * norm_bwd  # a block without the tile
        transient = max(transient, attn_bwd + attn_side) + T * h * norm_bwd
        if plan.tiled_attention and spec.model_type in ("gemma3_text", "gemma3") and L % 6 == 0:
            # Gemma 3 (helper 10's local edit): every 6th block attends globally (SDPA, no score
            # tile), so with L a multiple of 6 (270M: 18, 12B: 48) the last block is one: the
            # backward's first tiled block runs once the last block's store is freed (below)
            gemma3_last_untiled = transient - untiled
        if gc_on and not plan.tiled_attention and spec.num_kv_heads < spec.num_heads:
            # (without checkpointing the calibrated count already runs 6.5% over: not added there)
            # SDPA gets k and v repeated to every query head (core/savers.py::_repeat_kv): the
            # recomputed block saves those copies, 2 x (q - kv) more than the kv-wide k and v
            block += T * 2 * (q - kv) * c
        use_chunks = plan.chunked_loss if chunked_loss is None else chunked_loss
        if cfg.train.chunked_loss and not plan.chunked_loss:
            notes.append(f"{spec.model_type}: the engine cannot chunk this model's loss; full logits are materialised")
        if use_chunks:
            chunk = P.ce_chunk_tokens(V, softcap, budget_bytes if not cpu else None, ce_chunk_bytes)
            # core.kernels.ce_tail (savers.CE_TAIL); not core/bigsavers.py's loss over an 8-bit head, its own
            tail = kern and not softcap and not plan.head_8bit and loss_tail is not False
            per_logit = CE_TAIL_LIVE_BYTES if tail else CE_LIVE_BYTES + (4 if softcap else 0)
            loss_ws = min(chunk, T) * V * per_logit
            loss_hidden = 3 * T * h * s  # hidden-state gradient kept + selected rows + final norm out
            largest_block = min(chunk, T) * V * (2 if tail else 8)  # (tail: its largest tensor, 2 bytes a logit)
        else:
            loss_ws = T * V * (OWN_LOSS_BYTES + (4 if softcap else 0))
            loss_hidden = 2 * T * h * s
            largest_block = T * V * 4
            held_logits = T * V * 2  # the 16-bit logits stay referenced by the output during backward
            if cfg.train.chunked_loss is False or chunked_loss is False:
                notes.append("chunked loss off: the full logits are materialised (the largest cost at big vocabularies)")
        if keep_layers is None:
            keep_layers = plan.keep_blocks if gc_on else 0
        if keep_layers and gc_on:
            # an un-checkpointed block keeps its activations instead of its input alone
            # An un-checkpointed block keeps what its recompute would hold, less: its input (kept
            # anyway), a tiled MLP's intermediates (_TiledMLP keeps only its input) and, on the fused
            # 4-bit path, the 3 h-wide inputs that q/k/v and gate/up share (one tensor each, not
            # one per projection). Measured with 8-28 kept blocks at 1,024 tokens (fit_truth run
            # 1, preset rows): the full count was 3 h x 2 bytes a token a block too high.
            # (the fp16 guard's block input is fp32 where `block` counts a 2-byte one: an extra 2 h)
            per_kept = block - T * h * (c if plan.fp16_guard else s) - (tile * (3 if kg else 4) * I * c
                                                                         if tile < T else 0)
            # With the kernels a kept block keeps what a recomputed one would (`block` counts them). Measured:
            # the 4 GB presets of fit_truth run 7 (1,024 tokens, 10-18 kept blocks, CUDA-graph steps) were
            # 11-15% under the kernels-off count and are -1.0..+1.0% allocated with this one (rescored with
            # the loss as run 7's engine ran it); bench/gpu_time.py runs 3 and 4 (Qwen2.5-1.5B, 14 kept of
            # 28 at 1,024 tokens, normal and graph steps) -1.9..-0.4%; then fit_truth runs 8 / 8b's 11 presets
            # (16-26 kept) -0.4..+1.6%.
            if cfg.model.load_in_4bit and spec.norms_per_layer == 2:  # Gemma's post-norms keep theirs
                per_kept -= T * 3 * h * c
            # (CUDA-graph steps: run 7's engine built a boolean mask in each block's attention, which SDPA
            # converted and saved: SmolLM2-1.7B at 8,192 tokens with 11 kept blocks held 64-128 MiB a kept
            # block beyond the count. One mask a micro-batch, shared, `static_mask` above, since: run 8 measured
            # the same row with 10 kept at 4.75 GiB allocated, where run 7's 11 took 6.22.)
            kept += keep_layers * per_kept
            last_store = per_kept  # the last blocks are the un-checkpointed ones
            if cfg.model.load_in_4bit and not cpu:
                wq += spec.params_quantizable * CACHED_SCALE_BYTES  # expanded block scales (fused path)
                notes.append(f"{keep_layers} of {L} blocks run un-checkpointed (spare memory, no recompute): "
                             "their activations are counted here")
    if not plain and not cpu and (plan.cpu_embedding or plan.head_8bit):
        # core/bigsavers.py, as the plan decided (7-9B models on small cards): the embedding's V x h
        # 16-bit weight in pinned CPU memory (its T rows come over each step: the same T x h output);
        # the frozen head as int8 rows + an fp32 scale a row, its 16-bit weight off the card, and the
        # loss's working set per token chunk: one dequantized tile of rows (2 bytes), the chunk's fp32
        # hidden-gradient accumulator and its hidden rows, beside the same chunk x vocab of logits.
        emb16 = V * h * 2
        wo -= emb16 * (int(plan.cpu_embedding) + int(plan.head_8bit and not spec.tie_word_embeddings))
        if plan.head_8bit:
            wo += V * h + V * 4
            qc, vt = P.head_tiles(V, h, plan.ce_chunk_tokens or 32)
            loss_ws += vt * h * 2 + min(qc, T) * h * (4 + 2)
        if plan.lean_norms and gc_on:
            # core/bigsavers.py's RMSNorm: a recomputed block's two norms keep 2 h bytes a token (the
            # second's 16-bit input) where they kept 8 h (fp32 copies); 1/rms is 4 bytes a token each;
            # their outputs (2 x 2 h, among the six h-wide inputs above) are rebuilt for their
            # consumers' backward, not kept; their backward runs in row slices, so the norm's fp32
            # T x h temporary (NORM_BWD_BYTES) is gone, the rebuilt output (2 h) in its place
            lean = T * (10 * h - 8)
            block -= lean
            kept -= (keep_layers or 0) * lean
            transient -= T * h * (NORM_BWD_BYTES - c)
        if plan.cpu_embedding or plan.head_8bit:
            host = emb16 * (int(plan.cpu_embedding) + int(plan.head_8bit and not spec.tie_word_embeddings))
            host_pinned += host
            notes.append(f"the 16-bit embedding{' and head' if host > emb16 else ''} in CPU memory while training: "
                         f"{host / GIB:.2f} GiB of host RAM")
    largest_bwd = tile * I * s  # the backward's largest transient: an MLP tensor, or a score tensor
    if plain and (spec.model_type in EAGER_PLAIN or spec.num_kv_heads < spec.num_heads):
        largest_bwd = max(largest_bwd, score)
    largest_block = max(largest_block, largest_bwd)

    # The backward walks the blocks from the last to the first: at block j's backward the
    # stored activations of blocks 0..j remain and the LoRA gradients of blocks j..L-1 exist.
    # Both are linear in j, so the worst is one end: the last block (everything stored, one
    # block's gradients) or the first (one block's store, all gradients). With gradient
    # accumulation all gradients exist from the second micro-batch on.
    if not gc_on:
        # Every block keeps all its activations until the backward reaches it.
        kept = L * block
        block_phase_act = transient
        per_block_store = block
        notes.append("gradient checkpointing off: every block keeps its activations (fast, memory-hungry)")
    else:
        # with every block kept nothing is recomputed: the backward adds no block's activations
        # on top of the kept ones (real_weights run 3: Gemma 3 270M at 2,048 x 4, 18 of 18 kept,
        # +10.1% reserved with the recompute counted, +5.4% without)
        block_phase_act = (0 if (keep_layers or 0) >= L else block) + transient
        per_block_store = kept if use_offload else k_layer  # offload: ~2 inputs on the card throughout
    if accum > 1:
        store_g = (kept, grads)
    else:
        # (Gemma 3 with a global last block: the largest of its last block's backward and the next
        # one's, whose score tile sits beside one block's store fewer; real_weights run 4, 2,048 x 4
        # with all 18 blocks kept: +3.3% allocated / +5.3% reserved counted beside all 18)
        last_end = (kept - min(gemma3_last_untiled, last_store + k_layer) if gc_on else kept, grads / L)
        first_end = (per_block_store + (kept - L * k_layer if (gc_on and keep_layers) else 0), grads)
        store_g = max(last_end, first_end, key=sum)

    loss_phase = {
        "activations": kept + loss_hidden + rope_tables + static_mask,
        "logits": loss_ws,
        "gradients": grads if accum > 1 else 0,  # zeroed (set to None) after each optimizer step
    }
    block_phase = {"activations": store_g[0] + block_phase_act + rope_tables + static_mask, "logits": held_logits,
                   "gradients": store_g[1]}
    phase_name, phase = max(
        (("loss", loss_phase), ("backward", block_phase)), key=lambda kv_: sum(kv_[1].values())
    )

    comp_bytes: dict[str, float] = {
        "weights": wq + wo,
        "adapters": adapters,
        "gradients": phase["gradients"],
        "optimizer": opt_bytes,
        "activations": phase["activations"],
        "logits": phase["logits"],
        "workspace": workspace,
    }
    allocated = sum(v for k, v in comp_bytes.items() if not (k == "optimizer" and opt_outside))
    allocated *= calibration
    # Allocator overhead: `cached` is what max_memory_reserved shows above allocated when memory
    # is plentiful; `overhead` is the part a run needs even under pressure (the verdict's).
    if cpu:
        overhead = cached = 0.0
    elif plain:
        if phase_name == "loss":
            share = PLAIN_FRAGMENT_SHARE if overhead_share is None else overhead_share
            cached = PLAIN_COPIES_CACHED * spec.params_other * 2 + share * T * V * 4
        else:
            share = PLAIN_NEED_FRAGMENT_SHARE if overhead_share is None else overhead_share
            cached = PLAIN_COPIES_CACHED * spec.params_other * 2 + share * largest_bwd
        overhead = PLAIN_NEED_FRAGMENT_SHARE * largest_block
    else:
        share = SNUG_OVERHEAD_SHARE if overhead_share is None else overhead_share
        frag = SNUG_FRAGMENT_SHARE if use_chunks else SNUG_OWN_LOSS_FRAGMENT_SHARE
        cached = share * allocated + frag * largest_block
        static = (wq + wo + adapters + workspace + (0 if opt_outside else opt_bytes)) * calibration
        overhead = share * max(allocated - static, 0.0) + frag * largest_block  # the need (see above)
    comp_bytes["allocator_overhead"] = overhead
    comp_bytes["cuda_context"] = 0 if cpu else context_gib(gpu) * GIB
    if calibration != 1.0:
        for k in ("weights", "adapters", "gradients", "activations", "logits", "workspace"):
            comp_bytes[k] *= calibration
        if not opt_outside:
            comp_bytes["optimizer"] *= calibration
    if not spec.exact:
        body = sum(comp_bytes.values()) - comp_bytes["cuda_context"]
        comp_bytes["margin"] = INEXACT_MARGIN * body
        notes.append(f"{spec.note or 'the shape is approximate'}; +{int(INEXACT_MARGIN * 100)}% margin added")
    if opt_outside:
        notes.append("paged 8-bit AdamW states live in CUDA unified memory (outside PyTorch's allocator)")
    if cpu:
        notes.append("CPU target: budget is the available RAM; training runs in fp32 and is slow")

    # With memory to spare the allocator keeps `cached` above allocated; under the plan's cap it
    # gives cache back before it fails, so max_memory_reserved stays at the cap while the run
    # needs less than it (4 GB bisections: every length that trained peaked at 3.35-3.47 GiB
    # reserved under a 3.47 GiB cap, bench/results/fit_truth_run3.json and _run4.json).
    reserved = allocated + cached
    if not cpu and not plain and plan.allocator_cap_gib:
        reserved = min(reserved, max(allocated + overhead, plan.allocator_cap_gib * GIB))
    components = {k: v / GIB for k, v in comp_bytes.items()}
    total = sum(components.values())
    budget = gpu.budget_gib
    headroom = budget - total
    # Paged optimizer states are CUDA managed memory: the driver moves them to host memory under
    # pressure instead of failing, so they are shown in the total but are not part of the limit.
    hard = total - (components["optimizer"] if opt_outside else 0.0)
    share = TIGHT_SHARE if gpu.budget_source == "free" else TIGHT_SHARE_GIVEN
    if hard > budget:
        verdict = "does not fit"
    elif budget - hard < share * budget or headroom < 0:
        verdict = "tight"
    else:
        verdict = "fits"
    return Estimate(
        recipe=recipe,
        model_id=spec.id,
        gpu=gpu.name,
        seq_len=seq,
        micro_batch=B,
        components=components,
        total_gib=total,
        budget_gib=budget,
        verdict=verdict,
        headroom_gib=headroom,
        allocated_gib=allocated / GIB,
        reserved_gib=reserved / GIB,
        # NVML's per-process number: the allocator's reserve and the context. Paged optimizer
        # states (cudaMallocManaged) are not in it: the plain recipe's outside-allocator memory
        # measured 0.725 GiB with paged 8-bit AdamW and with torch's AdamW alike.
        device_gib=reserved / GIB + comp_bytes["cuda_context"] / GIB
        + (comp_bytes.get("margin", 0.0) / GIB),
        peak_phase=phase_name,
        notes=notes,
        plan=plan,
        knobs={
            "offload": use_offload,
            "mlp_tile_tokens": tile if (not plain and tile < T) else None,
            "ce_chunk_tokens": None if plain else (
                P.ce_chunk_tokens(V, softcap, budget_bytes if not cpu else None, ce_chunk_bytes)
            ),
            "optimizer": opt,
            "keep_layers": keep_layers or 0,
            "host_pinned_gib": round(host_pinned / GIB, 3),
        },
    )


# ---- per-card calibration ------------------------------------------------------------------------
# A short probe on the user's card (bench/estimate_accuracy.py --calibrate) measures a few real
# peaks and stores measured/estimated for PyTorch's part of the memory, per GPU name and recipe.
# Clamped: a factor outside 0.8-1.5 means something else went wrong (another process, a driver
# quirk), and the uncalibrated estimate is the safer one.
CALIBRATION_RANGE = (0.8, 1.5)
_cal_cache: dict = {}


def calibration_file():
    from core.presets import config_dir  # light (platformdirs only)

    return config_dir() / "calibration.json"


def _read_calibrations() -> dict:
    path = calibration_file()
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    hit = _cal_cache.get(str(path))
    if hit and hit[0] == mtime:
        return hit[1]
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    _cal_cache[str(path)] = (mtime, data)
    return data


def load_calibration(gpu_name: str, recipe: str = "snugtune") -> float:
    """The stored correction for this card and recipe (1.0 when none)."""
    entry = _read_calibrations().get(gpu_name, {}).get(recipe)
    if not isinstance(entry, dict) or not isinstance(entry.get("factor"), (int, float)):
        return 1.0
    lo, hi = CALIBRATION_RANGE
    f = float(entry["factor"])
    return f if lo <= f <= hi else 1.0


def save_calibration(gpu_name: str, recipe: str, factor: float, samples: list[dict] | None = None):
    """Store measured/estimated for a card; written atomically next to the user's presets."""
    import json
    import time

    lo, hi = CALIBRATION_RANGE
    if not lo <= factor <= hi:
        raise UserError(f"calibration factor {factor:.3f} is outside {lo}-{hi}; not stored",
                        hint="close other programs using the GPU and run the probe again")
    path = calibration_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(_read_calibrations())
    data.setdefault(gpu_name, {})[recipe] = {"factor": round(factor, 4), "time": int(time.time()),
                                             "samples": samples or []}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(path)
    return path


# ---- time ----------------------------------------------------------------------------------------------

# Share of the card's peak fp16 throughput a QLoRA step reaches: small models are bound by
# kernel launches and 4-bit dequantisation, not arithmetic (BASELINE.md: an H200 runs the
# plain recipe at ~1-6k tokens/s). Rough on purpose: "time per epoch" to the nearest factor ~1.5.
MFU = 0.25
# Host time per launched kernel in an eager step (Python, autograd, dispatch): measured on the
# H200's host, ~220 ms of a 270 ms Qwen2.5-1.5B step over 28 blocks x 3 passes (bench run 2).
KERNEL_OVERHEAD_S = 40e-6
KERNELS_PER_BLOCK = 60  # forward of one block with LoRA on 7 projections (plus recompute, backward)
# CUDA-graph steps replay a micro-batch in one launch; what stays on the host is the optimizer:
# ~30 us per adapter tensor.
OPTIMIZER_HOST_S_PER_TENSOR = 30e-6
# Offloaded block inputs cross PCIe twice a micro-batch (to pinned host memory and back). The
# copies run on a side stream, but a consumer card's PCIe 3/4 x16 moves ~12 GB/s in practice, and
# counting them in full is what keeps auto-fit from trading a fitting setting for a slower one.
PCIE_GBS = 12.0


def estimate_step_time(spec: ModelSpec, cfg, gpu: GpuTarget, plan: Optional[P.Plan] = None) -> float:
    """Rough seconds per optimizer step (micro_batch x grad_accum sequences), from the profile's
    fp16 throughput and memory bandwidth, for the plan's decisions (CUDA graphs, offload, kept
    blocks). Good for "about how long per epoch" and for comparing two settings, not more."""
    plan = plan or P.plan(cfg, spec, gpu)
    seq, B, accum = cfg.data.max_seq_len, cfg.train.micro_batch, cfg.train.grad_accum
    T = seq * B
    L = spec.num_layers
    # forward, (recompute of the checkpointed blocks), backward-for-input
    recompute = (L - plan.keep_blocks) / L if cfg.train.gradient_checkpointing else 0.0
    passes = 2 + recompute
    linear = spec.params_quantizable + spec.vocab_size * spec.hidden_size
    flops = 2 * linear * T * passes + 4 * L * T * T * spec.q_dim * passes / 2  # causal attention
    flops += 6 * spec.lora_params(cfg.lora.r, cfg.lora.target_modules) * T
    compute_s = flops / (gpu.fp16_tflops * 1e12 * MFU)
    # every pass dequantises the 4-bit weights: read 0.5 B + write/read 2 B a weight
    mem_s = spec.params_quantizable * 4.5 * passes / (gpu.bandwidth_gbs * 1e9)
    offload_s = (2 * L * T * spec.hidden_size * 2 / (PCIE_GBS * 1e9)) if plan.offload else 0.0
    targets = cfg.lora.target_modules
    per_layer = 7 if isinstance(targets, str) else len(targets)
    optimizer_s = OPTIMIZER_HOST_S_PER_TENSOR * 2 * per_layer * L
    if plan.cuda_graphs:
        return accum * (compute_s + mem_s + offload_s) + optimizer_s
    launch_s = KERNEL_OVERHEAD_S * KERNELS_PER_BLOCK * L * passes
    return accum * (compute_s + mem_s + launch_s + offload_s) + optimizer_s


# ---- auto-fit ----------------------------------------------------------------------------------------

def _with(cfg, seq: int | None = None, micro_batch: int | None = None, grad_accum: int | None = None):
    return P.with_batch(cfg, seq, micro_batch, grad_accum)


SEQ_STEP = 64  # sequence lengths are searched in multiples of 64 (tensor-core friendly)


def position_limit(spec: ModelSpec) -> int:
    """The longest row the model's positions allow."""
    return int(spec.max_position_embeddings)


def longest_seq(spec: ModelSpec, cfg, gpu: GpuTarget, recipe: str = "snugtune", micro_batch: int = 1,
                limit: int | None = None, **knobs) -> int:
    """The longest sequence (multiple of 64, at most `limit`, else the model's positions) whose
    estimate says "fits"; 0 if not even 64 does."""
    hi_cap = limit or position_limit(spec)

    def ok(n: int) -> bool:
        return estimate(spec, _with(cfg, n, micro_batch), gpu, recipe, **knobs).verdict == "fits"

    if hi_cap < SEQ_STEP:
        return hi_cap if ok(hi_cap) else 0
    if not ok(SEQ_STEP):
        return 0
    if ok(hi_cap):
        return hi_cap
    lo, hi = 1, hi_cap // SEQ_STEP + 1  # in units of SEQ_STEP; memory grows monotonically with length
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid * SEQ_STEP <= hi_cap and ok(mid * SEQ_STEP):
            lo = mid
        else:
            hi = mid
    return lo * SEQ_STEP


def _seconds_per_sequence(spec, cfg, gpu, recipe, **knobs) -> float:
    c = cfg
    return estimate_step_time(spec, c, gpu) / (c.train.micro_batch * c.train.grad_accum)


def autofit(spec: ModelSpec, cfg, gpu: GpuTarget, recipe: str = "snugtune", **knobs) -> FitResult:
    """The configuration to train with on this card: the one given when it fits, else the
    longest sequence that fits; then the micro-batch that is fastest by the estimate.

    * The sequence never exceeds the model's position limit (max_position_embeddings).
    * A configuration that already fits keeps its sequence length; another micro-batch is
      taken only when it is strictly faster by estimate_step_time (which counts offload's
      PCIe copies and CUDA-graph steps), never just because it fits.
    * Gradient accumulation keeps the effective batch (ceil: it never shrinks).
    * When nothing fits, `suggestions` says the smallest changes that would.
    """
    check_inputs(spec, cfg, recipe)
    notes: list[str] = []
    limit = position_limit(spec)
    want_seq = cfg.data.max_seq_len
    if want_seq > limit:
        notes.append(f"sequence capped at the model's {limit} positions (asked {want_seq})")
        want_seq = limit
    eff = cfg.train.micro_batch * cfg.train.grad_accum
    given = _with(cfg, want_seq)
    given_est = estimate(spec, given, gpu, recipe, **knobs)
    if given_est.verdict == "fits":
        seq = want_seq
        longest = longest_seq(spec, cfg, gpu, recipe, 1, limit=limit, **knobs)
        start_mb = cfg.train.micro_batch
    else:
        longest = longest_seq(spec, cfg, gpu, recipe, 1, limit=limit, **knobs)
        if longest == 0:
            tiny = min(SEQ_STEP, want_seq)
            est = estimate(spec, _with(cfg, tiny, 1, eff), gpu, recipe, **knobs)
            return FitResult(tiny, 0, 1, eff, eff, est, False,
                             notes + [f"nothing fits, not even {tiny} tokens at micro-batch 1 "
                                      f"({est.total_gib:.2f} of {est.budget_gib:.2f} GiB)"],
                             suggestions=suggest(spec, cfg, gpu, recipe))
        seq = min(want_seq, longest)
        start_mb = 1
        if seq < want_seq:
            notes.append(f"sequence shortened from {want_seq} to {seq} tokens to fit")
    # micro-batches that fit at this length, up to the effective batch
    options = []
    mb = 1
    while mb <= eff:
        c = _with(cfg, seq, mb, math.ceil(eff / mb))
        if estimate(spec, c, gpu, recipe, **knobs).verdict == "fits":
            options.append(mb)
        else:
            break
        mb *= 2
    if start_mb not in options and start_mb <= eff:
        c = _with(cfg, seq, start_mb, math.ceil(eff / start_mb))
        if estimate(spec, c, gpu, recipe, **knobs).verdict == "fits":
            options.append(start_mb)
    if not options:
        options = [1]
    best = start_mb if start_mb in options else options[0]
    best_t = _seconds_per_sequence(spec, _with(cfg, seq, best, math.ceil(eff / best)), gpu, recipe)
    for mb in options:
        t = _seconds_per_sequence(spec, _with(cfg, seq, mb, math.ceil(eff / mb)), gpu, recipe)
        if t < best_t * 0.98:  # strictly better: 2% is under the time model's resolution
            best, best_t = mb, t
    mb = best
    accum = math.ceil(eff / mb) if mb != cfg.train.micro_batch or seq != cfg.data.max_seq_len else cfg.train.grad_accum
    final = _with(cfg, seq, mb, accum)
    est = estimate(spec, final, gpu, recipe, **knobs)
    if mb * accum != eff:
        notes.append(f"effective batch {mb * accum} (was {eff}): {mb} x {accum}")
    changed = (seq, mb, accum) != (cfg.data.max_seq_len, cfg.train.micro_batch, cfg.train.grad_accum)
    if not changed:
        notes.append("the settings already fit and nothing is faster by the estimate; nothing changed")
    elif mb != cfg.train.micro_batch:
        notes.append(f"micro-batch {mb} (was {cfg.train.micro_batch}): faster by the estimate "
                     f"({best_t * mb * accum:.2f} s a step)")
    return FitResult(seq, longest, mb, accum, mb * accum, est, True, notes, changed=changed)


def suggest(spec: ModelSpec, cfg, gpu: GpuTarget, recipe: str = "snugtune") -> list[str]:
    """The smallest changes that make a configuration fit this card, one sentence each.

    Tried at the shortest useful length (1,024 tokens, or the asked one if shorter): a smaller
    LoRA rank, gradient checkpointing / offload when they are off, a smaller catalog model of
    the same family, and the budget it would need as it is."""
    out: list[str] = []
    seq = min(cfg.data.max_seq_len, 1024, position_limit(spec))
    base = _with(cfg, seq, 1)

    def fits(c, s=spec) -> bool:
        try:
            return estimate(s, c, gpu, recipe).verdict == "fits"
        except UserError:
            return False

    r = cfg.lora.r
    while r > 1:
        r //= 2
        c = base.model_copy(update={"lora": cfg.lora.model_copy(update={"r": r, "alpha": cfg.lora.alpha * r / cfg.lora.r})})
        if fits(c):
            out.append(f"a smaller LoRA rank: lora.r = {r} fits at {seq} tokens")
            break
    if not cfg.train.gradient_checkpointing:
        c = base.model_copy(update={"train": base.train.model_copy(update={"gradient_checkpointing": True})})
        if fits(c):
            out.append(f"gradient checkpointing on: fits at {seq} tokens")
    if cfg.train.offload_activations == "off":
        c = base.model_copy(update={"train": base.train.model_copy(update={"offload_activations": "auto"})})
        if fits(c):
            out.append(f"activation offload 'auto': fits at {seq} tokens")
    from core.catalog import builtin_catalog

    smaller = sorted((s for s in builtin_catalog()
                      if s.params_total < spec.params_total and s.exact and s.source == "catalog"),
                     key=lambda s: (s.model_type != spec.model_type, -s.params_total))  # same family first
    for s in smaller:
        if fits(base, s):
            out.append(f"a smaller model: {s.id} ({s.size_label}) fits at {seq} tokens")
            break
    need = estimate(spec, base, gpu, recipe).total_gib
    out.append(f"a larger budget: about {need / (1 - TIGHT_SHARE):.2f} GiB for {seq} tokens as configured")
    return out


def fit_for(spec: ModelSpec, cfg, gpu: GpuTarget, from_full_context: bool = False) -> FitResult:
    """The one auto-fit the CLI (`snugtune estimate --autofit`) and the wizard (ctrl+f) call.
    `from_full_context`: start from the model's whole position range instead of cfg's length."""
    if from_full_context:
        cfg = _with(cfg, position_limit(spec))
    return autofit(spec, cfg, gpu)


# ---- presentation ----------------------------------------------------------------------------------

COMPONENT_LABELS = {
    "weights": "weights (4-bit + 16-bit)",
    "adapters": "LoRA adapters (fp32)",
    "gradients": "LoRA gradients",
    "optimizer": "optimizer states",
    "activations": "activations",
    "logits": "logits and loss",
    "workspace": "cuBLAS workspace etc.",
    "allocator_overhead": "allocator overhead",
    "cuda_context": "CUDA context",
    "margin": "uncertainty margin",
}


def format_table(est: Estimate, other: Optional[Estimate] = None) -> str:
    lines = [
        f"{est.model_id} on {est.gpu}: {est.seq_len} tokens x {est.micro_batch}, recipe {est.recipe}",
        "",
    ]
    width = max(len(v) for v in COMPONENT_LABELS.values())
    for k, v in est.components.items():
        lines.append(f"  {COMPONENT_LABELS.get(k, k):<{width}}  {v:7.2f} GiB")
    lines.append(f"  {'-' * width}  -----------")
    lines.append(f"  {'total (peak)':<{width}}  {est.total_gib:7.2f} GiB")
    lines.append(f"  {'budget':<{width}}  {est.budget_gib:7.2f} GiB")
    sign = "+" if est.headroom_gib >= 0 else "-"
    lines.append("")
    lines.append(f"verdict: {est.verdict.upper()} (headroom {sign}{abs(est.headroom_gib):.2f} GiB)")
    if other is not None:
        diff = other.total_gib - est.total_gib
        word = "more" if diff > 0 else "less"
        lines.append(
            f"the {other.recipe} recipe would need {other.total_gib:.2f} GiB ({abs(diff):.2f} GiB {word}): {other.verdict}"
        )
    for n in est.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def fit_badge(spec: ModelSpec, cfg, gpu: GpuTarget, recipe: str = "snugtune") -> str:
    """A short label for lists: 'fits', 'tight', 'no', or '?' when it cannot be estimated."""
    try:
        est = estimate(spec, cfg, gpu, recipe)
    except UserError:
        return "?"
    return {"fits": "fits", "tight": "tight", "does not fit": "no"}[est.verdict]
