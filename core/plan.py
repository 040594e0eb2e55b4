"""The plan: every decision that changes a run's memory or speed, made once, each with its reason.

`plan(cfg, spec, gpu) -> Plan` is the one seam between the estimator, the engine and the
wizard. The estimator prices a Plan (core.estimate.estimate), the engine executes the one it
is given (core.savers.install_savers(model, plan), core.train) and writes it to the run
directory (plan.json, and the run_started event), and the wizard and `snugtune estimate` show
it. A rule that changes memory or speed lives here and nowhere else:

* compute dtype (bf16 / fp16 / fp32) and the optimizer;
* the memory budget and the allocator cap: `gpu.vram_budget_gib` is what the card gives this
  process, CUDA context included (what nvidia-smi shows for it); PyTorch's allocator is capped
  at budget - the context the plan assumes;
* the loss chunk, the MLP tile and the attention path;
* per row length: which blocks are checkpointed, kept (un-checkpointed, to skip their
  recompute when memory is spare) or offloaded to CPU memory;
* whether CUDA-graph steps run, and why not;
* the micro-batch and accumulation after an out-of-memory retry (`Plan.after_oom()`).

Pure Python, no torch: the wizard imports it in-process.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from core.catalog import ModelSpec
from core.errors import UserError
from core.gpu import PROFILES, GpuTarget, profile_for

GIB = 2**30

OPTIMIZERS = ("auto", "paged_adamw_8bit", "adamw_8bit", "adamw_torch")
# One loss chunk's working set (fp32 logits + 2-byte copies): big enough that the matmuls fill
# a large GPU, small enough to sit beside a 1.5B model under 4 GiB.
CE_CHUNK_BYTES = 256 * 2**20
# Tile the MLP when its intermediates would exceed this (4 tensors of T x I in 2 bytes).
MLP_TILE_BYTES = 256 * 2**20
# Query-tiled attention: elements of one score tile (Hq x q x Tk); 2^24 x ~12 bytes ~ 200 MiB.
ATTN_TILE_ELEMS = 2**24
# offload_activations="auto" turns offload on when the kept block inputs exceed this share of
# the budget: below it the copies cost time for little memory.
AUTO_OFFLOAD_SHARE = 0.10
# Architectures whose head is a plain linear layer (+ Gemma-2/3 softcapping): the chunked loss.
CHUNKABLE = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                       "smollm3"})
# Attention softcapping (Gemma-2) / sliding windows (Gemma-2/3): SDPA cannot, a query-tiled exact one does.
TILED_ATTENTION = frozenset({"gemma2", "gemma3_text"})
# The model types core/kernels.py fuses, each with the prefix of its transformers classes (<Prefix>RMSNorm,
# <Prefix>MLP, <Prefix>Attention: core/kernels.py builds its class lists from this table) and whether its
# norm is Gemma's (1 + w, fp32). The plan turns the kernels on only for these; the estimate prices them so.
KERNEL_CLASSES = {"llama": ("Llama", False), "qwen2": ("Qwen2", False), "qwen3": ("Qwen3", False),
                  "mistral": ("Mistral", False), "gemma": ("Gemma", True), "gemma2": ("Gemma2", True),
                  "gemma3_text": ("Gemma3", True)}
KERNEL_TYPES = frozenset(KERNEL_CLASSES)
# CUDA-graph steps build a B x T x T boolean mask per micro-batch (core.graphs' static mode): short rows only.
GRAPH_MAX_TOKENS = 8192
# Memory outside PyTorch's allocator (CUDA context, lazily loaded kernels, cuBLAS handles), measured
# where we could: bench/results/estimate_accuracy.json, NVML's per-process used memory minus
# max_memory_reserved on an H200 (torch 2.11, CUDA 13): 0.725 GiB for the plain recipe, 0.74-0.81
# GiB for snugtune. The larger one is used for Hopper cards. Other cards keep their profile's
# number: ~0.35 GiB on consumer cards is BASELINE.md's assumption, not a measurement.
MEASURED_CONTEXT_GIB = {(9, 0): 0.81}
# Selective checkpointing fills spare memory with un-checkpointed blocks up to this share of the
# budget by the estimate (which counts them): the estimate is within ~5% of measured peaks
# (bench/results/fit_truth.md), so 0.90 leaves the measured peak under the budget.
KEEP_SHARE = 0.90
# torch.compile'd blocks keep more for backward than the eager ones the estimate prices
# (measured: out of memory at the eager count, H200 bench run 5), so they keep 60% as many.
COMPILE_KEEP_FACTOR = 0.6


# ---- the rules, as functions of a shape (the engine calls them for shapes other than the planned one) ----

def compute_dtype(setting: str, on_cuda: bool, bf16: bool) -> tuple[str, str]:
    """model.compute_dtype on this device, and why."""
    if setting != "auto":
        return setting, f"model.compute_dtype = {setting!r}"
    if on_cuda:
        if bf16:
            return "bf16", "bf16: the card has bf16 tensor cores (Ampere or newer)"
        return "fp16", "fp16: the card has no native bf16 (pre-Ampere)"
    return "fp32", "fp32 on the CPU: exact, and CPUs without AMX emulate bf16 matmuls slowly"


def optimizer(setting: str, on_cuda: bool) -> tuple[str, str]:
    """The Trainer's `optim` name, and why."""
    if setting != "auto":
        return setting, f"train.optimizer = {setting!r}"
    if on_cuda:
        return "paged_adamw_8bit", ("paged 8-bit AdamW: states in 8 bits, in CUDA unified memory that pages "
                                    "to the CPU under pressure")
    return "adamw_torch", "torch's AdamW: paged 8-bit AdamW needs CUDA unified memory"


