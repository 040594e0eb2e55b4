"""Savers for 7-9B models on 6-12 GB cards: what their 1-2 GB embedding and output layer cost.

A 7-9B model's 16-bit input embedding and untied output layer are each about 1 GiB
(Llama-3.1-8B: 128,256 x 4,096 x 2 bytes = 0.98 GiB; Gemma-2-9B's tied one 1.71 GiB): on an
8 GB card, beside 3.35 GiB of 4-bit blocks, they decide how long a row can be. Both are frozen
under LoRA, so neither needs a gradient, only its forward use:

1. CPU embedding (plan.cpu_embedding): the V x H weight lives in pinned CPU memory; each batch
   copies only its T rows to the card (T x H x 2 bytes, what the embedding's output is anyway).
   A lookup is a copy, so the rows are bit-for-bit the ones the card would have read. The
   parameter stays registered with an empty tensor on the card (device and dtype queries still
   answer as before; nothing moves it back).
2. 8-bit head (plan.head_8bit): the output layer as int8 rows with one fp32 scale per row
   (absmax / 127: V x H + 4 V bytes, half the 16-bit weight). The chunked loss reads it in
   tiles of `vocab tile` rows, each cast to the compute dtype (int8 values are exact in bf16,
   fp16 and fp32) right before its matmul, and combines the tiles with an online logsumexp:
   per token chunk one pass for the loss, one for the hidden states' gradient, so no full
   16-bit copy of the head and no T x V logits ever exist. The head is frozen: no V x H
   gradient. With tied weights the 8-bit copy is the head and the 16-bit original stays on the
   CPU for the embedding (the plan turns both on together for tied models).

3. Lean RMSNorm (plan.lean_norms, with the two above on Llama / Qwen2 / Qwen3 / Mistral blocks):
   transformers' RMSNorm keeps an fp32 copy of its input for backward (4 bytes x hidden a token,
   two norms a block: 8 h bytes); the lean one keeps the 16-bit input (which the recomputed block
   holds anyway for the first norm, a 2 h-byte residual for the second) and 1/rms (4 bytes a
   token), and rebuilds the fp32 values in its backward, a few thousand rows at a time. Its
   forward is the same sequence of operations (the same numbers); its backward is the same
   formula in another order (fp32 rounding). In a recomputed block: 6 h bytes a token less.
   Its output is not kept either: the attention's q/k/v projections and the MLP save the norm's
   output for their backward (2 h bytes each), and it is rebuilt from what the norm keeps anyway
   (its 16-bit input and 1/rms) when their backward asks for it (saved-tensor hooks around the
   attention and the MLP: _NormOutput). The rebuilt rows are bit for bit the forward's (the same
   operations on the same values), so the math does not move; 4 h bytes a token less again, and
   neither output exists during the attention's backward, the block's largest moment on long
   rows. The cost: one elementwise pass over T x h per consumer's backward.

Quantization error of the head, the only difference from the 16-bit run: each weight moves by
at most half a step, absmax(row) / 254, so a logit moves by at most sum_j |h_j| x that, and the
cross-entropy by at most twice the largest logit change (tests/test_bigsavers.py checks the
measured difference against this bound; the CPU embedding is checked for equality).

Host memory: the embedding's V x H x 2 bytes pinned (Llama-3.1-8B: 0.98 GiB), plus the head's
16-bit weight kept in ordinary CPU memory while the savers are installed (restored on uninstall,
so a model goes back exactly as it was).
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from core import plan as P

_EMPTY = 0


class Int8Head:
    """A frozen output layer in 8 bits: int8 rows, one fp32 scale per row (absmax / 127)."""

    requires_grad = False

    def __init__(self, weight: torch.Tensor, vocab_tile: Optional[int] = None):
        w = weight.detach()
        V, H = w.shape
        self.dtype = w.dtype
        self.device = w.device
        self.shape = (V, H)
        self.q = torch.empty((V, H), dtype=torch.int8, device=w.device)
        self.scale = torch.empty(V, dtype=torch.float32, device=w.device)
        # quantize in row tiles: the fp32 temporary stays ~64 MiB on a small card
        step = max(1, (64 * 2**20) // (H * 4))
        with torch.no_grad():
            for s in range(0, V, step):
                wt = w[s:s + step].float()
                sc = wt.abs().amax(1).clamp(min=1e-30) / 127.0
                self.q[s:s + step] = (wt / sc[:, None]).round_().clamp_(-127, 127).to(torch.int8)
                self.scale[s:s + step] = sc
        # the largest scale normalises the scales that enter the gradient's matmul (see _backward_tile)
        self.smax = float(self.scale.max()) if V else 1.0
        self.vocab_tile = int(vocab_tile or P.head_tiles(V, H, 1)[1])

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The whole weight the int8 rows stand for (tests and reference computations only)."""
        return (self.q.float() * self.scale[:, None]).to(dtype)

    def tile_logits(self, h: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """fp32 logits of the rows h against vocabulary rows v0..v1, dequantizing only that tile."""
        wt = self.q[v0:v1].to(h.dtype)
        z = (h @ wt.t()).float()
        return z.mul_(self.scale[v0:v1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's output for any hidden states (generation, eval without labels), tile by tile."""
        shp = hidden.shape
        h = hidden.reshape(-1, shp[-1]).to(self.dtype)
        V = self.shape[0]
        out = torch.empty((h.shape[0], V), dtype=self.dtype, device=h.device)
        for v0 in range(0, V, self.vocab_tile):
            v1 = min(V, v0 + self.vocab_tile)
            out[:, v0:v1] = self.tile_logits(h, v0, v1).to(self.dtype)
        return out.reshape(*shp[:-1], V)

    def loss(self, hidden, targets, divisor, softcap, chunk_tokens, weights=None):
        """sum over rows of CE(softcap(h W^T), y) / divisor, as core.savers._ChunkedLinearCE, with W
        read in 8 bits tile by tile. `chunk_tokens` is the plan's chunk for the full vocabulary."""
        V, H = self.shape
        chunk, vt = P.head_tiles(V, H, int(chunk_tokens), self.vocab_tile)
        return _ChunkedQ8CE.apply(hidden, self, targets, divisor, softcap, chunk, vt, weights)


def _capped(z: torch.Tensor, softcap, want_deriv: bool):
    if softcap is None:
        return z, None
    z.div_(softcap).tanh_()
    deriv = (1.0 - z * z) if want_deriv else None  # d(cap*tanh(x/cap))/dx
    return z.mul_(softcap), deriv


class _ChunkedQ8CE(torch.autograd.Function):
    """The chunked loss over an Int8Head: per token chunk, pass 1 (online logsumexp and the target
    logit over vocabulary tiles), pass 2 (the hidden states' gradient, tile by tile)."""

    @staticmethod
    def forward(ctx, hidden, head, targets, divisor, softcap, chunk, vt, weights=None):
        need_h = ctx.needs_input_grad[0]
        n = hidden.shape[0]
        V = head.shape[0]
        dt = head.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        gh = torch.empty_like(hidden) if need_h else None
        # the scales enter the gradient's matmul divided by the largest one: products stay in the
        # range of the probabilities themselves (fp16 cards), and the result is multiplied back
        norm = head.scale / head.smax
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                h = hidden[s:s + chunk].to(dt)
                y = targets[s:s + chunk]
                c = h.shape[0]
                m = torch.full((c,), -math.inf, dtype=torch.float32, device=h.device)
                lsum = torch.zeros((c,), dtype=torch.float32, device=h.device)
                zy = torch.zeros((c,), dtype=torch.float32, device=h.device)
                for v0 in range(0, V, vt):
                    v1 = min(V, v0 + vt)
                    z, _ = _capped(head.tile_logits(h, v0, v1), softcap, False)
                    inr = (y >= v0) & (y < v1)
                    g = z.gather(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
                    zy = torch.where(inr, g, zy)
                    mn = torch.maximum(m, z.amax(1))
                    lsum = lsum * torch.exp(m - mn) + torch.exp(z - mn[:, None]).sum(1)
                    m = mn
                    del z
                lse = m + torch.log(lsum)
                w8 = weights[s:s + chunk] if weights is not None else None
                nll = lse - zy
                total += (nll * w8).sum() if w8 is not None else nll.sum()
                if not need_h:
                    continue
                acc = torch.zeros((c, h.shape[1]), dtype=torch.float32, device=h.device)
                for v0 in range(0, V, vt):
                    v1 = min(V, v0 + vt)
                    z, deriv = _capped(head.tile_logits(h, v0, v1), softcap, True)
                    p = z.sub_(lse[:, None]).exp_()  # softmax over the whole vocabulary, this tile
                    inr = (y >= v0) & (y < v1)
                    p.scatter_add_(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None], -inr.to(p.dtype)[:, None])
                    if w8 is not None:
                        p.mul_(w8[:, None])
                    if deriv is not None:
                        p.mul_(deriv)
                        del deriv
                    p.mul_(norm[v0:v1])  # d logit / d h = scale x int8 row
                    p16 = p.to(dt)
                    del p, z
                    acc += (p16 @ head.q[v0:v1].to(dt)).float()
                    del p16
                # the 1/divisor is applied in backward, in fp32 (as the 16-bit chunked loss does)
                gh[s:s + c] = acc.mul_(head.smax).to(gh.dtype)
                del acc, h
        ctx.save_for_backward(*((gh,) if need_h else ()))
        ctx.need_h = need_h
        ctx.divisor = divisor
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out):
        gh = None
        if ctx.need_h:
            (g,) = ctx.saved_tensors
            factor = grad_out.float() / ctx.divisor
            gh = (g.float() * factor).to(g.dtype) if g.dtype == torch.float16 else g.mul_(factor.to(g.dtype))
        return gh, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# Lean RMSNorm
# ---------------------------------------------------------------------------------------

# transformers' RMSNorm classes with exactly w * (x * rsqrt(mean(x^2) + eps)).to(dtype) (Gemma's 1 + w differs)
LEAN_NORM_CLASSES = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"})
_NORM_ROWS_BYTES = 64 * 2**20  # fp32 temporaries of one slice of rows in the backward


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.rstd = rstd  # for _NormOutput (the same tensor as the saved one: no extra memory)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        H = x.shape[-1]
        x2, g2, r2 = x.reshape(-1, H), gy.reshape(-1, H), rstd.reshape(-1, 1)
        gx = torch.empty_like(x)
        out = gx.view(-1, H)
        step = max(1, _NORM_ROWS_BYTES // (H * 4 * 3))
        for s in range(0, x2.shape[0], step):
            n = x2[s:s + step].to(torch.float32) * r2[s:s + step]
            g = (g2[s:s + step] * weight).to(torch.float32)  # through w * n16: grad x w in 16 bits, as autograd
            dot = (g * n).mean(-1, keepdim=True)
            out[s:s + step] = ((g - n * dot) * r2[s:s + step]).to(x.dtype)
        return gx, None, None


# The norms' outputs are rebuilt for their consumers' backward instead of kept (False: kept, as
# before; bench/big_models.py's `keepout` tries set it to measure what rebuilding saves).
REBUILD_NORM_OUTPUTS = True


class _NormOutput:
    """A lean norm's output as its consumers' saved tensor: rebuilt from the norm's 16-bit input x
    and 1/rms (which the norm's own backward keeps anyway) when a backward unpacks it, in the
    forward's operations (weight * (x_fp32 * rstd).to(dtype)), so bit for bit the same rows.
    q, k and v each unpack it; while one rebuilt copy is alive the others get it (a weak reference)."""

    __slots__ = ("x", "rstd", "weight", "ref", "version")

    def __init__(self, x, rstd, weight):
        self.x, self.rstd, self.weight, self.ref, self.version = x, rstd, weight, None, x._version

    def rebuild(self) -> torch.Tensor:
        y = self.ref() if self.ref is not None else None
        if y is not None:
            return y
        if self.x._version != self.version:  # as autograd refuses a saved tensor modified in place
            raise RuntimeError("a lean RMSNorm's input was modified in place after its forward: its output "
                               "cannot be rebuilt (core.bigsavers.REBUILD_NORM_OUTPUTS = False keeps it)")
        x, H = self.x, self.x.shape[-1]
        x2, r2 = x.detach().reshape(-1, H), self.rstd.reshape(-1, 1)
        y = torch.empty_like(x, dtype=torch.result_type(self.weight, x), memory_format=torch.contiguous_format)
        out = y.view(-1, H)
        step = max(1, _NORM_ROWS_BYTES // (H * 4))  # one fp32 slice at a time, not a T x h fp32 copy
        with torch.no_grad():
            for s in range(0, x2.shape[0], step):
                out[s:s + step] = self.weight * (x2[s:s + step].to(torch.float32) * r2[s:s + step]).to(x.dtype)
        self.ref = weakref.ref(y)
        return y


def _consumer_forward(mod):
    """Around a lean norm's consumer (the attention, the MLP): its saved copies of the norm's
    output become _NormOutput recipes (views of it keep their shape, strides and offset)."""
    orig = mod.forward

    def forward(*args, **kwargs):
        hs = args[0] if args else kwargs.get("hidden_states")
        src = hs.__dict__.get("_snug_norm_out") if torch.is_tensor(hs) else None
        if src is None or not REBUILD_NORM_OUTPUTS or not torch.is_grad_enabled():
            return orig(*args, **kwargs)
        # the hooks live as long as the saved tensors: they must not hold the output itself
        ptr, dtype, version, device = hs.untyped_storage().data_ptr(), hs.dtype, hs._version, hs.device
        del hs

        def pack(t):
            if (t.dtype == dtype and t.device == device and t._version == version
                    and t.untyped_storage().data_ptr() == ptr):
                return (src, tuple(t.shape), t.stride(), t.storage_offset())
            return t

        def unpack(p):
            if isinstance(p, tuple):
                r, shape, stride, offset = p
                return r.rebuild().as_strided(shape, stride, offset)
            return p

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return orig(*args, **kwargs)

    forward._snug_orig = orig
    mod.forward = forward


def _lean_norm_forward(mod):
    orig = mod.forward

    def forward(hidden_states, *args, **kwargs):
        if args or kwargs or mod.weight.requires_grad or not (torch.is_grad_enabled() and hidden_states.requires_grad):
            return orig(hidden_states, *args, **kwargs)
        y = _LeanRMSNorm.apply(hidden_states, mod.weight, mod.variance_epsilon)
        if REBUILD_NORM_OUTPUTS and y.grad_fn is not None:
            # what its consumers need to rebuild it (x and 1/rms are what _LeanRMSNorm keeps)
            y.__dict__["_snug_norm_out"] = _NormOutput(hidden_states, y.grad_fn.rstd, mod.weight)
        return y

    forward._snug_orig = orig
    mod.forward = forward


def lean_norms(hf) -> int:
    """Route the decoder blocks' two RMSNorms through _LeanRMSNorm (and their consumers, the
    attention and the MLP, through _consumer_forward); returns how many norms."""
    n = 0
    for lyr in _layers(hf):
        for name, consumer in (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")):
            mod = getattr(lyr, name, None)
            if mod is not None and _kernel_norm(mod):
                # core/kernels.py's fused RMSNorm keeps what this one keeps, but its output stays kept
                # by q/k/v and the MLP: where the plan asks for lean norms (the rows the estimate
                # prices with rebuilt outputs, big_models run 4) this one takes the block's norms
                del mod.__dict__["forward"]
            if mod is not None and type(mod).__name__ in LEAN_NORM_CLASSES and hasattr(mod, "variance_epsilon") \
                    and "forward" not in mod.__dict__:
                _lean_norm_forward(mod)
                n += 1
                cons = getattr(lyr, consumer, None)
                if cons is not None:
                    _consumer_forward(cons)
    return n


def _kernel_norm(mod) -> bool:
    """Whether mod's forward is core/kernels.py's fused RMSNorm (its install names it _patch_norm)."""
    f = mod.__dict__.get("forward")
    return f is not None and hasattr(f, "_snug_orig") and getattr(f, "__qualname__", "").startswith("_patch_norm")


def _layers(hf):
    from core.savers import _decoder_layers  # noqa: PLC0415 (savers imports this module lazily)

    return _decoder_layers(hf) or []


# ---------------------------------------------------------------------------------------
# install / restore
# ---------------------------------------------------------------------------------------

def _cpu_embedding_forward(module):
    orig = module.forward
    w = module._snug_cpu_weight

    def forward(input_ids, *args, **kwargs):
        dev = input_ids.device
        rows = F.embedding(input_ids.to("cpu"), w)  # a gather on the CPU: exact copies of the rows
        if dev.type == "cuda":
            rows = rows.pin_memory().to(dev, non_blocking=True)
        else:
            rows = rows.to(dev)
        scale = getattr(module, "embed_scale", None)  # Gemma-3's scaled embedding (a buffer)
        if torch.is_tensor(scale):
            rows = rows * scale.to(device=dev, dtype=rows.dtype)
        return rows

    forward._snug_orig = orig
    module.forward = forward


def _head_forward(module, head: Int8Head):
    orig = module.forward

    def forward(hidden, *args, **kwargs):
        return head.logits(hidden)

    forward._snug_orig = orig
    module.forward = forward


def _empty_like_param(p: torch.Tensor) -> torch.Tensor:
    return torch.empty(_EMPTY, dtype=p.dtype, device=p.device)


def install(hf, plan) -> dict:
    """Apply (or keep, or undo) the plan's CPU embedding and 8-bit head on the unwrapped HF model.

    Called by core.savers.install_savers after its own patches; idempotent (a re-install with the
    same plan keeps the weights where they are and re-patches the forwards)."""
    applied: dict = {}
    want_emb = bool(getattr(plan, "cpu_embedding", False))
    want_head = bool(getattr(plan, "head_8bit", False))
    emb = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    tied = emb is not None and head is not None and head.weight is emb.weight
    if not want_head and getattr(hf, "_snug_qhead", None) is not None:
        _restore_head(hf)
    if not want_emb and emb is not None and hasattr(emb, "_snug_cpu_weight"):
        _restore_embedding(emb)
    if getattr(plan, "lean_norms", False):
        n = lean_norms(hf)
        applied["lean_norms"] = f"{n} RMSNorms keep their 16-bit input and 1/rms (not an fp32 copy)"
    if not (want_emb or want_head):
        return applied
    if want_head:
        if head is None or type(head) is not torch.nn.Linear or head.bias is not None:
            applied["head_8bit"] = "off: the output layer is not a plain bias-free linear layer"
        else:
            if getattr(hf, "_snug_qhead", None) is None:
                src = emb._snug_cpu_weight if (tied and hasattr(emb, "_snug_cpu_weight")) else head.weight
                hf._snug_qhead = Int8Head(src.to(head.weight.device) if src.device != head.weight.device else src)
                if not tied:
                    # the 16-bit head leaves the card; kept on the CPU to restore it on uninstall
                    head._snug_stash = (head.weight.data.to("cpu"), head.weight.device)
                    head.weight.data = _empty_like_param(head.weight)
            _head_forward(head, hf._snug_qhead)
            qh = hf._snug_qhead
            applied["head_8bit"] = (f"int8 rows + fp32 scales ({qh.nbytes / 2**30:.2f} GiB), read in tiles of "
                                    f"{qh.vocab_tile} rows")
    if want_emb and emb is not None:
        if tied and getattr(hf, "_snug_qhead", None) is None:
            if hasattr(emb, "_snug_cpu_weight"):
                _restore_embedding(emb)
            applied["cpu_embedding"] = "off: tied weights need the 8-bit head on the card first"
        else:
            if not hasattr(emb, "_snug_cpu_weight"):
                dev = emb.weight.device
                w = emb.weight.data.to("cpu")
                if dev.type == "cuda":
                    w = w.pin_memory()
                emb._snug_cpu_weight = w
                emb._snug_device = dev
                emb.weight.data = _empty_like_param(emb.weight)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            _cpu_embedding_forward(emb)
            w = emb._snug_cpu_weight
            applied["cpu_embedding"] = (f"{w.shape[0]} x {w.shape[1]} rows in pinned CPU memory "
                                        f"({w.numel() * w.element_size() / 2**30:.2f} GiB off the card)")
    return applied


def _restore_embedding(emb) -> None:
    w = emb.__dict__.pop("_snug_cpu_weight")
    dev = emb.__dict__.pop("_snug_device", w.device)
    emb.weight.data = w.to(dev)


def _restore_head(hf) -> None:
    hf.__dict__.pop("_snug_qhead", None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if head is not None and "_snug_stash" in head.__dict__:
        w, dev = head.__dict__.pop("_snug_stash")
        head.weight.data = w.to(dev)


def restore(hf) -> None:
    """Put the 16-bit embedding and head back where they were (core.savers.uninstall_savers)."""
    emb = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "_snug_cpu_weight"):
        _restore_embedding(emb)
    if getattr(hf, "_snug_qhead", None) is not None or (
            hasattr(hf, "get_output_embeddings") and hf.get_output_embeddings() is not None
            and "_snug_stash" in hf.get_output_embeddings().__dict__):
        _restore_head(hf)
