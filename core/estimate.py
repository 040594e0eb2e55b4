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
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from core.catalog import ModelSpec
from core.errors import UserError
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

# Mirrors of core/savers.py (kept in sync by tests/test_estimate.py::test_savers_constants_match).
CE_CHUNK_BYTES = 256 * 2**20
MLP_TILE_BYTES = 256 * 2**20
AUTO_OFFLOAD_SHARE = 0.10
ATTN_TILE_ELEMS = 2**24  # query-tiled attention (softcapping, sliding windows): one score tile
CHUNKABLE = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "smollm3"}
TILED_ATTENTION = {"gemma2", "gemma3_text"}  # attention softcapping / sliding windows: SDPA cannot

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
# largest transient block. Conservative until the GPU bench calibrates it.
SNUG_OVERHEAD_SHARE = 0.05
SNUG_FRAGMENT_SHARE = 0.25
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
MATH_ATTN_KEPT, MATH_ATTN_PEAK = 1.0, 3.25
EAGER_ATTN_KEPT, EAGER_ATTN_PEAK = 2.0, 3.0
EAGER_PLAIN = {"gemma2", "gemma3_text"}

# Memory outside PyTorch's allocator (CUDA context, lazily loaded kernels, cuBLAS handles),
# measured where we could: bench/results/estimate_accuracy.json, NVML's per-process used memory
# minus max_memory_reserved on an H200 (torch 2.11, CUDA 13): 0.725 GiB for the plain recipe,
# 0.74-0.81 GiB for snugtune (more distinct kernels: chunked loss, SDPA backward). The larger
# one is used for Hopper cards (H100 assumed like the H200: same architecture and libraries).
# Other cards keep their profile's number: ~0.35 GiB on consumer cards is BASELINE.md's
# assumption (it caps the allocator at 4 - 0.35 GiB), not a measurement.
MEASURED_CONTEXT_GIB = {(9, 0): 0.81}

# Verdict thresholds: "tight" when the headroom is under this share of the budget (a
# desktop opening a browser tab, allocator noise, a longer-than-usual batch can eat 5%).
TIGHT_SHARE = 0.05
# Specs guessed from a parameter count or an unknown architecture get this extra margin.
INEXACT_MARGIN = 0.25

RECIPES = ("snugtune", "plain")
OPTIMIZERS = ("auto", "paged_adamw_8bit", "adamw_8bit", "adamw_torch")


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

    def to_dict(self) -> dict:
        d = asdict(self)
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["estimate"] = self.estimate.to_dict()
        return d


# ---- inputs ----------------------------------------------------------------------------------------

def _optimizer(cfg, gpu: GpuTarget) -> str:
    name = cfg.train.optimizer
    if name == "auto":
        return "adamw_torch" if gpu.is_cpu else "paged_adamw_8bit"
    return name


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


def context_gib(gpu: GpuTarget) -> float:
    """Memory the process holds outside PyTorch's allocator on this card (GiB): measured for
    Hopper (MEASURED_CONTEXT_GIB), the profile's assumption elsewhere."""
    if gpu.is_cpu:
        return 0.0
    measured = MEASURED_CONTEXT_GIB.get(tuple(gpu.compute_capability or ()))
    return max(gpu.cuda_context_gib, measured) if measured else gpu.cuda_context_gib


# ---- the model ---------------------------------------------------------------------------------------