def ce_chunk_tokens(vocab: int, softcap: bool, budget_bytes: Optional[int] = None,
                    chunk_bytes: int = CE_CHUNK_BYTES) -> int:
    """Tokens per chunk of the chunked loss: fp32 logits + 2-byte matmul output + 2-byte probabilities
    (+4 bytes of tanh derivative with softcapping) per logit within 256 MiB, or budget/16 on small cards."""
    per = 8 + (4 if softcap else 0)
    target = chunk_bytes if budget_bytes is None else min(chunk_bytes, budget_bytes // 16)
    return max(32, int(target // (vocab * per)))


def mlp_tile_tokens(intermediate: int, batch: int = 1, tile_bytes: int = MLP_TILE_BYTES) -> int:
    """Tokens per MLP tile: 4 live T x I tensors of 2 bytes per tile, in steps of 256."""
    t = tile_bytes // (4 * 2 * max(intermediate, 1) * max(batch, 1))
    return max(256, int(t) // 256 * 256)


def offload_rule(mode: str, on_cuda: bool, gradient_checkpointing: bool, layers: int, tokens: int, hidden: int,
                 budget_bytes: Optional[int]) -> tuple[bool, str]:
    """Whether block inputs go to pinned CPU memory for a micro-batch of `tokens`, and why."""
    if not gradient_checkpointing:
        return False, "no offload: gradient checkpointing is off (there are no block inputs to move)"
    if mode == "on":
        return True, "train.offload_activations = 'on'"
    if mode == "off":
        return False, "train.offload_activations = 'off'"
    if not on_cuda or budget_bytes is None:
        return False, "no offload on the CPU (the inputs are in host memory already)"
    inputs = layers * tokens * hidden * 2
    if inputs > AUTO_OFFLOAD_SHARE * budget_bytes:
        return True, (f"offload: the {layers} block inputs ({inputs / GIB:.2f} GiB) exceed "
                      f"{AUTO_OFFLOAD_SHARE:.0%} of the budget")
    return False, f"no offload: the {layers} block inputs ({inputs / GIB:.2f} GiB) are under {AUTO_OFFLOAD_SHARE:.0%} of the budget"


def oom_fallback(micro_batch: int, grad_accum: int) -> Optional[tuple[int, int]]:
    """A smaller micro-batch with the same effective batch, or None at micro-batch 1.

    The micro-batch halves (for an odd one: its largest divisor at most half of it) and gradient
    accumulation grows by the same factor, so micro_batch x grad_accum stays exactly the same.
    """
    if micro_batch <= 1:
        return None
    new_mb = max(d for d in range(1, micro_batch // 2 + 1) if micro_batch % d == 0)
    return new_mb, grad_accum * (micro_batch // new_mb)


def planned_steps(n_rows: int, micro_batch: int, grad_accum: int, epochs: float, max_steps: Optional[int]) -> int:
    """Optimizer steps a run takes over `n_rows` training rows (the Trainer's own count)."""
    if max_steps:
        return int(max_steps)
    batches = math.ceil(n_rows / micro_batch)
    # The Trainer counts a last partial accumulation as a step, and at least one per epoch.
    per_epoch = max(batches // grad_accum + int(batches % grad_accum > 0), 1)
    return max(math.ceil(epochs * per_epoch), 1)


# Fewer optimizer steps than this in a whole run (epochs-based, no max_steps) barely move a LoRA
# adapter at the usual learning rates: the real-weight checks (bench/real_weights.py, Gemma 3 270M)
# needed ~60-200 steps to learn their task; 100 Q&A pairs packed at 1,024 tokens with accumulation 8
# make 2-3 steps an epoch.
FEW_STEPS = 30


def few_steps_note(total_steps: int, per_epoch: int, max_steps: Optional[int], wizard: bool = False) -> Optional[str]:
    """One sentence when an epochs-based run takes too few optimizer steps to learn much, with the
    setting that fixes it; None otherwise (and whenever max_steps says what the user wants).
    `wizard`: the setting named by the wizard's fields (Epochs, Grad accum)."""
    if max_steps or total_steps >= FEW_STEPS or per_epoch < 1:
        return None
    epochs = math.ceil(FEW_STEPS * 2 / per_epoch)
    fix = (f"Epochs {epochs} gives {epochs * per_epoch}, or a lower Grad accum" if wizard else
           f"train.epochs={epochs} gives {epochs * per_epoch}, or lower train.grad_accum")
    return (f"only {total_steps} optimizer step{'s' if total_steps != 1 else ''} in all "
            f"({per_epoch} an epoch): too few for the adapter to learn much; {fix}")


def context_gib(gpu: GpuTarget) -> float:
    """Memory the process holds outside PyTorch's allocator on this card (GiB): measured for Hopper
    (MEASURED_CONTEXT_GIB), the profile's assumption elsewhere."""
    if gpu.is_cpu:
        return 0.0
    measured = MEASURED_CONTEXT_GIB.get(tuple(gpu.compute_capability or ()))
    return max(gpu.cuda_context_gib, measured) if measured else gpu.cuda_context_gib


def _kernels(on_cuda: bool, gpu, compiled: bool, guard: bool, model_type: str) -> tuple[bool, str]:
    """Whether the engine routes norms, GLU MLPs and rotary through core/kernels.py (it still falls
    back to transformers' path, and says so, if Triton fails to import or a kernel to compile)."""
    import importlib.util

    if not on_cuda:
        return False, "not on a CUDA device"
    if model_type not in KERNEL_TYPES:
        return False, f"no fused kernels for {model_type} blocks: transformers' path"
    if os.environ.get("SNUGTUNE_KERNELS", "").strip().lower() in ("off", "0", "false", "no"):
        return False, "SNUGTUNE_KERNELS=off"
    if compiled:
        return False, "torch.compile compiles the blocks (train.compile), its own fusions included"
    cc = getattr(gpu, "compute_capability", None)
    if cc is not None and tuple(cc) < (7, 0):
        return False, f"Triton needs a GPU of compute capability 7.0 or newer (this one: {cc[0]}.{cc[1]})"
    try:
        have_triton = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        have_triton = False
    if not have_triton:
        return False, "Triton is not installed (`pip install triton`): transformers' unfused path"
    return True, ("fused Triton RMSNorm, SwiGLU / GeGLU and rotary: less GPU time and memory"
                  + ("; under the fp16 guard its norms are fused too, on the fp32 stream" if guard else ""))


def _fp16_guard(spec: ModelSpec, dtype: str, setting: str) -> tuple[bool, str]:
    """Whether fp16 training keeps the residual stream in fp32 (core.fp16guard), and why."""
    if dtype != "fp16":
        return False, f"not needed: compute is {dtype}"
    from core.fp16guard import needs_fp16_guard  # torch-free

    return needs_fp16_guard(spec, setting)


# ---- the plan ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Blocks:
    """What the decoder blocks do at one row length."""

    tokens: int
    checkpointed: int
    kept: int  # run without checkpointing (their activations kept: no recompute)
    offloaded: bool  # checkpointed blocks' inputs in pinned CPU memory
    why: str


@dataclass(frozen=True)
class Plan:
    """Every decision of one run, each beside its reason (`*_why`)."""

    model_id: str
    gpu: str
    device: str  # "cuda" | "cpu"
    seq_len: int
    micro_batch: int
    grad_accum: int
    compute_dtype: str
    compute_dtype_why: str
    optimizer: str
    optimizer_why: str
    budget_gib: float  # what the card gives this process, CUDA context included
    context_gib: float  # the CUDA context this plan assumes (outside PyTorch's allocator)
    allocator_cap_gib: Optional[float]  # PyTorch's allocator cap: budget - context (None on the CPU)
    allocator_cap_why: str
    chunked_loss: bool
    loss_why: str
    ce_chunk_tokens: Optional[int]
    mlp_tile_tokens: Optional[int]  # MLP tiles of this many tokens beyond two tiles (None: no tiling)
    mlp_why: str
    tiled_attention: bool
    attention_why: str
    gradient_checkpointing: bool
    offload_mode: str
    offload: bool  # at the planned row length
    offload_why: str
    keep_blocks: int  # un-checkpointed blocks at the planned row length
    keep_why: str
    layers: int
    fused_lora: bool
    fused_lora_why: str
    cached_block_scales: bool
    compile: bool
    cuda_graphs: bool
    cuda_graphs_why: str
    fp16_guard: bool
    fp16_guard_why: str
    oom_recovery: bool
    attempt: int = 0  # 0: the first plan; n: after n out-of-memory retries
    retry_why: str = ""
    hidden_size: int = 0
    intermediate_size: int = 0
    budget_bytes: Optional[int] = None
    # 7-9B models on small cards (core/bigsavers.py, decided by _big_savers): the input embedding's rows
    # from CPU memory, the frozen output layer in 8 bits read tile by tile by the chunked loss
    cpu_embedding: bool = False
    head_8bit: bool = False
    lean_norms: bool = False  # the blocks' RMSNorms keep their 16-bit input, not an fp32 copy (with the two above)
    big_savers_why: str = "not needed: the run fits with the 16-bit embedding and head on the card"
    # core/kernels.py's fused Triton RMSNorm, SwiGLU / GeGLU and rotary (CUDA); the estimate prices what
    # they keep for the backward (core/estimate.py ROPE_BWD_BYTES)
    kernels: bool = False
    kernels_why: str = "not on a CUDA device"
    # processes (one per GPU) training this run together (gpu.nproc): every figure above is per GPU,
    # since each process holds the whole 4-bit model (DDP); only the effective batch grows with it
    world_size: int = 1
    # inputs kept to re-plan after an out-of-memory retry (not part of the plan's record)
    _cfg: Any = field(default=None, compare=False, repr=False)
    _spec: Any = field(default=None, compare=False, repr=False)
    _gpu: Any = field(default=None, compare=False, repr=False)

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def effective_batch(self) -> int:
        """Rows per optimizer step, over every process: micro_batch x grad_accum x world_size."""
        return self.micro_batch * self.grad_accum * self.world_size

    # ---- per row length ----------------------------------------------------------------------

    def offloads_at(self, tokens: int) -> bool:
        return offload_rule(self.offload_mode, self.device == "cuda", self.gradient_checkpointing, self.layers,
                            tokens, self.hidden_size, self.budget_bytes)[0]

    def blocks_at(self, tokens: int) -> Blocks:
        """Checkpointed / kept / offloaded blocks for a micro-batch of `tokens` tokens.

        Kept blocks were sized for the planned length; a shorter micro-batch (the epoch's last,
        an eval batch, a packed row of whole samples) needs less for them, a longer one keeps none.
        A micro-batch up to the planned length offloads when the planned one does: the 10% rule
        alone would keep all L inputs of a row just under its line on the card, more than the
        planned row's two (memory would fall as rows grow). Measured: Gemma-2-2B planned at 8,192
        tokens under a 7.79 GiB budget trained packed rows of 6,494-6,799 tokens, under the rule's
        6,983, with its 26 inputs on the card: 4.21 GiB allocated where the same rows offloaded
        under a 5.79 GiB budget took 3.56 (bench/results/fit_truth_run4.json)."""
        if not self.gradient_checkpointing:
            return Blocks(tokens, 0, self.layers, False, "gradient checkpointing is off")
        off = self.offloads_at(max(tokens, self.tokens))
        kept = self.keep_blocks if (tokens <= self.tokens and not off) else 0
        why = self.keep_why if kept else ("all checkpointed" + (": inputs offloaded" if off else ""))
        return Blocks(tokens, self.layers - kept, kept, off, why)

    def mlp_tile_at(self, batch: int) -> int:
        return mlp_tile_tokens(self.intermediate_size, batch)

    def mlp_whole_below(self, batch: int) -> int:
        """Rows shorter than this run the MLP whole, longer ones in tiles of mlp_tile_at(batch).

        Two tiles, unless the planned row is tiled: then every row longer than one tile is, so no
        shorter row holds more MLP intermediates than the planned one's single tile (a row just
        under two tiles held two: Gemma-2-2B planned at 8,192 tokens, packed rows of ~6,700 took
        3.56 GiB allocated where the planned length took 3.31, fit_truth runs 5 and 5b)."""
        t = self.mlp_tile_at(batch)
        planned = mlp_tile_tokens(self.intermediate_size, self.micro_batch)
        return t if (self.mlp_tile_tokens and self.seq_len >= 2 * planned) else 2 * t

    # ---- retries ------------------------------------------------------------------------------

    def after_oom(self) -> Optional["Plan"]:
        """The plan to retry with after an out-of-memory error, or None when nothing is left to shrink.

        First the optional uses of spare memory go (un-checkpointed blocks, CUDA-graph pools),
        then the micro-batch halves with accumulation growing to keep the effective batch."""
        if self._cfg is None:
            return None
        cfg = self._cfg
        if self.keep_blocks or self.cuda_graphs:
            what = " and ".join(w for w, on in (("un-checkpointed blocks", self.keep_blocks),
                                                 ("CUDA-graph steps", self.cuda_graphs)) if on)
            return plan(cfg, self._spec, self._gpu, spare=False, graphs=False, attempt=self.attempt + 1,
                        retry_why=f"out of memory: retried without {what}, same micro-batch")
        nxt = oom_fallback(self.micro_batch, self.grad_accum)
        if nxt is None:
            return None
        mb, ga = nxt
        new_cfg = with_batch(cfg, micro_batch=mb, grad_accum=ga)
        return plan(new_cfg, self._spec, self._gpu, spare=False, graphs=False, attempt=self.attempt + 1,
                    retry_why=f"out of memory at micro-batch {self.micro_batch}: micro-batch {mb} x "
                              f"accumulation {ga} (same effective batch)")

    # ---- presentation --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        for k in ("_cfg", "_spec", "_gpu"):
            d.pop(k, None)
        d["tokens"] = self.tokens
        d["effective_batch"] = self.effective_batch
        d["blocks"] = asdict(self.blocks_at(self.tokens))
        return d

    def decisions(self) -> list[tuple[str, str, str]]:
        """(decision, value, why) rows for people: `snugtune estimate`, the wizard, `snugtune runs`."""
        b = self.blocks_at(self.tokens)
        blocks = f"{b.checkpointed} checkpointed, {b.kept} kept" + (", inputs offloaded" if b.offloaded else "")
        rows = [
            ("compute", self.compute_dtype, self.compute_dtype_why),
            ("optimizer", self.optimizer, self.optimizer_why),
            ("allocator cap", "-" if self.allocator_cap_gib is None else f"{self.allocator_cap_gib:.2f} GiB",
             self.allocator_cap_why),
            ("loss", f"chunks of {self.ce_chunk_tokens} tokens" if self.chunked_loss else "the model's own",
             self.loss_why),
            ("MLP", f"tiles of {self.mlp_tile_tokens} tokens" if self.mlp_tile_tokens else "whole", self.mlp_why),
            ("attention", "query-tiled" if self.tiled_attention else "SDPA", self.attention_why),
            ("blocks", blocks, b.why if b.kept else (self.offload_why if self.gradient_checkpointing else b.why)),
            ("CUDA graphs", "on" if self.cuda_graphs else "off", self.cuda_graphs_why),
            ("fp16 guard", "on" if self.fp16_guard else "off", self.fp16_guard_why),
            ("kernels", "fused" if self.kernels else "off", self.kernels_why),
        ]
        if self.cpu_embedding or self.head_8bit:
            what = " + ".join(w for w, on in (("embedding on CPU", self.cpu_embedding),
                                               ("8-bit head", self.head_8bit)) if on)
            rows.append(("embed / head", what, self.big_savers_why))
        if self.world_size > 1:
            rows.append(("processes", f"{self.world_size} GPUs",
                         f"per GPU: every figure here is one card's (each process loads the whole 4-bit model); "
                         f"effective batch {self.micro_batch} x {self.grad_accum} x {self.world_size} = "
                         f"{self.effective_batch} rows a step"))
        if self.attempt:
            rows.append(("retry", f"attempt {self.attempt + 1}", self.retry_why))
        return rows

    def format(self) -> str:
        rows = self.decisions()
        w = max(len(r[0]) for r in rows)
        v = max(len(r[1]) for r in rows)
        return "\n".join(f"  {a:<{w}}  {b:<{v}}  {c}" for a, b, c in rows)


def with_batch(cfg, seq: Optional[int] = None, micro_batch: Optional[int] = None, grad_accum: Optional[int] = None):
    """`cfg` with another sequence length / micro-batch / accumulation (a RunConfig copy)."""
    data = cfg.data.model_copy(update={"max_seq_len": seq}) if seq is not None else cfg.data
    upd = {}
    if micro_batch is not None:
        upd["micro_batch"] = micro_batch
    if grad_accum is not None:
        upd["grad_accum"] = grad_accum
    train = cfg.train.model_copy(update=upd) if upd else cfg.train
    return cfg.model_copy(update={"data": data, "train": train})


def plan(cfg, spec: ModelSpec, gpu: GpuTarget, *, spare: bool = True, keep: Optional[int] = None,
         graphs: bool = True, attempt: int = 0, retry_why: str = "") -> Plan:
    """Decide everything for training `spec` with `cfg` on `gpu`.

    `spare=False` uses no spare memory (no un-checkpointed blocks): what a run needs, and what an
    out-of-memory retry runs with. `keep` forces the number of un-checkpointed blocks (benchmarks).
    `graphs=False` runs no CUDA-graph steps (their memory pool comes on top: a retry drops it).
    """
    check_budget(gpu)
    on_cuda = not gpu.is_cpu
    t = cfg.train
    world = int(getattr(cfg.gpu, "nproc", None) or 1)
    seq, mb = cfg.data.max_seq_len, t.micro_batch
    T = seq * mb
    dtype, dtype_why = compute_dtype(cfg.model.compute_dtype, on_cuda, gpu.bf16)
    opt, opt_why = optimizer(t.optimizer, on_cuda)
    budget_bytes = None if gpu.is_cpu else int(gpu.budget_gib * GIB)
    ctx = context_gib(gpu)
    if on_cuda:
        cap = gpu.budget_gib - ctx
        cap_why = (f"budget {gpu.budget_gib:.2f} GiB ({gpu.budget_source}) less the {ctx:.2f} GiB CUDA context "
                   "this plan assumes")
    else:
        cap, cap_why = None, "no allocator cap on the CPU"

    softcap = spec.final_logit_softcap is not None
    if not t.chunked_loss:
        chunked, loss_why = False, "train.chunked_loss = false: the model's own loss (full logits)"
    elif spec.model_type not in CHUNKABLE:
        chunked, loss_why = False, f"{spec.model_type}: the head is not a plain linear layer; the model's own loss"
    else:
        chunked, loss_why = True, "chunked linear + cross-entropy: the full logits never exist"
    chunk = ce_chunk_tokens(spec.vocab_size, softcap, budget_bytes) if chunked else None
    if chunked:
        loss_why += f" ({chunk} tokens a chunk" + (", within budget/16" if budget_bytes and
                                                   budget_bytes // 16 < CE_CHUNK_BYTES else "") + ")"

    gc_on = bool(t.gradient_checkpointing)
    tile = mlp_tile_tokens(spec.intermediate_size, mb)
    if not gc_on:
        tile_out, mlp_why = None, "no tiling without checkpointing (every tile's intermediates would be kept)"
    elif seq > 2 * tile:
        tile_out, mlp_why = tile, (f"rows of {seq} tokens are longer than two tiles: MLP in tiles of {tile} "
                                   f"(shorter rows too, from one tile up)")
    else:
        tile_out, mlp_why = tile, f"rows up to {2 * tile} tokens run whole; longer ones in tiles of {tile}"
    tiled_attn = spec.model_type in TILED_ATTENTION
    attn_why = ("query-tiled exact attention: softcapping / sliding windows, which SDPA lacks" if tiled_attn
                else "PyTorch SDPA (flash / memory-efficient): O(T) memory, no T x T mask")

    off, off_why = offload_rule(t.offload_activations, on_cuda, gc_on, spec.num_layers, T, spec.hidden_size,
                                budget_bytes)
    compiled = bool(t.compile) and on_cuda
    fused = bool(cfg.model.load_in_4bit)
    fused_why = ("one autograd node per LoRA'd 4-bit linear (keeps x and x A^T only)" if fused
                 else "16-bit base weights: peft's own LoRA layers")

    # CUDA-graph steps
    allow_graphs = graphs
    if t.cuda_graphs == "off":
        graphs, graphs_why = False, "train.cuda_graphs = 'off'"
    elif not allow_graphs:
        graphs, graphs_why = False, "off after an out-of-memory error (a graph's memory pool comes on top)"
    elif not on_cuda:
        graphs, graphs_why = False, "not on a CUDA device"
    elif world > 1:
        # DDP all-reduces gradients from hooks inside backward; a replayed graph would skip them or
        # capture collectives, and neither was measured on several GPUs (no multi-GPU machine yet)
        graphs, graphs_why = False, f"{world} processes (DDP): graphed steps are single-process only for now"
    elif dtype != "bf16":
        graphs, graphs_why = False, f"compute is {dtype} (fp16's loss scaler lives outside the graph)"
    elif cfg.lora.dropout > 0:
        graphs, graphs_why = False, "LoRA dropout is on (random numbers inside a graph)"
    elif compiled:
        graphs, graphs_why = False, "train.compile is on"
    elif not chunked:
        graphs, graphs_why = False, "the chunked loss is off or not available for this model"
    elif T > GRAPH_MAX_TOKENS:
        graphs, graphs_why = False, f"{T} tokens a micro-batch is over {GRAPH_MAX_TOKENS} (the static mask is T x T)"
    elif off:
        graphs, graphs_why = False, "activations are offloaded (side streams)"
    else:
        graphs, graphs_why = True, "short rows on a bf16 card: one replay instead of thousands of launches"
    guard, guard_why = _fp16_guard(spec, dtype, getattr(cfg.model, "fp16_guard", "auto"))
    kern, kern_why = _kernels(on_cuda, gpu, compiled, guard, spec.model_type)

    p = Plan(
        model_id=spec.id, gpu=gpu.name, device="cuda" if on_cuda else "cpu",
        seq_len=seq, micro_batch=mb, grad_accum=t.grad_accum,
        compute_dtype=dtype, compute_dtype_why=dtype_why, optimizer=opt, optimizer_why=opt_why,
        budget_gib=float(gpu.budget_gib), context_gib=ctx,
        allocator_cap_gib=None if cap is None else round(cap, 4), allocator_cap_why=cap_why,
        chunked_loss=chunked, loss_why=loss_why, ce_chunk_tokens=chunk,
        mlp_tile_tokens=tile_out, mlp_why=mlp_why, tiled_attention=tiled_attn, attention_why=attn_why,
        gradient_checkpointing=gc_on, offload_mode=t.offload_activations, offload=off, offload_why=off_why,
        keep_blocks=0, keep_why="no spare memory used: every block checkpointed",
        layers=spec.num_layers, fused_lora=fused, fused_lora_why=fused_why, cached_block_scales=False,
        compile=compiled, cuda_graphs=graphs, cuda_graphs_why=graphs_why,
        fp16_guard=guard, fp16_guard_why=guard_why, kernels=kern, kernels_why=kern_why,
        oom_recovery=bool(t.oom_recovery),
        attempt=attempt, retry_why=retry_why, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, budget_bytes=budget_bytes, world_size=world,
        _cfg=cfg, _spec=spec, _gpu=gpu,
    )
    p = _big_savers(p, cfg, spec, gpu)
    if not gc_on:
        return replace(p, keep_blocks=spec.num_layers, keep_why="gradient checkpointing is off: every block keeps "
                                                                 "its activations")
    if keep is not None:
        k = max(0, min(spec.num_layers, int(keep)))
        return replace(p, keep_blocks=k, cached_block_scales=bool(k) and fused,
                       keep_why=f"{k} blocks un-checkpointed (set by the caller)" if k else p.keep_why)
    if not spare:
        return replace(p, keep_why="no spare memory used" + (f" ({retry_why.split(':')[0]})" if retry_why else ""))
    if on_cuda and not off and t.offload_activations == "auto" and not _fits(p, cfg, spec, gpu):
        # 'auto' also offloads when the block inputs are under 10% of the budget but the run does not
        # fit without it and does with it: otherwise memory would not grow with length (a longer row
        # crosses the 10% line and fits again), and auto-fit stopped at 40% of the length that
        # trains (Gemma-2-2B, 4 GB card, fit_truth run 1)
        q = replace(p, offload=True, offload_why="offload: the run fits only with the block inputs in CPU memory",
                    cuda_graphs=False, cuda_graphs_why="activations are offloaded (side streams)" if p.cuda_graphs
                    else p.cuda_graphs_why, offload_mode="on")
        if _fits(q, cfg, spec, gpu):
            return q
    if not on_cuda or off:
        return p
    k = _spare_keep(p, cfg, spec, gpu)
    if compiled:
        k = int(k * COMPILE_KEEP_FACTOR)
    if k <= 0:
        return replace(p, keep_why=f"every block checkpointed: no room for an un-checkpointed block within "
                                   f"{KEEP_SHARE:.0%} of the budget")
    return replace(p, keep_blocks=k, cached_block_scales=fused,
                   keep_why=f"{k} of {spec.num_layers} blocks skip checkpointing (no recompute): spare memory "
                            f"within {KEEP_SHARE:.0%} of the budget, counted in the estimate")


def _fits(p: Plan, cfg, spec: ModelSpec, gpu: GpuTarget) -> bool:
    from core.estimate import estimate  # noqa: PLC0415 (estimate imports this module)

    return estimate(spec, cfg, gpu, "snugtune", plan=p).verdict == "fits"


def _spare_keep(p: Plan, cfg, spec: ModelSpec, gpu: GpuTarget) -> int:
    """The most blocks that can skip checkpointing with the estimate within KEEP_SHARE of the budget."""
    from core.estimate import estimate  # noqa: PLC0415 (estimate imports this module)

    limit = KEEP_SHARE * gpu.budget_gib

    def total(k: int) -> float:
        q = replace(p, keep_blocks=k, cached_block_scales=bool(k) and p.fused_lora)
        return estimate(spec, cfg, gpu, "snugtune", plan=q).total_gib

    if total(1) > limit:
        return 0
    lo, hi = 1, spec.num_layers
    if total(hi) <= limit:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


# ---- 7-9B models on small cards: the embedding and the head (core/bigsavers.py) ---------------------

# Below this a 16-bit embedding is not worth a host copy per step (the savers leave it on the card).
BIG_SAVER_MIN_BYTES = 64 * 2**20
# train.big_savers = "auto" considers them from this size up: the 7-9B models they were built and
# measured for. Smaller models get them with "on" (they fit longer rows with them: Qwen2.5-1.5B at
# 32,768 tokens on a 4 GB card, big_models run 1), but auto-fit's measured choices for those
# (fit_truth run 4) were made without them.
BIG_SAVER_AUTO_PARAMS = 5_000_000_000
# Block norms of exactly w * (x / rms(x)).to(dtype) (core/bigsavers.py LEAN_NORM_CLASSES)
LEAN_NORM_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
# One dequantized tile of the 8-bit head (vocab_tile x hidden, 2 bytes): small beside a 6-12 GB budget.
HEAD_TILE_BYTES = 32 * 2**20


def head_tiles(vocab: int, hidden: int, chunk_tokens: int, vocab_tile: Optional[int] = None) -> tuple[int, int]:
    """(tokens a chunk, vocabulary rows a tile) of the 8-bit head's chunked loss: the tile's dequantized
    rows within HEAD_TILE_BYTES, and as many tokens a chunk as keep chunk x tile logits at the plan's
    chunk x vocab (the same loss working set as the 16-bit chunked loss)."""
    vt = vocab_tile or max(256, min(vocab, HEAD_TILE_BYTES // (2 * max(hidden, 1)) // 256 * 256))
    vt = min(vt, vocab)
    return max(32, int(chunk_tokens) * vocab // vt), vt


def _big_savers(p: Plan, cfg, spec: ModelSpec, gpu: GpuTarget) -> Plan:
    """The input embedding in CPU memory and the 8-bit head, on only where the run does not fit
    without them even in its most frugal form (every block checkpointed, inputs offloaded where
    offload is allowed). Untied models move the embedding first (no cost but a T-row host copy a
    step), then the head; tied ones need both at once (the 8-bit copy is then the only head on the
    card). Both are frozen under LoRA, so neither needs a gradient."""
    setting = cfg.train.big_savers
    if setting == "off":
        return replace(p, big_savers_why="off (train.big_savers = 'off')")
    if p.device != "cuda" or not p.chunked_loss or not p.gradient_checkpointing:
        return p
    emb = spec.vocab_size * spec.hidden_size * 2
    if emb < BIG_SAVER_MIN_BYTES:
        return p
    if setting == "auto" and spec.params_total < BIG_SAVER_AUTO_PARAMS:
        # measured where they are needed (7-8B, bench/results/big_models_run2); on smaller models
        # auto-fit's choices were trained without them (fit_truth run 4), so they stay opt-in
        return p
    frugal = dict(offload=p.offload_mode != "off", keep_blocks=0, cuda_graphs=False)
    if _fits(replace(p, **frugal), cfg, spec, gpu):
        return p
    graphs = dict(cuda_graphs=False, cuda_graphs_why=p.cuda_graphs_why if not p.cuda_graphs else
                  "the input embedding's rows come from CPU memory (a host copy each step, outside any graph)",
                  lean_norms=spec.model_type in LEAN_NORM_TYPES and spec.norm == "rms" and spec.norms_per_layer == 2)
    gib = emb / GIB
    if not spec.tie_word_embeddings:
        q = replace(p, cpu_embedding=True, **graphs,
                    big_savers_why=f"does not fit with the 16-bit embedding on the card: its {gib:.2f} GiB in "
                                   "pinned CPU memory, each batch's rows copied over")
        if _fits(replace(q, **frugal), cfg, spec, gpu):
            return q
        return replace(q, head_8bit=True,
                       big_savers_why=f"does not fit with the 16-bit embedding and head ({gib:.2f} GiB each): the "
                                      "embedding in pinned CPU memory, the frozen head in 8 bits "
                                      f"({gib / 2:.2f} GiB), read by the loss tile by tile")
    return replace(p, cpu_embedding=True, head_8bit=True, **graphs,
                   big_savers_why=f"does not fit with the tied 16-bit embedding ({gib:.2f} GiB) on the card: the "
                                  f"head as an 8-bit copy ({gib / 2:.2f} GiB), the 16-bit rows from pinned CPU memory")


# ---- the budget -------------------------------------------------------------------------------------

def check_budget(gpu: GpuTarget) -> None:
    """A budget of zero or less, or above the card's memory, is a user error (one message)."""
    if gpu.budget_gib <= 0:
        raise UserError(f"gpu.vram_budget_gib must be more than 0 GiB, got {gpu.budget_gib:g}",
                        hint="leave it unset to use the whole card, or give the GiB this run may use (e.g. 3.5)")
    if not gpu.is_cpu and gpu.total_gib and gpu.budget_gib > gpu.total_gib + 1e-6:
        raise UserError(
            f"gpu.vram_budget_gib = {gpu.budget_gib:g} GiB is more than {gpu.label}'s {gpu.total_gib:.2f} GiB",
            hint="the budget is what the card gives this process, CUDA context included: at most the card's memory",
        )


def target_for_device(cfg, device: dict) -> GpuTarget:
    """The GpuTarget the engine plans for on the device it got (core.model.select_device's dict).

    A named gpu.profile keeps that profile's context assumption (it is the card being planned
    for: a small card simulated on a large one); 'auto' takes the detected card's profile."""
    if device.get("type") != "cuda":
        from core.gpu import cpu_target  # noqa: PLC0415

        return cpu_target()
    total = float(device.get("total_gib") or 0.0)
    cap = tuple(int(x) for x in str(device.get("capability") or "0.0").split("."))
    prof = PROFILES.get((cfg.gpu.profile or "").lower()) or profile_for(device.get("name", ""), total)
    ctx = prof.cuda_context_gib if prof is not None else 0.4
    named = (cfg.gpu.profile or "").lower() in PROFILES
    budget = cfg.gpu.vram_budget_gib
    free = device.get("free_gib")
    if not budget and free is not None:
        # no budget given: what is free now (a desktop may hold some) plus this process's own context,
        # which is already allocated when the free memory is read
        budget_gib, source = min(total, float(free) + ctx), "free"
    else:
        budget_gib, source = (float(budget), "vram") if budget else (total, "card")
    return GpuTarget(
        name=prof.name if (prof is not None and named) else device.get("name", "cuda"),
        label=device.get("name", "cuda"),
        budget_gib=budget_gib,
        bf16=bool(device.get("bf16")),
        compute_capability=(prof.compute_capability if named else cap) if prof is not None else cap,
        fp16_tflops=prof.fp16_tflops if prof else 20.0,
        bandwidth_gbs=prof.bandwidth_gbs if prof else 300.0,
        detected=not named,
        total_gib=total,
        cuda_context_gib=ctx,
        budget_source=source,
    )


# ---- for viewers (`snugtune runs`, the live panel) --------------------------------------------------

PLAN_FILE = "plan.json"


def read_plan(run_dir) -> Optional[dict]:
    """The plan a run's engine executes (its run directory's plan.json), or None before it is written."""
    import json
    from pathlib import Path

    try:
        return json.loads((Path(run_dir) / PLAN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def plan_summary(d: Optional[dict]) -> str:
    """One line for people from a plan dict (plan.json / run_started's `plan`)."""
    if not d:
        return ""
    b = d.get("blocks") or {}
    parts = [f"{d.get('seq_len')} x {d.get('micro_batch')} x {d.get('grad_accum')}"
             + (f" x {d['world_size']} GPUs" if (d.get("world_size") or 1) > 1 else ""),
             f"{d.get('compute_dtype')}", f"{d.get('optimizer')}"]
    if d.get("allocator_cap_gib") is not None:
        parts.append(f"cap {d['allocator_cap_gib']:.2f} GiB")
    parts.append(f"{b.get('checkpointed', '?')} checkpointed / {b.get('kept', 0)} kept"
                 + (" / offloaded" if b.get("offloaded") else ""))
    parts.append("CUDA graphs " + ("on" if d.get("cuda_graphs") else "off"))
    if d.get("attempt"):
        parts.append(f"retry {d['attempt']}: {d.get('retry_why', '')}")
    return ", ".join(parts)
