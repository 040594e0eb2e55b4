"""Memory savers for QLoRA training: what they keep, so the estimator can model them.

Notation: T = tokens in the micro-batch (micro_batch x sequence length), H = hidden size,
I = MLP intermediate size, V = vocabulary size, L = decoder layers, Hq/Hkv = query/kv heads,
D = head dim, c = compute dtype (bf16, or fp16 on pre-Ampere cards; 2 bytes).

1. prepare_for_kbit_training (replaces peft's): the base is frozen and the non-quantized
   weights (embeddings, norms, untied head) STAY in the compute dtype (peft casts them to
   fp32: +2 bytes per such parameter; 0.43 GiB on Qwen2.5-1.5B). LoRA weights stay fp32
   (peft creates them so; 8-bit Adam updates on bf16 weights lose most of their bits), and
   their matmuls run in the compute dtype under autocast. So the residual stream stays
   c (2 bytes/element) instead of the plain recipe's fp32.

2. Chunked linear + cross-entropy (train.chunked_loss): the full T x V logits never exist.
   Only tokens whose shifted label is not -100 are processed, in chunks of `ce_chunk_tokens`
   tokens (chosen so one chunk's c x V logits in fp32 plus two 2-byte copies, +4 bytes a
   logit with Gemma-2's softcapping, take <= 256 MiB, less under a small budget: the plan's
   ce_chunk_tokens, core.plan.ce_chunk_tokens). The gradient w.r.t. the hidden states is computed in the
   forward and kept: T_valid x H in c (2 bytes), plus the selected hidden rows T_valid x H
   in c while the loss runs. A trainable head adds a V x H fp32 gradient accumulator.
   Peak of the loss step: ~ 2*T_valid*H*2 bytes + one chunk (<= 256 MiB).

3. Gradient checkpointing per decoder block (train.gradient_checkpointing): each block
   keeps only its input hidden state, T x H in c (2 bytes/element), L of them; the block
   is recomputed in backward, one at a time (peak: one block's full activations, see 4/5).
   With offload (the plan's offload rule, core.plan.offload_rule: on, or auto when L*T*H*2 bytes
   exceeds 10% of the budget), each block input is copied to pinned CPU memory on a side stream
   right after the block's forward; in backward it is copied back one block ahead (prefetch),
   so ~2 block inputs (2 x T x H x 2 bytes) live on the GPU instead of L (at most two copies
   in flight: ActivationOffloader.MAX_IN_FLIGHT). Host RAM: L x T x H
   x 2 bytes pinned. Offload and selective checkpointing are decided by the plan per
   micro-batch size (plan.blocks_at(T)), not here. Selective checkpointing: when the budget
   allows (short rows), the last `kept` blocks run without checkpointing to skip their
   recompute; each keeps all its activations. The plan keeps as many as fit with the
   estimate (which counts them) within 90% of the budget (core.plan.KEEP_SHARE).

3b. Fused NF4 + LoRA linear (every LoRA'd Linear4bit, plain setups): one autograd node that
   keeps only its input x (the same tensor for q/k/v and for gate/up, so no copy), x A^T
   (T x r) and the adapters' 16-bit copies (r x (in + out) x 2 bytes, made in forward anyway);
   peft keeps a 16-bit copy of x per adapter and clones the output. The dequantized
   weight (out x in, 2 bytes) exists transiently in forward and again in backward. When some
   blocks are un-checkpointed (spare memory), the double-quantized block scales are kept
   expanded in fp32 (+1/8 of the 4-bit weight bytes, ~80 MiB on Qwen2.5-1.5B) to make each
   dequantization one kernel.

4. MLP tiling: when T x I x 2 bytes x 4 exceeds 256 MiB (core.plan.MLP_TILE_BYTES), the MLP runs
   in sequence tiles of `tile` tokens; each tile's intermediates (gate, up, act, product:
   ~4 x tile x I x 2 bytes, x~2 during its backward) exist one tile at a time; the MLP keeps
   only its input (T x H, c) for backward. Without tiling the MLP's backward peak is
   ~ 6-8 x T x I x 2 bytes, the largest per-token term once the logits are gone.

5. Attention ("snug" attention implementation): PyTorch SDPA with is_causal (flash or
   memory-efficient kernel: O(T) memory, no T x T mask); K/V are repeated to Hq heads
   (2 x T x Hq x D x 2 bytes). Packed rows (position_ids restarting per sample) run SDPA
   per sample, so samples never attend across boundaries, again with no T x T mask.
   Gemma-2 (attention logit softcapping, which SDPA lacks) and sliding windows use a
   query-tiled exact attention: per tile of q tokens, scores Hq x q x Tk in fp32 plus
   2-byte copies (q chosen so Hq x q x Tk <= 2^24 elements: <= ~200 MiB), each tile
   checkpointed, so memory is O(T) too.

6. apply_vram_budget caps PyTorch's allocator (set_per_process_memory_fraction) at the plan's
   allocator cap: the budget (what the card gives the process) less the CUDA context.
   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True must be in the environment BEFORE
   CUDA initialises (the launcher sets it); it cuts fragmentation under the cap.
"""
from __future__ import annotations

import contextlib
import math
import os
import types
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from core import plan as P
from core.plan import ATTN_TILE_ELEMS, Plan

IGNORE_INDEX = -100

_ATTN_NAME = "snug"


# ---------------------------------------------------------------------------------------
# Allocator cap
# ---------------------------------------------------------------------------------------