def _ce_chunk_tokens(vocab: int, softcap: bool, budget_bytes: Optional[int], chunk_bytes: int) -> int:
    # core/savers.py::_ce_chunk_tokens: fp32 logits + 2-byte matmul output + 2-byte probabilities
    # (+4 bytes of tanh derivative with softcapping) per logit; chunk <= 256 MiB or budget/16.
    per = 8 + (4 if softcap else 0)
    target = chunk_bytes if budget_bytes is None else min(chunk_bytes, budget_bytes // 16)
    return max(32, int(target // (vocab * per)))


def _mlp_tile_tokens(intermediate: int, batch: int, tile_bytes: int) -> int:
    # core/savers.py::_mlp_tile_tokens: 4 live T x I tensors of 2 bytes per tile, in steps of 256.
    t = tile_bytes // (4 * 2 * intermediate * max(batch, 1))
    return max(256, int(t) // 256 * 256)


def offloads(spec: ModelSpec, cfg, gpu: GpuTarget, tokens: int) -> bool:
    """The engine's offload rule (core/savers.py offload_decision) for a micro-batch of `tokens`:
    'on' always, 'off' never, 'auto' when the L kept block inputs exceed 10% of the budget;
    never on the CPU or without gradient checkpointing."""
    mode = cfg.train.offload_activations
    if gpu.is_cpu or not cfg.train.gradient_checkpointing or mode == "off":
        return False
    if mode == "on":
        return True
    return spec.num_layers * tokens * spec.hidden_size * 2 > AUTO_OFFLOAD_SHARE * int(gpu.budget_gib * GIB)


def _fp16_guarded(spec: ModelSpec, cfg, gpu: GpuTarget) -> bool:
    """Whether the engine trains this model in fp16 with core.fp16guard's fp32 residual stream."""
    setting = getattr(cfg.model, "compute_dtype", "auto")
    fp16 = setting == "fp16" or (setting == "auto" and not getattr(gpu, "bf16", True))
    if not fp16:
        return False
    from core.fp16guard import needs_fp16_guard

    return needs_fp16_guard(spec, getattr(cfg.model, "fp16_guard", "auto"))[0]


def estimate(
    spec: ModelSpec,
    cfg,
    gpu: GpuTarget,
    recipe: str = "snugtune",
    *,
    ce_chunk_bytes: int = CE_CHUNK_BYTES,
    mlp_tile_bytes: int = MLP_TILE_BYTES,
    offload: Optional[bool] = None,
    keep_layers: int = 0,
    chunked_loss: Optional[bool] = None,
    overhead_share: Optional[float] = None,
    calibration: Optional[float] = None,
) -> Estimate:
    """The peak memory of training `spec` with `cfg` on `gpu` under `recipe`.

    Knobs for the GPU benchmark's calibration: `ce_chunk_bytes` and `mlp_tile_bytes` (the
    savers' working-set sizes), `offload` (None: cfg.train.offload_activations, 'auto'
    decided as the engine does), `keep_layers` (blocks the engine leaves un-checkpointed
    when the budget has room; 0 = the need, which is what the verdict is about),
    `overhead_share` (allocator overhead), `calibration` (a per-GPU multiplier on the
    allocator's part, from a calibration probe).
    """
    check_inputs(spec, cfg, recipe)
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
    opt = _optimizer(cfg, gpu)
    opt_bytes = n_lora * (BYTES_ADAM32 if opt == "adamw_torch" else BYTES_ADAM8)
    opt_outside = opt == "paged_adamw_8bit" and not cpu  # cudaMallocManaged, not PyTorch's allocator
    workspace = 0 if cpu else WORKSPACE_GIB * GIB
    accum = cfg.train.grad_accum

    # -- activations ---------------------------------------------------------------------------------
    use_offload = False
    tile = T
    # Qwen3 / Gemma-3 normalise each head's q and k: the RMSNorm keeps its input upcast to fp32
    # (pow and x * rsqrt save it), 4 bytes per q and k element; its output replaces the raw
    # projection as rope's input, and the weight product saves nothing (frozen weight). Same
    # 4 bytes in both recipes (plain: the raw fp32 projection is kept, plus the norm's output).
    qk_norm_bytes = T * 4 * (q + kv) if spec.qk_norm else 0
    held_logits = 0  # logits the output object holds through the backward
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
            use_offload = offloads(spec, cfg, gpu, T)
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
        if not cpu and _fp16_guarded(spec, cfg, gpu):
            # core/fp16guard.py keeps the residual stream fp32 in fp16 (Gemma 2/3): 4-byte block
            # inputs (+2 L T h kept) and hidden-state copies; attention and MLP stay 2-byte
            s = 4
            notes.append("fp16 guard on (this model's activations overflow fp16): the residual stream is fp32, "
                         f"+{L * T * h * 2 / GIB:.2f} GiB of block inputs")
        k_layer = T * h * s
        kept = 0 if not gc_on else (2 if use_offload else L) * k_layer
        if use_offload:
            notes.append(f"activation offload on: {L * T * h * s / GIB:.2f} GiB of block inputs in pinned CPU memory")
        if gc_on:
            tm = _mlp_tile_tokens(I, B, mlp_tile_bytes) * B
            tile = tm if T > 2 * tm else T  # the engine tiles beyond two tiles' worth
        # One block's saved tensors a token, counted with saved_tensors_hooks on the engine's
        # path (16-bit weights, LoRA under autocast as the Trainer runs it): the RMSNorms' fp32
        # internals 2 x 4h, six h-wide projection inputs, q and attention output, k and v, and
        # the MLP's gate, up, act and product: 8h + s(6h + 2q + 2kv) + 4I s (tiled: per tile).
        block = T * (8 * h + c * (6 * h + 2 * q + 2 * kv)) + tile * 4 * I * c + qk_norm_bytes
        if ln_fp32:
            block += tile * 6 * I
        # The MLP's backward: of gate, up, act and product (in `block`), the product is freed
        # once down_proj's backward has used it, while the gradients of product, act and up
        # exist: 3 + 3 I-wide tensors at most, i.e. 2 above the block's 4 (the hidden-state
        # gradients 2h s beside them). Measured: with 4 (the old count) every backward-peaked
        # H200 run was overestimated, by up to 10% (l1-512-b4-r64).
        transient = tile * 2 * I * (4 if ln_fp32 else c) + T * 2 * h * s
        if spec.model_type in TILED_ATTENTION:
            # fp32 scores, their masked copy and softmax, 2-byte probabilities and the boolean
            # mask of one query tile (core/savers.py::_tiled_attention), ~14 bytes a score: a
            # tile holds ATTN_TILE_ELEMS scores for EACH of the B rows (its size ignores B), so B x
            # min(Hq x seq^2, tile). Measured on Gemma 3 270M, 2,048 tokens x 4 rows: 1.81 GiB
            # allocated where one tile for all rows gave 1.15 (bench/results/real_weights.json).
            transient += B * min(spec.num_heads * seq * seq, ATTN_TILE_ELEMS) * 14
        use_chunks = cfg.train.chunked_loss if chunked_loss is None else chunked_loss
        if use_chunks and spec.model_type not in CHUNKABLE:
            use_chunks = False
            notes.append(f"{spec.model_type}: the engine cannot chunk this model's loss; full logits are materialised")
        if use_chunks:
            chunk = _ce_chunk_tokens(V, softcap, budget_bytes if not cpu else None, ce_chunk_bytes)
            per_logit = CE_LIVE_BYTES + (4 if softcap else 0)
            loss_ws = min(chunk, T) * V * per_logit
            loss_hidden = 3 * T * h * s  # hidden-state gradient kept + selected rows + final norm out
            largest_block = min(chunk, T) * V * 8
        else:
            loss_ws = T * V * (OWN_LOSS_BYTES + (4 if softcap else 0))
            loss_hidden = 2 * T * h * s
            largest_block = T * V * 4
            held_logits = T * V * 2  # the 16-bit logits stay referenced by the output during backward
            if cfg.train.chunked_loss is False or chunked_loss is False:
                notes.append("chunked loss off: the full logits are materialised (the largest cost at big vocabularies)")
        if keep_layers:
            kept += keep_layers * (block - T * h * s)
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
        block_phase_act = block + transient
        per_block_store = kept if use_offload else k_layer  # offload: ~2 inputs on the card throughout
    if accum > 1:
        store_g = (kept, grads)
    else:
        last_end = (kept, grads / L)
        first_end = (per_block_store + (kept - L * k_layer if (gc_on and keep_layers) else 0), grads)
        store_g = max(last_end, first_end, key=sum)

    loss_phase = {
        "activations": kept + loss_hidden,
        "logits": loss_ws,
        "gradients": grads if accum > 1 else 0,  # zeroed (set to None) after each optimizer step
    }
    block_phase = {"activations": store_g[0] + block_phase_act, "logits": held_logits, "gradients": store_g[1]}
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
        overhead = cached = share * allocated + frag * largest_block
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
    if not plain and not cpu and gc_on and not keep_layers:
        notes.append("this is what the run needs; with room to spare the engine may use up to 75% of the "
                     "budget to skip recomputing some blocks (faster, same result)")
    if cpu:
        notes.append("CPU target: budget is the available RAM; training runs in fp32 and is slow")

    components = {k: v / GIB for k, v in comp_bytes.items()}
    total = sum(components.values())
    budget = gpu.budget_gib
    headroom = budget - total
    if headroom < 0:
        verdict = "does not fit"
    elif headroom < TIGHT_SHARE * budget:
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
        reserved_gib=(allocated + cached) / GIB,
        # NVML's per-process number: the allocator's reserve and the context. Paged optimizer
        # states (cudaMallocManaged) are not in it: the plain recipe's outside-allocator memory
        # measured 0.725 GiB with paged 8-bit AdamW and with torch's AdamW alike.
        device_gib=(allocated + cached) / GIB + comp_bytes["cuda_context"] / GIB
        + (comp_bytes.get("margin", 0.0) / GIB),
        peak_phase=phase_name,
        notes=notes,
        knobs={
            "offload": use_offload,
            "mlp_tile_tokens": tile if (not plain and tile < T) else None,
            "ce_chunk_tokens": None if plain else (
                _ce_chunk_tokens(V, softcap, budget_bytes if not cpu else None, ce_chunk_bytes)
            ),
            "optimizer": opt,
            "keep_layers": keep_layers,
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


# ---- auto-fit ----------------------------------------------------------------------------------------

def _with(cfg, seq: int | None = None, micro_batch: int | None = None, grad_accum: int | None = None):
    data = cfg.data.model_copy(update={"max_seq_len": seq}) if seq is not None else cfg.data
    upd = {}
    if micro_batch is not None:
        upd["micro_batch"] = micro_batch
    if grad_accum is not None:
        upd["grad_accum"] = grad_accum
    train = cfg.train.model_copy(update=upd) if upd else cfg.train
    return cfg.model_copy(update={"data": data, "train": train})


SEQ_STEP = 64  # sequence lengths are searched in multiples of 64 (tensor-core friendly)


def longest_seq(spec: ModelSpec, cfg, gpu: GpuTarget, recipe: str = "snugtune", micro_batch: int = 1,
                limit: int | None = None, **knobs) -> int:
    """The longest sequence (multiple of 64) whose estimate says "fits"; 0 if not even 64 does."""
    hi_cap = limit or max(spec.max_position_embeddings, cfg.data.max_seq_len)

    def ok(n: int) -> bool:
        return estimate(spec, _with(cfg, n, micro_batch), gpu, recipe, **knobs).verdict == "fits"

    if not ok(SEQ_STEP):
        return 0
    lo, hi = 1, hi_cap // SEQ_STEP  # in units of SEQ_STEP; memory grows monotonically with length
    if ok(hi * SEQ_STEP):
        return hi * SEQ_STEP
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid * SEQ_STEP):
            lo = mid
        else:
            hi = mid
    return lo * SEQ_STEP


def autofit(spec: ModelSpec, cfg, gpu: GpuTarget, recipe: str = "snugtune", **knobs) -> FitResult:
    """Longest sequence and largest micro-batch that fit, keeping the effective batch.

    Sequence first (it bounds what the model learns from), at micro-batch 1; then the
    micro-batch grows while it fits and does not exceed the effective batch; gradient
    accumulation makes up the rest (ceil, so the effective batch never shrinks).
    """
    check_inputs(spec, cfg, recipe)
    want_seq = cfg.data.max_seq_len
    eff = cfg.train.micro_batch * cfg.train.grad_accum
    notes: list[str] = []
    longest = longest_seq(spec, cfg, gpu, recipe, 1, **knobs)
    if longest == 0:
        est = estimate(spec, _with(cfg, 64, 1, eff), gpu, recipe, **knobs)
        return FitResult(64, 0, 1, eff, eff, est, False, ["nothing fits, not even 64 tokens at micro-batch 1"])
    seq = min(want_seq, longest)
    if seq < want_seq:
        notes.append(f"sequence shortened from {want_seq} to {seq} tokens to fit")
    mb = 1
    while mb * 2 <= eff and estimate(spec, _with(cfg, seq, mb * 2), gpu, recipe, **knobs).verdict == "fits":
        mb *= 2
    accum = math.ceil(eff / mb)
    est = estimate(spec, _with(cfg, seq, mb, accum), gpu, recipe, **knobs)
    if mb * accum != eff:
        notes.append(f"effective batch {mb * accum} (was {eff}): {mb} x {accum}")
    return FitResult(seq, longest, mb, accum, mb * accum, est, True, notes)


# ---- time ----------------------------------------------------------------------------------------------

# Share of the card's peak fp16 throughput a QLoRA step reaches: small models are bound by
# kernel launches and 4-bit dequantisation, not arithmetic (BASELINE.md: an H200 runs the
# plain recipe at ~1-6k tokens/s). Rough on purpose: "time per epoch" to the nearest factor ~1.5.
MFU = 0.25
# Host time per launched kernel in an eager step (Python, autograd, dispatch): measured on the
# H200's host, ~220 ms of a 270 ms Qwen2.5-1.5B step over 28 blocks x 3 passes (bench run 2).
KERNEL_OVERHEAD_S = 40e-6
KERNELS_PER_BLOCK = 60  # forward of one block with LoRA on 7 projections (plus recompute, backward)
# CUDA-graph steps (core.graphs: CUDA, bf16, rows up to GRAPH_MAX_TOKENS, no offload) replay a
# micro-batch in one launch; what stays on the host is the optimizer: ~30 us per adapter tensor.
GRAPH_MAX_TOKENS = 8192
OPTIMIZER_HOST_S_PER_TENSOR = 30e-6


def graphed_steps(spec: ModelSpec, cfg, gpu: GpuTarget) -> bool:
    """Whether the engine would replay this configuration's steps from a CUDA graph."""
    T = cfg.data.max_seq_len * cfg.train.micro_batch
    if gpu.is_cpu or not gpu.bf16 or getattr(cfg.train, "cuda_graphs", "auto") == "off" or T > GRAPH_MAX_TOKENS:
        return False
    if cfg.lora.dropout > 0 or getattr(cfg.train, "compile", False):
        return False
    return not offloads(spec, cfg, gpu, T)


def estimate_step_time(spec: ModelSpec, cfg, gpu: GpuTarget) -> float:
    """Rough seconds per optimizer step (micro_batch x grad_accum sequences), from the profile's
    fp16 throughput and memory bandwidth. Good for "about how long per epoch", not more."""
    seq, B, accum = cfg.data.max_seq_len, cfg.train.micro_batch, cfg.train.grad_accum
    T = seq * B
    passes = 3 if cfg.train.gradient_checkpointing else 2  # forward, (recompute), backward-for-input
    linear = spec.params_quantizable + spec.vocab_size * spec.hidden_size
    flops = 2 * linear * T * passes + 4 * spec.num_layers * T * T * spec.q_dim * passes / 2  # causal attention
    flops += 6 * spec.lora_params(cfg.lora.r, cfg.lora.target_modules) * T
    compute_s = flops / (gpu.fp16_tflops * 1e12 * MFU)
    # every pass dequantises the 4-bit weights: read 0.5 B + write/read 2 B a weight
    mem_s = spec.params_quantizable * 4.5 * passes / (gpu.bandwidth_gbs * 1e9)
    targets = cfg.lora.target_modules
    per_layer = 7 if isinstance(targets, str) else len(targets)
    optimizer_s = OPTIMIZER_HOST_S_PER_TENSOR * 2 * per_layer * spec.num_layers
    if graphed_steps(spec, cfg, gpu):
        return accum * (compute_s + mem_s) + optimizer_s
    launch_s = KERNEL_OVERHEAD_S * KERNELS_PER_BLOCK * spec.num_layers * passes
    return accum * (compute_s + mem_s + launch_s) + optimizer_s


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