def apply_vram_budget(plan: Plan, device_index: int = 0) -> dict:
    """Cap PyTorch's caching allocator at the plan's allocator cap on one CUDA device.

    The plan's budget (gpu.vram_budget_gib) is what the card gives this process, CUDA context
    included; the context lives outside PyTorch's allocator, so the cap is budget - context
    (plan.allocator_cap_gib). Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the
    environment before CUDA initialises (it cannot be changed afterwards) to limit fragmentation
    under the cap (the launcher, core.runs.spawn, does).
    """
    cap = plan.allocator_cap_gib
    if cap is None or not torch.cuda.is_available():
        return {"vram_cap_gib": None}
    total = torch.cuda.get_device_properties(device_index).total_memory
    frac = max(0.0, min(1.0, cap * 2**30 / total))
    torch.cuda.set_per_process_memory_fraction(frac, device_index)
    return {
        "vram_cap_gib": round(cap, 3),
        "fraction": round(frac, 5),
        "expandable_segments": "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    }


# ---------------------------------------------------------------------------------------
# 16-bit preparation
# ---------------------------------------------------------------------------------------

def _compute_dtype(model) -> torch.dtype:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    dt = getattr(qc, "bnb_4bit_compute_dtype", None) if qc is not None else None
    if isinstance(dt, torch.dtype):
        return dt
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def prepare_for_kbit_training(model, use_gradient_checkpointing: bool = True):
    """Freeze the base and make it ready for adapters, keeping 16-bit weights 16-bit.

    Unlike peft's prepare_model_for_kbit_training, nothing is upcast to fp32: embeddings,
    norms and head stay in the compute dtype (saves 2 bytes per such parameter and keeps the
    activations 2 bytes wide). fp32 leftovers (a model loaded in fp32 with a 16-bit compute
    dtype) are cast down. Input embeddings get an output hook that requires grad, so
    checkpointed blocks see a grad-requiring input.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    cdt = _compute_dtype(model)
    if cdt in (torch.bfloat16, torch.float16):
        for p in model.parameters():
            if p.dtype == torch.float32 and p.__class__.__name__ != "Params4bit":
                p.data = p.data.to(cdt)
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(model, "gradient_checkpointing_enable") or hasattr(model, "activation_checkpointing_enable"):
            # HF's own checkpointing until install_savers replaces it with the offloading one.
            from core.model import checkpointing_enable

            checkpointing_enable(model)
    return model


# ---------------------------------------------------------------------------------------
# Chunked linear + cross-entropy
# ---------------------------------------------------------------------------------------

class _ChunkedLinearCE(torch.autograd.Function):
    """sum over rows of CE(softcap(h @ W^T), y) / divisor, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, softcap, chunk, weights=None):
        # weights (optional, n floats of 0/1): the static-shape path keeps every token and zeroes
        # the ignored ones instead of selecting the valid rows (a selection's size needs a sync)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        n = hidden.shape[0]
        wdt = weight.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        gh = torch.empty_like(hidden) if need_h else None
        # a trainable head's gradient is summed over chunks in (at least) fp32
        gdt = torch.float64 if weight.dtype == torch.float64 else torch.float32
        gw = torch.zeros(weight.shape, dtype=gdt, device=weight.device) if need_w else None
        dev_type = hidden.device.type
        with torch.autocast(dev_type, enabled=False):
            for s in range(0, n, chunk):
                h = hidden[s:s + chunk].to(wdt)
                y = targets[s:s + chunk]
                w8 = weights[s:s + chunk] if weights is not None else None
                p16 = None  # the chunk's logits' gradient, (softmax - onehot) * w8 in the head's dtype
                if CE_TAIL is not None and softcap is None:  # (CE_TAIL: set on CUDA only)
                    # core.kernels: NLL and the logits' gradient in one kernel, over the 16-bit logits
                    # in place (no fp32 copy); the same fp32 arithmetic, see kernels.ce_tail
                    p16 = h @ weight.t()
                    nll = CE_TAIL(p16, y, w8, need_h or need_w)
                else:
                    z = (h @ weight.t()).float()
                    deriv = None
                    if softcap is not None:
                        z.div_(softcap).tanh_()
                        if need_h or need_w:
                            deriv = 1.0 - z * z  # d(cap*tanh(x/cap))/dx
                        z.mul_(softcap)
                    lse = torch.logsumexp(z, dim=-1)
                    nll = lse - z.gather(1, y[:, None]).squeeze(1)
                    if need_h or need_w:
                        p = z.sub_(lse[:, None]).exp_()  # softmax, in place over the logits
                        p[torch.arange(p.shape[0], device=p.device), y] -= 1.0
                        if w8 is not None:
                            p.mul_(w8[:, None])
                        if deriv is not None:
                            p.mul_(deriv)
                            del deriv
                        # the 1/divisor is applied in backward, in fp32: dividing here first would
                        # push small probabilities under fp16's range (fp16 cards, GradScaler)
                        p16 = p.to(wdt)
                        del p
                    del z
                total += (nll * w8).sum() if w8 is not None else nll.sum()
                if need_h:
                    gh[s:s + chunk] = (p16 @ weight).to(gh.dtype)
                if need_w:
                    gw += (p16.t() @ h).to(gdt)
                del p16
                del h
        ctx.save_for_backward(*(t for t in (gh, gw) if t is not None))
        ctx.has = (need_h, need_w)
        ctx.divisor = divisor
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_w = ctx.has
        gh = gw = None
        it = iter(ctx.saved_tensors)
        factor = grad_out.float() / ctx.divisor
        if need_h:
            g = next(it)
            # bf16/fp32: scale in place (no T x H temporary); fp16: through fp32 for its range
            gh = (g.float() * factor).to(g.dtype) if g.dtype == torch.float16 else g.mul_(factor.to(g.dtype))
        if need_w:
            g = next(it)
            gw = g * factor.to(g.dtype)
        return gh, gw, None, None, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    shift_labels: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    softcap: Optional[float] = None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """HF's ForCausalLMLoss(lm_head(hidden), labels) without materialising the logits.

    Same semantics: labels are shifted left (or `shift_labels` used as given), ignore_index
    tokens are skipped, the mean is over non-ignored tokens, or the sum is divided by
    num_items_in_batch when given (gradient accumulation). Gemma-2's final logit
    softcapping is applied before the softmax. Returns 0 (not NaN) when no token counts.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = shift_labels.reshape(-1).to(h.device)
    keep = (y != ignore_index).nonzero().squeeze(1)
    nvalid = keep.numel()
    if num_items_in_batch is not None:
        divisor = num_items_in_batch.to(h.device).float() if torch.is_tensor(num_items_in_batch) \
            else float(num_items_in_batch)
        if torch.is_tensor(divisor):
            divisor = float(divisor.item())
    else:
        divisor = float(max(nvalid, 1))
    if nvalid == 0:
        return (h.sum() * 0.0).float() + (weight.sum() * 0.0 if weight.requires_grad else 0.0)
    hs = h.index_select(0, keep)
    ys = y.index_select(0, keep)
    if chunk_tokens is None:
        chunk_tokens = P.ce_chunk_tokens(weight.shape[0], softcap is not None)
    if not torch.is_tensor(weight):  # core.bigsavers.Int8Head: the 8-bit head, read tile by tile
        return weight.loss(hs, ys, divisor, softcap, int(chunk_tokens))
    return _ChunkedLinearCE.apply(hs, weight, ys, divisor, softcap, int(chunk_tokens))


def chunked_lm_loss_static(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    div_given: torch.Tensor,
    div_per_token: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    softcap: Optional[float] = None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """chunked_lm_loss with shapes and control flow fixed by the input's shape alone (no host sync),
    so that it can be captured in a CUDA graph and replayed on other data of the same shape.

    Every token goes through the head; ignored ones weigh 0. The divisor is a device tensor:
    div_given + div_per_token x (valid tokens, at least 1), so the caller sets (num_items, 0)
    when the Trainer passes num_items_in_batch, or (0, accumulation steps) when it does not.
    """
    shift = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = shift.reshape(-1).to(h.device)
    valid = y != ignore_index
    wts = valid.to(torch.float32)
    divisor = div_given.float() + div_per_token.float() * wts.sum().clamp(min=1.0)
    yc = torch.where(valid, y, torch.zeros_like(y))
    if chunk_tokens is None:
        chunk_tokens = P.ce_chunk_tokens(weight.shape[0], softcap is not None)
    if not torch.is_tensor(weight):  # core.bigsavers.Int8Head (no host sync on its path either)
        return weight.loss(h, yc, divisor, softcap, int(chunk_tokens), wts)
    return _ChunkedLinearCE.apply(h, weight, yc, divisor, softcap, int(chunk_tokens), wts)


# ---------------------------------------------------------------------------------------
# Autocast / RNG bookkeeping for recomputation
# ---------------------------------------------------------------------------------------

def _autocast_state(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return (True, torch.get_autocast_dtype(device_type))
    return (False, None)


def _autocast_ctx(device_type: str, state):
    enabled, dtype = state
    if enabled:
        return torch.autocast(device_type, dtype=dtype)
    return torch.autocast(device_type, enabled=False)


class _RngState:
    """CPU and CUDA RNG state at forward time, restored for the recompute (dropout > 0)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.dev = device
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def fork(self):
        devices = [self.dev] if self.cuda is not None else []
        ctx = torch.random.fork_rng(devices=devices, enabled=True)
        outer = self

        class _C:
            def __enter__(self_inner):
                ctx.__enter__()
                torch.set_rng_state(outer.cpu)
                if outer.cuda is not None:
                    torch.cuda.set_rng_state(outer.cuda, outer.dev)

            def __exit__(self_inner, *a):
                return ctx.__exit__(*a)

        return _C()


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


_NULL = _Null()


# ---------------------------------------------------------------------------------------
# Activation offload to pinned CPU memory
# ---------------------------------------------------------------------------------------

class ActivationOffloader:
    """Keeps each checkpointed block's input in pinned host memory between forward and backward.

    save(i, t): copy t to a pinned buffer on a side stream (the main stream goes on).
    load(i): the tensor back on the GPU (waits for a prefetch if one was started).
    prefetch(i): start copying block i's input back on the side stream.
    On the CPU it just keeps a reference (the autograd path is the same).
    """

    # Copies queued on the side stream but not yet seen finished by the host. A tensor handed to
    # the side stream (record_stream) is reusable only once the host has seen its copy end, and
    # the CPU runs ahead of the GPU by as many blocks as the launch queue holds: unbounded, every
    # block input queued ahead stays on the card until the allocator, short of memory, syncs and
    # frees them (no out-of-memory error, but a full stall, and peaks that vary with timing). The
    # plan prices two inputs on the card (core.estimate): waiting for the copy two back keeps it
    # so, and costs the CPU only lookahead it cannot use. (It was suspected of Gemma-2-2B's 8 GB
    # row, 0.65 GiB over the same run under a 6 GB cap; with the bound that row measured the same,
    # bench/results/fit_truth_run4.json: the cause lies elsewhere.)
    MAX_IN_FLIGHT = 2

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.host: dict[int, torch.Tensor] = {}  # pinned buffers, reused across steps
        self.saved: dict[int, tuple] = {}  # i -> (host view, done event, shape, dtype)
        self.fetched: dict[int, tuple] = {}  # i -> (gpu tensor, ready event)
        self.in_flight: list = []  # events of the side stream's latest copies, oldest first

    def _bound(self, ev) -> None:
        self.in_flight.append(ev)
        while len(self.in_flight) > self.MAX_IN_FLIGHT:
            self.in_flight.pop(0).synchronize()

    def save(self, i: int, t: torch.Tensor) -> None:
        if not self.cuda:
            self.saved[i] = (t.detach(), None, t.shape, t.dtype)
            return
        n = t.numel()
        buf = self.host.get(i)
        if buf is None or buf.numel() < n or buf.dtype != t.dtype:
            buf = torch.empty(n, dtype=t.dtype, pin_memory=True)
            self.host[i] = buf
        view = buf[:n].view(t.shape)
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            view.copy_(t.detach(), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        t.record_stream(self.stream)  # the allocator must not reuse t before the copy ends
        self.saved[i] = (view, ev, t.shape, t.dtype)
        self.fetched.pop(i, None)
        self._bound(ev)

    def prefetch(self, i: int) -> None:
        if not self.cuda or i not in self.saved or i in self.fetched:
            return
        view, ev, shape, dtype = self.saved[i]
        gpu = torch.empty(shape, dtype=dtype, device=self.device)  # on the main stream's pool
        # `gpu` may reuse memory that kernels already queued on the main stream still read
        # (the allocator hands freed blocks back in main-stream order); the side stream must
        # not write it before they ran. Work queued after this point still overlaps the copy.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ev)
            gpu.copy_(view, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        gpu.record_stream(self.stream)
        self.fetched[i] = (gpu, ready)
        self._bound(ready)

    def load(self, i: int) -> torch.Tensor:
        if not self.cuda:
            return self.saved.pop(i)[0]
        self.prefetch(i)
        gpu, ready = self.fetched.pop(i)
        torch.cuda.current_stream(self.device).wait_event(ready)
        self.saved.pop(i, None)
        return gpu

    def has(self, i: int) -> bool:
        return i in self.saved


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class _Recompute:
    # True while a checkpointed block's forward runs again inside its backward (the fused 4-bit
    # linears may then keep their dequantized weight for the backward that follows at once)
    active: bool = False


class _CheckpointBlock(torch.autograd.Function):
    """Run a block without keeping activations; keep (or offload) its input; recompute in backward."""

    @staticmethod
    def forward(ctx, hidden, run, idx, offloader, extras, keep_rng):
        ctx.run, ctx.idx, ctx.off = run, idx, offloader
        ctx.dev_type = hidden.device.type
        ctx.autocast = _autocast_state(ctx.dev_type)
        ctx.rng = _RngState(hidden.device) if keep_rng else None
        with torch.no_grad():
            out = run(hidden)
        if isinstance(out, tuple):
            extras[:] = list(out[1:])
            out = out[0]
        if offloader is not None:
            offloader.save(idx, hidden)
        else:
            ctx.save_for_backward(hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.off is not None:
            hidden = ctx.off.load(ctx.idx)
            # start bringing back the block before this one while this one recomputes
            for j in range(ctx.idx - 1, -1, -1):
                if ctx.off.has(j):
                    ctx.off.prefetch(j)
                    break
        else:
            (hidden,) = ctx.saved_tensors
        x = hidden.detach().requires_grad_(True)
        rng = ctx.rng.fork() if ctx.rng is not None else _Null()
        with torch.enable_grad(), _autocast_ctx(ctx.dev_type, ctx.autocast), rng:
            _Recompute.active = True
            try:
                out = _first(ctx.run(x))
            finally:
                _Recompute.active = False
        torch.autograd.backward(out, grad_out)
        return x.grad, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# Fused 4-bit linear + LoRA
# ---------------------------------------------------------------------------------------

class _QSpec:
    """What one NF4 weight's dequantization needs, looked up once instead of on every call.

    With `absmax` given (the double-quantized block scales already expanded to fp32: 4 bytes per
    64 weights, +12.5% over the 4-bit weights) a dequantization is one kernel instead of three.
    """

    __slots__ = ("weight", "absmax", "dtype", "bias", "keep_w")

    def __init__(self, weight, bias, cache_absmax: bool):
        self.weight = weight
        self.absmax = None
        # spare memory (the same decision as the expanded scales): a recomputed block keeps its
        # dequantized weights from the recompute to its backward (one block's 16-bit weights,
        # ~94 MiB on Qwen2.5-1.5B, ~436 MiB on Llama-3.1-8B, while that block's backward runs)
        self.keep_w = cache_absmax
        qs = weight.quant_state
        self.dtype = qs.dtype
        # the frozen bias in the compute dtype, once (Qwen2's q/k/v have one)
        self.bias = bias.detach().to(qs.dtype) if bias is not None else None
        if cache_absmax and getattr(qs, "nested", False):
            import bitsandbytes.functional as bnbf

            with torch.no_grad():
                a = bnbf.dequantize_blockwise(qs.absmax, qs.state2)
                a += qs.offset
                self.absmax = a.float()


def _dequant(spec: "_QSpec") -> torch.Tensor:
    w = spec.weight
    qs = w.quant_state
    if spec.absmax is not None:
        return torch.ops.bitsandbytes.dequantize_4bit.default(w.data, spec.absmax, qs.blocksize, qs.quant_type,
                                                              qs.shape, qs.dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(w.data, qs)


# The fused node's backward reuses what its forward made: the adapters' 16-bit copies (instead of
# casting the fp32 masters again) and, in a checkpointed block's recompute where memory is spare,
# the dequantized weight (instead of dequantizing it a third time); a power-of-two LoRA scale
# (alpha / r, 2 by default) is applied by the matmul instead of a separate multiply. False: the
# earlier kernels (bench/gpu_time.py measures both in one run; the values are the same bit for
# bit, tests/test_gpu_time_smoke.py checks it).
REUSE_IN_BACKWARD = True
# The recompute's dequantized weight kept for the backward: off. It holds one block's 16-bit
# weights through that block's backward (~94 MiB at Qwen2.5-1.5B, ~436 MiB at Llama-3.1-8B), which
# the estimate does not price and no GPU run has measured; the plan's kept blocks are sized
# without it (KEEP_SHARE), so it could take a run past its budget.
REUSE_DEQUANT_IN_RECOMPUTE = False


# The LoRA term summed into the frozen projection in fp32, rounded to 16 bits once. Before, the
# 16-bit base output was rounded first and the LoRA term added to it (addmm_ into a bf16 tensor):
# a term under half a bf16 step (2^-9 relative) then rounds back to the same bf16 number every
# time, so while B is small (the first updates: lr x ~1 per element against outputs of ~1) most of
# what the adapters learned never reached the forward. Rounded once, the sum keeps the term on
# average (round-to-nearest of a sum is unbiased over many elements). Measured on the real Gemma 3
# 270M weights (bench/lora_sum_precision.py, CPU, bench/results/lora_sum_precision_gemma3_270m.json):
# one Adam step at run 3's step-2 warm-up lr (3.3e-5) moved the bf16 loss 26% as far as fp32's with
# the old sum (an MLP projection kept 13% of the LoRA term), 102% with this one; guarded fp16 95%
# -> 100%. Real_weights run 3 saw it as snugtune bf16 learning slower than guarded fp16 (whose
# step is 8x finer) and the plain recipe (whose bnb output is fp32) in steps 3-10.
# Cost: one T x out fp32 tensor per projection while it runs (+4 bytes an output element,
# transient; core.estimate prices it), one cast kernel more; the backward is unchanged.
LORA_SUM_FP32 = True
_MM_OUT_DTYPE = True  # torch.mm(..., out_dtype=float32) on CUDA (torch >= 2.8); else upcast


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (16-bit operands) with an fp32 result: on CUDA straight from the GEMM's fp32 accumulator."""
    global _MM_OUT_DTYPE
    if a.is_cuda and _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return torch.mm(a.float(), b.float())


def _lora_sum_fp32(xc, W, bias, xa, B, scale: float, dt) -> torch.Tensor:
    """x W^T + b + scale (x A^T) B^T summed in fp32 and rounded to `dt` once (B: the fp32 master)."""
    dev = xc.device.type
    if torch.is_autocast_enabled(dev):  # (the Trainer's forward): autocast would make the fp32 matmuls 16-bit
        with torch.autocast(dev, enabled=False):
            return _lora_sum_fp32_body(xc, W, bias, xa, B, scale, dt)
    return _lora_sum_fp32_body(xc, W, bias, xa, B, scale, dt)


def _lora_sum_fp32_body(xc, W, bias, xa, B, scale: float, dt) -> torch.Tensor:
    x2 = xc.reshape(-1, xc.shape[-1])
    o = _mm_f32(x2, W.t())
    if LORA_EPILOGUE is not None and o.is_cuda:  # core.kernels: the rest of the sum in one pass, rounded once
        return LORA_EPILOGUE(o, xa.reshape(-1, xa.shape[-1]), B, bias, scale, dt).view(*xc.shape[:-1], o.shape[-1])
    o.addmm_(xa.reshape(-1, xa.shape[-1]).float(), B.float().t(), alpha=scale)
    if bias is not None:
        o.add_(bias)
    return o.to(dt).view(*xc.shape[:-1], o.shape[-1])


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """(a @ b) * scale, rounded as `torch.mm(a, b).mul_(scale)` rounds it.

    A power-of-two scale commutes with rounding, so the matmul applies it itself (alpha, beta 0:
    the empty input is never read): one kernel instead of two, the same bits. Any other scale
    keeps the separate multiply (folding it in would round once instead of twice)."""
    if REUSE_IN_BACKWARD and scale > 0 and math.frexp(scale)[0] == 0.5:
        return torch.addmm(a.new_empty((a.shape[0], b.shape[1])), a, b, beta=0, alpha=scale)
    return torch.mm(a, b).mul_(scale)


class _LoRA4bitLinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W in NF4, as one autograd node.

    Same math as peft's Linear4bit (bitsandbytes dequantizes W and runs a 16-bit matmul), with
    fewer kernels and less Python per call: W is dequantized once in forward and once in
    backward, the adapters (fp32 masters) run in the compute dtype, and only x (shared by the
    projections that read the same input) and x A^T (T x r) are kept for backward; peft keeps
    a 16-bit copy of x per adapter and clones the output. On a launch-bound GPU the Python per
    call is the cost, so the body avoids context managers and attribute chains.
    """

    @staticmethod
    def forward(ctx, x, A, B, spec, scale):
        dt = spec.dtype
        xc = x if x.dtype == dt else x.to(dt)
        W = _dequant(spec)
        # every operand is already in dt, so an ambient autocast of dt changes nothing; any
        # other autocast (a different dtype) is switched off around the matmuls
        guard = x.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") != dt
        with (torch.autocast("cuda", enabled=False) if guard else _NULL):
            out = None if (LORA_SUM_FP32 and dt != torch.float32) else F.linear(xc, W, spec.bias)
            ctx.w = W if (REUSE_DEQUANT_IN_RECOMPUTE and REUSE_IN_BACKWARD and spec.keep_w and _Recompute.active) else None
            a16 = A.to(dt)
            b16 = B.to(dt)
            xa = F.linear(xc, a16)
            if LORA_SUM_FP32 and dt != torch.float32:
                out = _lora_sum_fp32(xc, W, spec.bias, xa, B, scale, dt)
            else:
                out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), b16.t(), alpha=scale)
            del W
        if REUSE_IN_BACKWARD:
            # the adapters' 16-bit copies (2 bytes x r x (in + out), 1/2 of the fp32 masters) serve
            # the backward too: two cast kernels fewer per projection, the same values
            ctx.save_for_backward(xc, xa, a16, b16)
        else:
            ctx.save_for_backward(xc, xa, A, B)
        ctx.spec, ctx.scale, ctx.xdtype, ctx.wdtypes = spec, scale, x.dtype, (A.dtype, B.dtype)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        # backward runs outside any autocast region (autograd's engine threads), no guard needed
        xc, xa, A, B = ctx.saved_tensors  # A, B: the 16-bit copies (or the masters, cast here)
        adt, bdt = ctx.wdtypes
        dt = xc.dtype
        g2 = g.reshape(-1, g.shape[-1])
        if g2.dtype != dt:
            g2 = g2.to(dt)
        x2 = xc.reshape(-1, xc.shape[-1])
        gxa = _mm_scaled(g2, B.to(dt), ctx.scale)  # d loss / d (x A^T)
        dB = dA = dx = None
        need = ctx.needs_input_grad
        if need[2]:
            dB = _mm_scaled(g2.t(), xa.reshape(-1, xa.shape[-1]), ctx.scale).to(bdt)
        if need[1]:
            dA = torch.mm(gxa.t(), x2).to(adt)
        if need[0]:
            W = ctx.w if ctx.w is not None else _dequant(ctx.spec)
            ctx.w = None
            dx = torch.mm(g2, W)
            del W
            dx.addmm_(gxa, A.to(dt))
            dx = dx.view(xc.shape)
            if dx.dtype != ctx.xdtype:
                dx = dx.to(ctx.xdtype)
        return dx, dA, dB, None, None


def fuse_lora_4bit(model, cache_absmax: bool = False) -> int:
    """Route peft's LoRA-on-Linear4bit layers through _LoRA4bitLinear where the setup is plain
    (one active adapter, no dropout, no DoRA/bias variants, not merged); others keep peft's path."""
    n = 0
    for mod in model.modules():
        base = getattr(mod, "base_layer", None)
        if base is None or not hasattr(mod, "lora_A") or "forward" in mod.__dict__:
            continue
        w = getattr(base, "weight", None)
        if w is None or w.__class__.__name__ != "Params4bit" or getattr(w, "quant_state", None) is None:
            continue
        orig = mod.forward
        spec = _QSpec(w, base.bias, cache_absmax)

        def forward(x, *args, _mod=mod, _orig=orig, _spec=spec, **kwargs):
            m = _mod
            # plain setups only; anything else (adapters off or merged, several adapters, DoRA,
            # dropout, adapter bias) takes peft's own path
            act = m.active_adapters
            if (m.disable_adapters or m.merged_adapters or kwargs.get("adapter_names") is not None
                    or len(act) != 1 or act[0] not in m.lora_A or act[0] in getattr(m, "lora_variant", ())):
                return _orig(x, *args, **kwargs)
            name = act[0]
            drop = m.lora_dropout[name]
            if (isinstance(drop, torch.nn.Dropout) and drop.p > 0 and m.training) or \
                    m.lora_B[name].bias is not None:
                return _orig(x, *args, **kwargs)
            return _LoRA4bitLinear.apply(x, m.lora_A[name].weight, m.lora_B[name].weight, _spec,
                                         float(m.scaling[name]))

        forward._snug_orig = orig
        mod.forward = forward
        n += 1
    return n


# ---------------------------------------------------------------------------------------
# MLP tiling
# ---------------------------------------------------------------------------------------

class _TiledMLP(torch.autograd.Function):
    """MLP over sequence tiles; keeps only its input, recomputes each tile in backward."""

    @staticmethod
    def forward(ctx, x, run, tile):
        ctx.run, ctx.tile = run, tile
        ctx.dev_type = x.device.type
        ctx.autocast = _autocast_state(ctx.dev_type)
        with torch.no_grad():
            out = _tiled_no_grad(run, x, tile)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        gx = torch.empty_like(x)
        T = x.shape[-2]
        for s in range(0, T, ctx.tile):
            xs = x[..., s:s + ctx.tile, :].detach().requires_grad_(True)
            with torch.enable_grad(), _autocast_ctx(ctx.dev_type, ctx.autocast):
                o = ctx.run(xs)
            torch.autograd.backward(o, g[..., s:s + ctx.tile, :])
            gx[..., s:s + ctx.tile, :] = xs.grad
            del xs, o
        return gx, None, None


def _tiled_no_grad(run, x, tile):
    T = x.shape[-2]
    out = None
    for s in range(0, T, tile):
        o = run(x[..., s:s + tile, :])
        if out is None:
            out = torch.empty(x.shape[:-1] + o.shape[-1:], dtype=o.dtype, device=o.device)
        out[..., s:s + tile, :] = o
    return out


def tiled_mlp_forward(mlp: torch.nn.Module, intermediate: int, min_tokens: Optional[int] = None,
                      tile: Optional[int] = None, whole_below: Optional[Callable[[int], int]] = None):
    """Wrap mlp.forward so that long inputs run in sequence tiles (see _TiledMLP); rows shorter
    than `min_tokens`, or whole_below(batch) (the plan's Plan.mlp_whole_below), or two tiles run whole."""
    orig = mlp.forward

    def forward(x, *args, **kwargs):
        T = x.shape[-2]
        batch = int(x.numel() // (x.shape[-1] * T)) if x.dim() > 2 else 1
        t = tile or P.mlp_tile_tokens(intermediate, batch)
        if T < (min_tokens or (whole_below(batch) if whole_below else 2 * t)):
            return orig(x, *args, **kwargs)
        run = (lambda xs: orig(xs, *args, **kwargs))
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in mlp.parameters())):
            return _TiledMLP.apply(x, run, t)
        return _tiled_no_grad(run, x, t)

    forward._snug_orig = orig
    forward._snug_tiled = True
    mlp.forward = forward
    return mlp


# ---------------------------------------------------------------------------------------
# Attention: SDPA, per-sample SDPA for packed rows, query-tiled exact attention (softcap)
# ---------------------------------------------------------------------------------------

class _PackState:
    # Per micro-batch: the sample boundaries of each row, set by the patched forward and read
    # by the attention (including during the backward's recompute of the same micro-batch).
    segments: Optional[list] = None  # per row: list of (start, end); None when no row is packed
    # Static mode (CUDA-graph steps, core.graphs): no host sync anywhere, so the boundaries stay
    # on the device as a sample id per token, and the loss is the static one with this divisor.
    static: bool = False
    seg_ids: Optional[torch.Tensor] = None  # (B, T) int, or None for unpacked, unpadded rows
    div_given: Optional[torch.Tensor] = None
    div_per_token: Optional[torch.Tensor] = None
    # (seg_ids it was built from, the B x 1 x T x T additive mask): one mask a micro-batch, shared by every
    # block's attention (see _static_mask)
    static_mask: Optional[tuple] = None


@contextlib.contextmanager
def static_mode(div_given: torch.Tensor, div_per_token: torch.Tensor):
    """Run the static-shape path (CUDA-graph steps, core.graphs): no host sync anywhere;
    loss = sum / (div_given + div_per_token x valid tokens). Restores the normal path on exit."""
    st = _PackState
    st.static, st.div_given, st.div_per_token = True, div_given, div_per_token
    try:
        yield
    finally:
        st.static, st.seg_ids, st.div_given, st.div_per_token = False, None, None, None
        st.static_mask = None


def _sample_starts(position_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor]):
    """(B, T) booleans, True where a new sample starts: position ids that do not continue, or
    where the attention mask changes (padding). None when neither is given. No host sync."""
    if position_ids is None and attention_mask is None:
        return None
    if position_ids is not None and position_ids.dim() == 1:
        position_ids = position_ids[None]
    ref = position_ids if position_ids is not None else attention_mask
    B, T = ref.shape[0], ref.shape[-1]
    starts = torch.zeros((B, T), dtype=torch.bool, device=ref.device)
    if position_ids is not None:
        pid = position_ids.expand(B, T) if position_ids.shape[0] != B else position_ids
        starts[:, 1:] |= pid[:, 1:] != pid[:, :-1] + 1
    if attention_mask is not None and attention_mask.dim() == 2:
        am = attention_mask.bool()
        starts[:, 1:] |= am[:, 1:] != am[:, :-1]
    return starts


def _segment_ids(position_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor]):
    """_row_segments without leaving the device: a (B, T) sample index per token (no sync)."""
    starts = _sample_starts(position_ids, attention_mask)
    return None if starts is None else starts.cumsum(-1, dtype=torch.int32)


def _row_segments(position_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor]):
    """Sample boundaries per row from position ids that restart per sample (and padding)."""
    starts = _sample_starts(position_ids, attention_mask)
    if starts is None:
        return None
    B, T = starts.shape
    if not bool(starts.any()):
        return None
    rows = []
    for b in range(B):
        cut = starts[b].nonzero().squeeze(1).tolist()
        edges = [0] + cut + [T]
        rows.append([(edges[k], edges[k + 1]) for k in range(len(edges) - 1) if edges[k + 1] > edges[k]])
    return rows


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def _score_tile(q, k, v, scaling, softcap, q0, window, seg_q, seg_k):
    # q: (B, Hkv, g*c, D) viewed per kv head; k/v: (B, Hkv, Tk, D)
    B, Hkv, gc, D = q.shape
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    c = seg_q.shape[-1]
    Tk = k.shape[-2]
    qi = torch.arange(q0, q0 + c, device=q.device)[:, None]
    kj = torch.arange(Tk, device=q.device)[None, :]
    allowed = kj <= qi
    if window is not None:
        allowed = allowed & (qi - kj < window)
    allowed = allowed[None] & (seg_q[:, :, None] == seg_k[:, None, :])  # (B, c, Tk)
    g = gc // c
    allowed = allowed[:, None, None].expand(B, 1, g, c, Tk).reshape(B, 1, gc, Tk)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.matmul(p, v)


def _eager(fn):
    # Python loops over tiles/samples: keep them out of torch.compile's graphs (they would
    # recompile for every new sample layout); the kernels inside run as usual.
    dis = getattr(getattr(torch, "compiler", None), "disable", None)
    return dis(fn) if dis is not None else fn


@_eager
def _tiled_attention(query, key, value, scaling, softcap, window, segments):
    """Exact causal attention tiled over queries; each tile checkpointed. O(T) memory."""
    B, Hq, Tq, D = query.shape
    Hkv, Tk = key.shape[1], key.shape[-2]
    g = Hq // Hkv
    if torch.is_tensor(segments):  # static mode: sample ids per token already
        seg, segments = segments, None
    else:
        seg = torch.zeros((B, Tk), dtype=torch.int32, device=query.device)
    if segments is not None:
        for b, row in enumerate(segments):
            for n, (s0, s1) in enumerate(row):
                seg[b, s0:s1] = n
    c = max(16, min(Tq, ATTN_TILE_ELEMS // max(1, Hq * Tk)))
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    offset = Tk - Tq  # queries are the last Tq positions
    # query tiles by split and the output by cat, not slices written into a buffer: each slice's
    # backward made a zero-filled gradient of the whole query, and each write cloned the whole output
    # gradient (1-2 q-wide tensors more; Gemma-3-1B at 32,768 tokens, 64 MiB each, measured 0.14 GiB
    # over its estimate in fit_truth run 5); the same values, tests/test_fit_truth_attention.py
    outs = []
    for q0, qc in zip(range(0, Tq, c), query.split(c, dim=2)):
        cc = qc.shape[2]
        qv = qc.reshape(B, Hkv, g, cc, D).reshape(B, Hkv, g * cc, D)
        k_hi = offset + q0 + cc
        k_lo = 0 if window is None else max(0, offset + q0 - window + 1)
        ks, vs = key[:, :, k_lo:k_hi], value[:, :, k_lo:k_hi]
        sq = seg[:, offset + q0:offset + q0 + cc]
        sk = seg[:, k_lo:k_hi]
        args = (qv, ks, vs, scaling, softcap, offset + q0 - k_lo, window, sq, sk)
        if grad:
            o = torch.utils.checkpoint.checkpoint(_score_tile, *args, use_reentrant=False)
        else:
            o = _score_tile(*args)
        outs.append(o.reshape(B, Hkv, g, cc, D).reshape(B, Hq, cc, D))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def snug_attention(module, query, key, value, attention_mask=None, dropout: float = 0.0, scaling=None,
                   softcap=None, sliding_window=None, **kwargs):
    """transformers attention interface: (B, H, T, D) in, (B, T, H, D) out, no T x T mask."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    Tq, Tk = query.shape[-2], key.shape[-2]
    if _PackState.static:
        seg = _PackState.seg_ids if Tq == Tk else None
        segments = seg if (seg is not None and seg.shape[0] == query.shape[0]) else None
    else:
        segments = _PackState.segments if Tq == Tk else None
        if segments is not None and len(segments) != query.shape[0]:
            segments = None
    window = sliding_window if (sliding_window and Tk > sliding_window) else None
    if not module.training:
        dropout = 0.0
    if softcap is not None or window is not None:
        out = _tiled_attention(query, key, value, scaling, softcap, window, segments)
        return out.transpose(1, 2).contiguous(), None
    g = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, g), _repeat_kv(value, g)
    if torch.is_tensor(segments):
        # static mode, packed or padded rows: one SDPA call with a causal, same-sample mask built on
        # the device (static mode is only used for short rows, see core.graphs)
        mask = _static_mask(segments, Tq, query.dtype)
        o = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        return o.transpose(1, 2).contiguous(), None
    if segments is None:
        if Tq != Tk and attention_mask is not None and torch.is_tensor(attention_mask):
            o = F.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask[..., :Tk].bool()
                                               if attention_mask.dtype == torch.bool else attention_mask,
                                               dropout_p=dropout, scale=scaling)
        else:
            o = F.scaled_dot_product_attention(query, k, v, is_causal=Tq == Tk and Tq > 1,
                                               dropout_p=dropout, scale=scaling)
        return o.transpose(1, 2).contiguous(), None
    return _per_sample_attention(query, k, v, segments, dropout, scaling), None


def _static_mask(segments: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """The causal, same-sample additive mask (0 / -inf, B x 1 x T x T in the attention's dtype) for the
    sample ids `segments`, built once a micro-batch and shared by every block.

    A boolean mask built in each block's attention cost one B x T x T tensor a block that keeps its
    activations: SDPA turns a boolean mask into an additive one in the query's dtype on every call and the
    attention's backward saves that copy (fit_truth run 7: SmolLM2-1.7B at 8,192 tokens with 11
    un-checkpointed blocks held ~64 MiB a kept block more than the estimate's count; 1 byte a score
    element is 64 MiB there). Built here in the query's dtype, SDPA uses it as it is, and every block's
    backward saves the same tensor. Its rows are padded to a multiple of 16 elements (a view of the first
    T): the memory-efficient kernel copies a bias whose strides are not aligned."""
    st = _PackState
    cached = st.static_mask
    if cached is not None and cached[0] is segments and cached[1].dtype == dtype and cached[1].shape[-1] == T:
        return cached[1]
    pos = torch.arange(T, device=segments.device)
    blocked = (pos[None, :, None] >= pos[None, None, :]) & (segments[:, :, None] == segments[:, None, :])
    blocked.logical_not_()
    padded = -(-T // 16) * 16
    bias = torch.zeros((segments.shape[0], 1, T, padded), dtype=dtype, device=segments.device)[..., :T]
    bias.masked_fill_(blocked[:, None], float("-inf"))
    del blocked
    st.static_mask = (segments, bias)
    return bias


def _varlen_backends():
    # cuDNN attention builds an execution plan per new shape: with every sample a new length
    # that costs far more than the attention itself, so packed rows use flash / efficient.
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    except Exception:  # older torch: whatever SDPA picks
        return _Null()


@_eager
def _per_sample_attention(query, k, v, segments, dropout, scaling):
    with _varlen_backends():
        return _per_sample_attention_inner(query, k, v, segments, dropout, scaling)


def _per_sample_attention_inner(query, k, v, segments, dropout, scaling):
    # split + cat, not slices written into an output buffer: a slice's backward makes a zero-filled
    # gradient of the whole q / k / v for each sample (and the buffer's writes clone the whole output
    # gradient), so packed rows of several samples held ~2 q-wide tensors more than one sample's row;
    # split's backward is one cat. Measured: Llama-3.2-3B at 32k tokens, 8 GB card, 7.11 GiB allocated
    # on packed rows where one sample a row took 6.90 (fit_truth runs 4 and 5); on the CPU with O(T)
    # attention, tests/test_fit_truth_attention.py: 12 or 32 samples a row, two q-wide tensors less.
    rows = []
    for qb, kb, vb, row in zip(query.split(1, 0), k.split(1, 0), v.split(1, 0), segments):
        sizes = [s1 - s0 for s0, s1 in row]
        parts = [F.scaled_dot_product_attention(qs, ks, vs, is_causal=n > 1, dropout_p=dropout, scale=scaling)
                 for qs, ks, vs, n in zip(qb.split(sizes, 2), kb.split(sizes, 2), vb.split(sizes, 2), sizes)]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    o = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return o.transpose(1, 2).contiguous()


def _snug_mask(*args, **kwargs):
    # The "snug" attention builds its own causal/sample/window structure, so no mask is made
    # (an explicit T x T mask is exactly what it avoids).
    return None


_REGISTERED = False


def register_attention() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_ATTN_NAME, snug_attention)
    AttentionMaskInterface.register(_ATTN_NAME, _snug_mask)
    _REGISTERED = True


# ---------------------------------------------------------------------------------------
# install_savers
# ---------------------------------------------------------------------------------------

def _unwrap(model):
    m = model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def _decoder_layers(hf) -> Optional[torch.nn.ModuleList]:
    inner = getattr(hf, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return inner.layers
    best = None
    for _, mod in hf.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and \
                type(mod[0]).__name__.endswith("DecoderLayer"):
            best = mod
            break
    return best


def _patch_loss(hf) -> tuple[bool, str]:
    cfgm = hf.config
    mt = getattr(cfgm, "model_type", "")
    if mt not in P.CHUNKABLE:
        return False, f"model type {mt!r} has a custom head; using its own loss"
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or not head.weight.is_floating_point():
        return False, "the output layer is adapted or quantized; using the model's own loss"
    if getattr(head, "bias", None) is not None:
        return False, "the output layer has a bias; using the model's own loss"
    softcap = getattr(cfgm, "final_logit_softcapping", None)
    orig = hf.forward
    base = getattr(hf, "model")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                num_items_in_batch=None, shift_labels=None, logits_to_keep=0, **kwargs):
        static = _PackState.static and labels is not None and shift_labels is None
        if static:
            _PackState.segments = None
            _PackState.seg_ids = _segment_ids(position_ids, attention_mask)
            _PackState.static_mask = None  # built by the first block's attention, for this micro-batch
        else:
            _PackState.segments = _row_segments(position_ids, attention_mask)
        if labels is None and shift_labels is None:
            return orig(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("return_dict", None)
        kwargs.setdefault("use_cache", False)
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        # the 8-bit head when core.bigsavers holds one (the 16-bit weight is then off the card)
        w = getattr(self, "_snug_qhead", None) or self.get_output_embeddings().weight
        if static:
            loss = chunked_lm_loss_static(hidden, w, labels, _PackState.div_given, _PackState.div_per_token,
                                          softcap=softcap, chunk_tokens=self._snug_ce_chunk)
        else:
            loss = chunked_lm_loss(hidden, w, labels, shift_labels=shift_labels,
                                   num_items_in_batch=num_items_in_batch, softcap=softcap,
                                   chunk_tokens=self._snug_ce_chunk)
        return CausalLMOutputWithPast(loss=loss, logits=None,
                                      past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    forward._snug_orig = orig
    hf.forward = types.MethodType(forward, hf)
    return True, f"chunked (softcap {softcap})" if softcap else "chunked"


def _has_dropout(model) -> bool:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
    c = getattr(model, "config", None)
    return bool(getattr(c, "attention_dropout", 0.0) or 0.0)


def _wrap_block(layer, idx: int, state: dict):
    orig = layer.forward

    def forward(hidden_states, *args, **kwargs):
        if not (torch.is_grad_enabled() and layer.training) or idx >= state["upto"](hidden_states):
            return state["compiled"].get(idx, orig)(hidden_states, *args, **kwargs)
        if not hidden_states.requires_grad:
            hidden_states = hidden_states.detach().requires_grad_(True)
        extras: list = []
        fn = state["compiled"].get(idx, orig)
        run = (lambda h: fn(h, *args, **kwargs))
        off = state["offloader"] if state["offload_now"](hidden_states) else None
        out = _CheckpointBlock.apply(hidden_states, run, idx, off, extras, state["keep_rng"])
        return (out, *extras) if extras else out

    forward._snug_orig = orig
    layer.forward = forward


def install_savers(model, plan: Plan) -> dict:
    """Patch a (peft-wrapped) causal LM in place with the memory savers the plan decided.

    Nothing here reads the configuration: the loss (chunked, chunk size), checkpointing and, per
    micro-batch size, which blocks are kept un-checkpointed or offloaded (plan.blocks_at), MLP
    tiles, the fused 4-bit LoRA path and its cached block scales, and torch.compile all come
    from `plan` (core.plan). An out-of-memory retry installs the retry's plan (plan.after_oom()).
    Returns what was applied (for the event log).
    """
    # idempotent: a second install replaces the first instead of stacking on it (weights that
    # core.bigsavers moved stay where they are until its install below decides for the new plan)
    uninstall_savers(model, _keep_moved_weights=True)
    hf = _unwrap(model)
    applied: dict[str, Any] = {}
    hfc = hf.config
    text_cfg = hfc.get_text_config() if hasattr(hfc, "get_text_config") else hfc
    I = int(getattr(text_cfg, "intermediate_size", 0) or 0)
    try:
        dev = next(p.device for p in hf.parameters())
    except StopIteration:
        dev = torch.device("cpu")
    on_cuda = dev.type == "cuda"

    # attention
    impl = getattr(hfc, "_attn_implementation", None)
    if impl in (None, "sdpa", "eager"):
        register_attention()
        hfc._attn_implementation = _ATTN_NAME
        if text_cfg is not hfc:
            text_cfg._attn_implementation = _ATTN_NAME
        applied["attention"] = f"snug (was {impl})"
    else:
        applied["attention"] = impl

    # chunked loss
    if plan.chunked_loss:
        ok, why = _patch_loss(hf)
        hf._snug_ce_chunk = plan.ce_chunk_tokens
        applied["loss"] = why
        if ok:
            applied["ce_chunk_tokens"] = hf._snug_ce_chunk
    else:
        applied["loss"] = "model's own (" + plan.loss_why + ")"

    layers = _decoder_layers(hf)
    keep = 0
    if plan.gradient_checkpointing and layers is not None:
        L = len(layers)
        # replace HF's checkpointing with ours
        if hasattr(hf, "gradient_checkpointing_disable") or hasattr(hf, "activation_checkpointing_disable"):
            from core.model import checkpointing_disable

            try:
                checkpointing_disable(hf)
            except Exception:  # some wrappers refuse; turning the layer flags off is enough
                pass
        for lyr in layers:
            if hasattr(lyr, "gradient_checkpointing"):
                lyr.gradient_checkpointing = False
        may_offload = plan.offload_mode == "on" or (plan.offload_mode == "auto" and on_cuda)
        offloader = ActivationOffloader(dev) if may_offload else None
        blocks_cache: dict[int, Any] = {}

        def blocks(h: torch.Tensor):
            # decided per micro-batch size: packed rows and eval batches differ from the planned one
            tokens = h.numel() // h.shape[-1]
            if tokens not in blocks_cache:
                blocks_cache[tokens] = plan.blocks_at(tokens)
            return blocks_cache[tokens]

        def upto(h: torch.Tensor) -> int:
            return L - min(L, blocks(h).kept)

        planned = plan.blocks_at(plan.tokens)
        keep = min(L, planned.kept)
        state = {
            "offloader": offloader,
            "offload_now": (lambda h: offloader is not None and blocks(h).offloaded),
            "keep_rng": _has_dropout(hf),
            "upto": upto,
            "compiled": {},
        }
        if plan.compile and on_cuda:
            # regional compile: each block's own forward (the same code for every block, so one
            # compilation serves all); the checkpoint/offload logic stays eager around it
            for i, lyr in enumerate(layers):
                state["compiled"][i] = torch.compile(lyr.forward, dynamic=None)
            applied["compile"] = "per decoder block"
        for i, lyr in enumerate(layers):
            _wrap_block(lyr, i, state)
        hf._snug_ckpt_state = state
        applied["checkpointing"] = f"{L - keep}/{L} blocks" + (
            ", inputs offloaded to pinned CPU memory" if planned.offloaded else "")
        applied["offload"] = planned.offloaded
        applied["uncheckpointed_blocks"] = keep  # at the planned micro-batch; none for longer rows
    else:
        applied["checkpointing"] = "off"

    if plan.fused_lora:
        # expanded block scales cost 1/8 of the 4-bit weights: worth it only where memory is
        # spare, i.e. where the plan keeps some blocks un-checkpointed (the estimate counts them)
        cache = bool(plan.cached_block_scales and keep > 0)
        n = fuse_lora_4bit(model, cache_absmax=cache)
        applied["fused_lora_4bit"] = n
        applied["cached_block_scales"] = cache

    applied["kernels"] = _install_kernels(hf, plan, dev)

    # MLP tiling (only worth it under checkpointing: otherwise every tile's intermediates are kept)
    if layers is not None and I and plan.mlp_tile_tokens and applied.get("checkpointing", "off") != "off":
        n = 0
        for lyr in layers:
            mlp = getattr(lyr, "mlp", None)
            # tiled once; core.kernels' fused MLP (patched just before) is tiled like transformers' own
            if mlp is not None and not getattr(mlp.forward, "_snug_tiled", False):
                tiled_mlp_forward(mlp, I, whole_below=plan.mlp_whole_below)
                n += 1
        t = plan.mlp_tile_tokens
        applied["mlp_tiling"] = f"tiles of {t} tokens beyond {plan.mlp_whole_below(plan.micro_batch)}" if n else "off"
    # 7-9B models on small cards: the embedding's rows from CPU memory, the 8-bit head
    from core import bigsavers

    applied.update(bigsavers.install(hf, plan))
    return applied


# core.kernels.lora_epilogue while the kernels are installed, else None: the fused NF4 + LoRA node's fp32
# sum (base + scale (x A^T) B^T + bias, rounded once) in one pass instead of an fp32 addmm_, an add
# and a cast (set here; read by the fp32 LoRA sum where that exists)
LORA_EPILOGUE: Optional[Callable] = None
# core.kernels.ce_tail while the kernels are installed, else None: the chunked loss's per-chunk tail
# (log-sum-exp, NLL, softmax - onehot, the cast) in one kernel over the 16-bit logits, in place
CE_TAIL: Optional[Callable] = None


def _install_kernels(hf, plan: Plan, dev: torch.device) -> str:
    global LORA_EPILOGUE, CE_TAIL
    LORA_EPILOGUE = CE_TAIL = None
    what = _install_kernels_on(hf, plan, dev)
    if what.startswith("triton:"):
        from core import kernels

        LORA_EPILOGUE = kernels.lora_epilogue
        CE_TAIL = kernels.ce_tail
    return what


def _install_kernels_on(hf, plan: Plan, dev: torch.device) -> str:
    """core.kernels' fused RMSNorm, SwiGLU / GeGLU and rotary (Triton) on CUDA, when Triton imports;
    SNUGTUNE_KERNELS=off keeps transformers' path. Before the MLP tiling (which then tiles the fused
    MLP) and core.bigsavers' lean norms (which leave a kernel's norm alone: it keeps less than
    theirs). With the fp16 guard the norms stay the guard's (it patches them after the savers)."""
    if not plan.kernels:  # the plan's decision and its reason (core.plan._kernels)
        return f"off: {plan.kernels_why}"
    if dev.type != "cuda":  # a plan made for a GPU, run elsewhere (a test, a bench)
        return "off: not on a CUDA device"
    try:
        from core import kernels
    except Exception as exc:  # noqa: BLE001 - no Triton (or a broken one): transformers' path
        return f"off: triton did not import ({type(exc).__name__})"
    return kernels.install(hf, norms=not plan.fp16_guard)


def uninstall_savers(model, _keep_moved_weights: bool = False) -> None:
    """Undo install_savers' patches (the model's own forward functions come back, and the 16-bit
    embedding and head core.bigsavers moved go back to the card)."""
    hf = _unwrap(model)
    for mod in [hf, *hf.modules()]:
        f = mod.__dict__.get("forward")
        if f is not None and hasattr(f, "_snug_orig"):
            del mod.__dict__["forward"]
    if not _keep_moved_weights:
        from core import bigsavers

        bigsavers.restore(hf)
