"""Fused Triton kernels for a decoder block's element-wise work: RMSNorm, SwiGLU / GeGLU, rotary; and
two tails core.savers calls: the fp32 LoRA sum's epilogue (lora_epilogue) and the chunked loss's
per-chunk NLL + gradient (ce_tail). gpu_time run 4 (bench/results/gpu_time_run4.md, H200): the
epilogue 6.0 -> 2.4 ms and the loss 2.75 -> 0.41 ms per 1k tokens at Qwen2.5-1.5B 4,096 tokens.

Why: run 1 of bench/gpu_time.py (one H200, bench/results/gpu_time_run1.md) found snugtune's
element-wise kernels taking 3.3x Unsloth's GPU time at Qwen2.5-1.5B (9.9 against 3.0 ms per 1k
tokens): transformers runs RMSNorm as ~7 kernels (cast to fp32, square, mean, add, rsqrt,
multiply, cast, multiply by the weight), rotary as ~6 per tensor (two products, a negation, a
concatenation, another product, a sum) and SwiGLU as two, each again in backward. Here each is one
kernel forward and one backward, reading each input once and writing each output once. Run 2
(bench/results/gpu_time_run2.md): element-wise time 9.4 -> 2.8 ms per 1k tokens at Qwen2.5-1.5B
1,024 tokens (Unsloth 3.1), 21.9 -> 5.6 at Llama-3.1-8B 2,048 (run 1 before; Unsloth 5.4).

What each keeps for backward (never more than transformers' own path keeps):
* RMSNorm: the 16-bit input and 1/rms (4 bytes a row); transformers keeps an fp32 copy of the
  input (4 bytes an element). Weight frozen (LoRA): a trainable weight takes transformers' path.
* SwiGLU / GeGLU, h = act(g) * u: g and u (transformers keeps g, act(g) and u).
* rotary: cos and sin, the tensors every layer shares (as transformers does).
Transients: forward writes only its output (transformers makes 3-5 full-size temporaries); the
GLU backward writes dg and du (transformers: three T x I tensors at once).

Numerics. The forwards round where transformers' sequence of 16-bit operations rounds (the
normalised row cast to the input dtype before the weight; act(g) cast before the product; each
rotary product cast before the sum), so they compute the same numbers up to the order of the
row reduction and the last bit of exp / rsqrt. The backwards follow autograd's roundings where
they are cheap to follow (grad x weight in 16 bits, grad x u before act'), and otherwise keep
fp32 to the single final rounding. tests/test_kernels.py compares forward and backward against
transformers' modules on the CPU (Triton's interpreter); bench/kernels_real.py does one forward
and backward of the real Gemma 3 270M with and without them.

Graphs: no host synchronisation, launch grids from shapes only, so graphed steps
(core.graphs) capture them; the first launch compiles, which the eager warm-up steps do.

Installed by core.savers.install_savers (on CUDA, when Triton imports; SNUGTUNE_KERNELS=off in
the environment keeps transformers' path) through install(); every patched forward carries
`_snug_orig`, so uninstall_savers undoes them. Rotary is a module-level function in
transformers: its module's name is rebound once to a dispatcher that uses the kernel only inside
an attention forward that install() wrapped, and transformers' function everywhere else.
"""
from __future__ import annotations

import inspect
import os
import sys
import threading
from typing import Optional

import torch
import triton
import triton.language as tl

from core.plan import KERNEL_CLASSES

# Triton's interpreter runs the kernels on CPU tensors (the tests); it is decided at import time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Norm classes computing w * (x * rsqrt(mean(x^2) + eps)).to(dtype) (Llama style) and
# ((x * rsqrt(...)) * (1 + w)).to(dtype) in fp32 (Gemma style), as transformers writes them.
# The classes come from core.plan.KERNEL_CLASSES, the one list of the model types the kernels fuse.
LLAMA_NORMS = frozenset(f"{p}RMSNorm" for p, gemma in KERNEL_CLASSES.values() if not gemma)
GEMMA_NORMS = frozenset(f"{p}RMSNorm" for p, gemma in KERNEL_CLASSES.values() if gemma)
# MLPs written down_proj(act_fn(gate_proj(x)) * up_proj(x)); the activation decides the kernel.
MLP_CLASSES = frozenset(f"{p}MLP" for p, _ in KERNEL_CLASSES.values())
SILU_ACTS = frozenset({"SiLU", "SiLUActivation"})
GELU_TANH_ACTS = frozenset({"GELUTanh", "PytorchGELUTanh"})
# attention classes that call their module's apply_rotary_pos_emb(q, k, cos, sin) with rotate_half
ATTN_CLASSES = frozenset(f"{p}Attention" for p, _ in KERNEL_CLASSES.values())

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _on_device(*ts: torch.Tensor) -> bool:
    return all((t.is_cuda or (INTERPRET and t.device.type == "cpu")) and t.dtype in _DTYPES for t in ts)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------

@triton.jit
def _rnd(x, dt: tl.constexpr, EMU: tl.constexpr):
    """x (fp32) rounded to dt, as a dt tensor. EMU: Triton's interpreter truncates fp32 -> bf16 where a
    GPU rounds to nearest even, so the tests round by hand first (the truncation is then exact)."""
    if EMU and dt == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(dt)


@triton.jit
def _r32(x, dt: tl.constexpr, EMU: tl.constexpr):
    return _rnd(x, dt, EMU).to(tl.float32)


_sum_combine = getattr(tl.standard, "_sum_combine", None)
if _sum_combine is None:  # a Triton without it: the same a + b (the interpreter then runs it slowly)
    @triton.jit
    def _sum_combine(a, b):
        return a + b


@triton.jit
def _rowsum(x):
    # tl.sum's own reduction, called through the builtin tl.reduce: tl.sum is a @triton.jit of
    # triton.language, interpreted only when TRITON_INTERPRET was set before Triton was first imported
    # (the tests set it later, for core.kernels alone), and the interpreter runs this combine function
    # as numpy's sum (any other one element by element, ~1,000x slower)
    return tl.reduce(x, 1, _sum_combine)


@triton.jit
def _rms_fwd(X, W, Y, RSTD, M, N, sx, sy, eps, GEMMA: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr,
             EMU: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BN)
    mr = rows < M
    mc = cols < N
    m = mr[:, None] & mc[None, :]
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
    r = tl.rsqrt(_rowsum(x * x) / N + eps)
    n = x * r[:, None]
    if GEMMA:
        y = n * (1.0 + w[None, :])
    else:
        # transformers casts the normalised row to the input dtype before the weight multiplies it
        y = w[None, :] * _r32(n, X.dtype.element_ty, EMU)
    tl.store(Y + rows[:, None] * sy + cols[None, :], _rnd(y, Y.dtype.element_ty, EMU), mask=m)
    tl.store(RSTD + rows, r, mask=mr)


@triton.jit
def _rms_bwd(G, X, W, RSTD, DX, M, N, sg, sx, sd, GEMMA: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr,
             EMU: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BN)
    mr = rows < M
    mc = cols < N
    m = mr[:, None] & mc[None, :]
    g = tl.load(G + rows[:, None] * sg + cols[None, :], mask=m, other=0.0).to(tl.float32)
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
    r = tl.load(RSTD + rows, mask=mr, other=0.0)
    if GEMMA:
        gn = g * (1.0 + w[None, :])
    else:
        gn = _r32(g * w[None, :], X.dtype.element_ty, EMU)  # autograd's grad x w, in 16 bits
    n = x * r[:, None]
    dot = _rowsum(gn * n) / N
    dx = (gn - n * dot[:, None]) * r[:, None]
    tl.store(DX + rows[:, None] * sd + cols[None, :], _rnd(dx, DX.dtype.element_ty, EMU), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_launch(N: int):
    bn = _pow2(N)
    rows = max(1, min(16, 2048 // bn))
    warps = 1 if bn * rows <= 512 else 2 if bn * rows <= 1024 else 4 if bn * rows <= 2048 else 8 if bn <= 4096 else 16
    return bn, rows, warps


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, gemma, out_dtype=None):
        N = x.shape[-1]
        x2 = _rows(x)
        M = x2.shape[0]
        if out_dtype is None:
            out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty((M, N), dtype=out_dtype, device=x.device)
        rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
        bn, rows, warps = _norm_launch(N)
        if M:
            _rms_fwd[(triton.cdiv(M, rows),)](x2, weight, y, rstd, M, N, x2.stride(0), y.stride(0), float(eps),
                                              GEMMA=gemma, ROWS=rows, BN=bn, EMU=INTERPRET, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma, ctx.shape = gemma, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, gy):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        g2 = _rows(gy)
        dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        bn, rows, warps = _norm_launch(N)
        if M:
            _rms_bwd[(triton.cdiv(M, rows),)](g2, x2, weight, rstd, dx, M, N, g2.stride(0), x2.stride(0), dx.stride(0),
                                              GEMMA=ctx.gemma, ROWS=rows, BN=bn, EMU=INTERPRET, num_warps=warps)
        return dx.view(ctx.shape), None, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Llama-style w * norm(x).to(dtype), or Gemma-style (norm(x) * (1 + w)).to(dtype) in fp32; frozen w.

    `out_dtype` (default: transformers' own) is the fp16 guard's (core.fp16guard): its norms read the fp32
    residual stream and hand the fp16 matmuls fp16, or read fp16 and return fp32 for the stream. The result
    is rounded once to it from fp32; what is kept for the backward is the input as given (2 bytes an element
    for a 16-bit input, 4 for the fp32 stream) and 1/rms, 4 bytes a row; dx comes back in the input's dtype."""
    return _RMSNorm.apply(x, weight, eps, gemma, out_dtype)


# ---------------------------------------------------------------------------------------
# SwiGLU / GeGLU
# ---------------------------------------------------------------------------------------

_GELU_K = 0.7978845608028654  # sqrt(2 / pi)
_GELU_C = 0.044715


@triton.jit
def _tanh(z):
    # 1 - 2 / (e^2z + 1): exact limits (+-1) at large |z|, no tanh intrinsic needed
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _glu_fwd(Gp, Up, Hp, n, GELU: tl.constexpr, BLOCK: tl.constexpr, EMU: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(Gp + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(Up + offs, mask=m, other=0.0).to(tl.float32)
    if GELU:
        a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        a = g / (1.0 + tl.exp(-g))
    a = _r32(a, Hp.dtype.element_ty, EMU)  # transformers' act(g) is a 16-bit tensor
    tl.store(Hp + offs, _rnd(a * u, Hp.dtype.element_ty, EMU), mask=m)


@triton.jit
def _glu_bwd(DHp, Gp, Up, DGp, DUp, n, GELU: tl.constexpr, BLOCK: tl.constexpr, EMU: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dh = tl.load(DHp + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(Gp + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(Up + offs, mask=m, other=0.0).to(tl.float32)
    if GELU:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    a = _r32(a, DUp.dtype.element_ty, EMU)
    ga = _r32(dh * u, DGp.dtype.element_ty, EMU)  # autograd's grad of act(g), a 16-bit tensor
    tl.store(DUp + offs, _rnd(dh * a, DUp.dtype.element_ty, EMU), mask=m)
    tl.store(DGp + offs, _rnd(ga * da, DGp.dtype.element_ty, EMU), mask=m)


_GLU_BLOCK = 1024


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, gelu):
        g = g.contiguous()
        u = u.contiguous()
        h = torch.empty_like(g)
        n = g.numel()
        if n:
            _glu_fwd[(triton.cdiv(n, _GLU_BLOCK),)](g, u, h, n, GELU=gelu, BLOCK=_GLU_BLOCK, EMU=INTERPRET, num_warps=4)
        ctx.save_for_backward(g, u)
        ctx.gelu = gelu
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg = torch.empty_like(g)
        du = torch.empty_like(u)
        n = g.numel()
        if n:
            _glu_bwd[(triton.cdiv(n, _GLU_BLOCK),)](dh, g, u, dg, du, n, GELU=ctx.gelu, BLOCK=_GLU_BLOCK, EMU=INTERPRET, num_warps=4)
        return dg, du, None


def glu(g: torch.Tensor, u: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """silu(g) * u (SwiGLU) or gelu_tanh(g) * u (GeGLU), one kernel each way."""
    return _GLU.apply(g, u, gelu)


# ---------------------------------------------------------------------------------------
# Rotary embedding (rotate_half convention), q and k in one launch
# ---------------------------------------------------------------------------------------

@triton.jit
def _rope_part(X, O, b, t, sxb, sxh, sxt, sob, soh, sot, H, c1, c2, s1, s2, HALF: tl.constexpr,
               BH: tl.constexpr, BD: tl.constexpr, BACKWARD: tl.constexpr, EMU: tl.constexpr):
    h = tl.arange(0, BH)
    d = tl.arange(0, BD)
    m = (h < H)[:, None] & (d < HALF)[None, :]
    xi = b * sxb + t * sxt + h[:, None] * sxh + d[None, :]
    oi = b * sob + t * sot + h[:, None] * soh + d[None, :]
    x1 = tl.load(X + xi, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + xi + HALF, mask=m, other=0.0).to(tl.float32)
    dt = O.dtype.element_ty
    # each product rounded to the tensor dtype before the sum, as transformers' q*cos + rotate_half(q)*sin
    if BACKWARD:  # the transpose: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
        o1 = _r32(x1 * c1, dt, EMU) + _r32(x2 * s2, dt, EMU)
        o2 = _r32(x2 * c2, dt, EMU) - _r32(x1 * s1, dt, EMU)
    else:  # o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2
        o1 = _r32(x1 * c1, dt, EMU) - _r32(x2 * s1, dt, EMU)
        o2 = _r32(x2 * c2, dt, EMU) + _r32(x1 * s2, dt, EMU)
    tl.store(O + oi, _rnd(o1, dt, EMU), mask=m)
    tl.store(O + oi + HALF, _rnd(o2, dt, EMU), mask=m)


@triton.jit
def _rope(Q, K, QO, KO, COS, SIN, T, sqb, sqh, sqt, sqob, sqoh, sqot, skb, skh, skt, skob, skoh, skot, scb, sct,
          HQ, HK, HALF: tl.constexpr, BHQ: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr,
          BACKWARD: tl.constexpr, EMU: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BD)
    md = d < HALF
    ci = b * scb + t * sct + d
    c1 = tl.load(COS + ci, mask=md, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + ci + HALF, mask=md, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + ci, mask=md, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + ci + HALF, mask=md, other=0.0).to(tl.float32)[None, :]
    _rope_part(Q, QO, b, t, sqb, sqh, sqt, sqob, sqoh, sqot, HQ, c1, c2, s1, s2, HALF, BHQ, BD, BACKWARD, EMU)
    _rope_part(K, KO, b, t, skb, skh, skt, skob, skoh, skot, HK, c1, c2, s1, s2, HALF, BHK, BD, BACKWARD, EMU)


def _last_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# Without this, LLVM turns each rounded product into a bf16 multiply and contracts it with the sum into
# one bf16 FMA, dropping the product's rounding that transformers' q * cos + rotate_half(q) * sin has
# (run 1 of bench/kernels_check.py on an H200: 18% of the elements one rounding apart; the PTX here
# then has fma.rn.bf16 where, with fusion off, it has mul.rn.bf16 and add.rn.bf16 as torch does).
_NO_FMA = {} if INTERPRET else {"enable_fp_fusion": False}


def _rope_launch(q, k, cos, sin, backward):
    B, HQ, T, D = q.shape
    HK = k.shape[1]
    qo = torch.empty_like(q)  # same strides as q when q is dense (transformers' (B, T, H, D) memory)
    ko = torch.empty_like(k)
    if q.numel() == 0:
        return qo, ko
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    half = D // 2
    bhq, bhk, bd = _pow2(HQ), _pow2(HK), _pow2(half)
    warps = 4 if max(bhq, bhk) * bd >= 2048 else 2 if max(bhq, bhk) * bd >= 512 else 1
    _rope[(B * T,)](q, k, qo, ko, cos, sin, T, *q.stride()[:3], *qo.stride()[:3], *k.stride()[:3],
                    *ko.stride()[:3], scb, cos.stride(1), HQ, HK, HALF=half, BHQ=bhq, BHK=bhk, BD=bd,
                    BACKWARD=backward, EMU=INTERPRET, num_warps=warps, **_NO_FMA)
    return qo, ko


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q, k = _last_dense(q), _last_dense(k)
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(_last_dense(gq), _last_dense(gk), cos, sin, True)
        return dq, dk, None, None


def rotary_usable(q, k, cos, sin) -> bool:
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    B, _, T, D = q.shape
    if D % 2 or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or cos.shape[-1] != D or cos.shape[1] != T:
        return False
    if cos.shape[0] not in (1, B) or not (q.dtype == k.dtype == cos.dtype == sin.dtype):
        return False
    return cos.stride(-1) == 1 and sin.stride() == cos.stride() and _on_device(q, k, cos, sin)


def rotary(q, k, cos, sin):
    """q * cos + rotate_half(q) * sin and the same for k; q, k (B, H, T, D), cos / sin (B or 1, T, D)."""
    return _Rotary.apply(q, k, cos, sin)


# ---------------------------------------------------------------------------------------
# The fused NF4 + LoRA node's output: base (fp32) + scale (x A^T) B^T + bias, rounded once
# ---------------------------------------------------------------------------------------

@triton.jit
def _lora_epi_fma(O, XA, Bw, BIAS, Y, M, N, sxa, sb, so, sy, scale, R: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, EMU: tl.constexpr):
    # cards without bf16 tensor cores (compute capability 7.x): the rank-r product as r outer products
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    mr = rows < M
    mc = cols < N
    m = mr[:, None] & mc[None, :]
    acc = tl.full((BM, BN), 0.0, tl.float32)  # (tl.zeros is a @triton.jit of triton.language, see _rowsum)
    for r in range(R):
        a = tl.load(XA + rows * sxa + r, mask=mr, other=0.0).to(tl.float32)
        b = tl.load(Bw + cols * sb + r, mask=mc, other=0.0).to(tl.float32)
        acc += a[:, None] * b[None, :]
    o = tl.load(O + rows[:, None] * so + cols[None, :], mask=m, other=0.0).to(tl.float32) + scale * acc
    if HAS_BIAS:
        o += tl.load(BIAS + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * sy + cols[None, :], _rnd(o, Y.dtype.element_ty, EMU), mask=m)


@triton.jit
def _split3(b):
    """fp32 b as hi + mid + lo, three bf16 numbers whose sum is b exactly (8 significant bits each;
    each remainder is exact in fp32, rounded to nearest on a GPU or truncated in the interpreter)."""
    hi = b.to(tl.bfloat16)
    r1 = b - hi.to(tl.float32)
    mid = r1.to(tl.bfloat16)
    lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _dot3(a, hi, mid, lo, acc, EMU: tl.constexpr):
    # a @ (hi + mid + lo) + acc, bf16 operands, fp32 accumulator. Triton's interpreter multiplies bf16
    # tensors as their integer bit patterns, so there the same exact operands go in as fp32
    if EMU:
        a = a.to(tl.float32)
        hi = hi.to(tl.float32)
        mid = mid.to(tl.float32)
        lo = lo.to(tl.float32)
    acc = tl.dot(a, hi, acc)
    acc = tl.dot(a, mid, acc)
    return tl.dot(a, lo, acc)


@triton.jit
def _lora_epi_tc(O, XA, Bw, BIAS, Y, M, N, R, sxa, sb, so, sy, scale, HAS_BIAS: tl.constexpr, FP16_XA: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, EMU: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BR)
    mr = rows < M
    mc = cols < N
    mk = rk < R
    m = mr[:, None] & mc[None, :]
    o = tl.load(O + rows[:, None] * so + cols[None, :], mask=m, other=0.0).to(tl.float32)
    # whole tiles, one load each: xa (BM x r, 16-bit) and B^T (r x BN, the fp32 master); r padded to BR with 0
    xa = tl.load(XA + rows[:, None] * sxa + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
    b = tl.load(Bw + cols[None, :] * sb + rk[:, None], mask=mk[:, None] & mc[None, :], other=0.0).to(tl.float32)
    # the rank-r product on tensor cores with nothing rounded: B split into three bf16 parts, xa bf16
    # (an fp16 xa into two: its 11 significant bits fit in two bf16 numbers), so every product is
    # exact and summed in the fp32 accumulator: x A^T B^T in fp32, up to the order of the sum
    hi, mid, lo = _split3(b)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    if FP16_XA:
        xf = xa.to(tl.float32)
        a = xf.to(tl.bfloat16)
        acc = _dot3(a, hi, mid, lo, acc, EMU)
        acc = _dot3((xf - a.to(tl.float32)).to(tl.bfloat16), hi, mid, lo, acc, EMU)
    else:
        acc = _dot3(xa.to(tl.bfloat16), hi, mid, lo, acc, EMU)
    o = o + scale * acc
    if HAS_BIAS:
        o += tl.load(BIAS + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * sy + cols[None, :], _rnd(o, Y.dtype.element_ty, EMU), mask=m)


_TC_CAPABLE: dict = {}  # device index -> bf16 tensor cores (compute capability >= 8.0)


def _tensor_cores(dev: torch.device) -> bool:
    if dev.type != "cuda":
        return INTERPRET
    i = dev.index if dev.index is not None else torch.cuda.current_device()
    if i not in _TC_CAPABLE:
        _TC_CAPABLE[i] = torch.cuda.get_device_capability(i)[0] >= 8
    return _TC_CAPABLE[i]


# Tile of the tensor-core epilogue: 64 x 128 outputs, 4 warps. The earlier kernel (now _lora_epi_fma,
# 32 x 128, r outer products on the FP32 units) took 6.0 ms per 1k tokens at Qwen2.5-1.5B 4,096
# tokens (gpu_time run 3, H200), ~25% of the memory bandwidth its 6 bytes an output element need:
# bound by its 2 x r strided loads and r FMAs per output, not by memory.
EPI_TILE = (64, 128, 4)


def lora_epilogue(o: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """(o + scale * xa @ B^T + bias).to(dtype) in one pass: o (T x out, fp32, the base GEMM's
    accumulator), xa (T x r, x A^T, bf16 or fp16), B (out x r, the fp32 master), bias (out) or None.

    core.savers' fp32 LoRA sum (LORA_SUM_FP32) does this as an fp32 addmm_ into o, a bias add and a
    cast: 14 bytes an output element read and written after the GEMM; here 6 (o read, the 16-bit
    result written), the same sum in fp32 up to its order, rounded once. No autograd: it runs
    inside the node's forward."""
    M, N = o.shape
    R = xa.shape[-1]
    y = torch.empty((M, N), dtype=dtype, device=o.device)
    if M == 0 or N == 0:
        return y
    xa = xa if xa.stride(-1) == 1 else xa.contiguous()
    B = B if B.stride(-1) == 1 else B.contiguous()
    o = o if o.stride(-1) == 1 else o.contiguous()
    b_ = bias if bias is not None else o

    def kernel():
        if _tensor_cores(o.device) and xa.dtype in (torch.bfloat16, torch.float16):
            bm, bn, warps = EPI_TILE
            _lora_epi_tc[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
                o, xa, B, b_, y, M, N, R, xa.stride(0), B.stride(0), o.stride(0), y.stride(0), float(scale),
                HAS_BIAS=bias is not None, FP16_XA=xa.dtype == torch.float16, BM=bm, BN=bn, BR=max(16, _pow2(R)),
                EMU=INTERPRET, num_warps=warps)
        else:
            bm, bn = 32, 128
            _lora_epi_fma[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
                o, xa, B, b_, y, M, N, xa.stride(0), B.stride(0), o.stride(0), y.stride(0),
                float(scale), R=R, HAS_BIAS=bias is not None, BM=bm, BN=bn, EMU=INTERPRET, num_warps=4)
        return y

    return _guarded(kernel, lambda: lora_epilogue_torch(o, xa, B, bias, scale, dtype))


def lora_epilogue_torch(o, xa, B, bias, scale: float, dtype) -> torch.Tensor:
    """lora_epilogue in PyTorch operations, core.savers' fp32 sum as written there (the reference, and
    the path once a kernel has failed). Adds into o."""
    o.addmm_(xa.float(), B.float().t(), alpha=scale)
    if bias is not None:
        o.add_(bias)
    return o.to(dtype)


# ---------------------------------------------------------------------------------------
# The chunked loss's tail: a chunk's logits -> per-row NLL and, in place, the logits' gradient
# ---------------------------------------------------------------------------------------

_max_combine = getattr(tl.standard, "_elementwise_max", None)
if _max_combine is None:
    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)


@triton.jit
def _ce_tail(Z, Y, W8, NLL, V, sz, HAS_W: tl.constexpr, GRAD: tl.constexpr, BV: tl.constexpr, EMU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zr = Z + row * sz
    offs = tl.arange(0, BV)
    # pass 1: log-sum-exp, online per lane (each lane its running max and its sum scaled to it), the
    # lanes combined at the end; -3e38, not -inf, so that a lane with no element yet makes no NaN
    mv = tl.full((BV,), -3.0e38, tl.float32)
    sv = tl.full((BV,), 0.0, tl.float32)
    for start in range(0, V, BV):
        cols = start + offs
        z = tl.load(zr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        mn = tl.maximum(mv, z)
        sv = sv * tl.exp(mv - mn) + tl.exp(z - mn)
        mv = mn
    mx = tl.reduce(mv, 0, _max_combine)
    lse = mx + tl.log(tl.reduce(sv * tl.exp(mv - mx), 0, _sum_combine))
    y = tl.load(Y + row).to(tl.int64)
    zy = tl.load(zr + y).to(tl.float32)
    tl.store(NLL + row, lse - zy)
    if GRAD:
        # pass 2: softmax - onehot(y), times the row's weight, rounded once to the logits' dtype, written
        # over the logits (each element read before it is written, by the same program)
        for start in range(0, V, BV):
            cols = start + offs
            mk = cols < V
            z = tl.load(zr + cols, mask=mk, other=0.0).to(tl.float32)
            pr = tl.exp(z - lse)
            pr = tl.where(cols == y, pr - 1.0, pr)
            if HAS_W:
                pr = pr * tl.load(W8 + row).to(tl.float32)
            tl.store(zr + cols, _rnd(pr, Z.dtype.element_ty, EMU), mask=mk)


_CE_BV = 4096


def ce_tail(z: torch.Tensor, y: torch.Tensor, w8: Optional[torch.Tensor], grad: bool) -> torch.Tensor:
    """For a chunk of logits z (C x V, the head's 16-bit output), targets y (C) and optional row
    weights w8 (C, the static path's 0 / 1): returns nll (C, fp32) = logsumexp(z) - z[y]; with `grad`,
    z is overwritten by (softmax(z) - onehot(y)) * w8, rounded once to z's dtype.

    core.savers' chunked loss does this as z.float(), logsumexp, gather, exp_, an index update, a
    multiply and a cast: ~38 bytes an element read and written and a C x V fp32 copy plus a 16-bit
    one; here 2 reads and a write of z (6 bytes for bf16) and nothing the size of z. The same fp32
    arithmetic up to the order of the row's sum and the last bit of exp."""
    C, V = z.shape
    nll = torch.empty((C,), dtype=torch.float32, device=z.device)
    if C == 0:
        return nll
    if z.stride(-1) != 1 or not _on_device(z):
        return ce_tail_torch(z, y, w8, grad)

    def kernel():
        _ce_tail[(C,)](z, y, w8 if w8 is not None else nll, nll, V, z.stride(0), HAS_W=w8 is not None, GRAD=grad,
                       BV=_CE_BV if not INTERPRET else 1024, EMU=INTERPRET, num_warps=8)
        return nll

    return _guarded(kernel, lambda: ce_tail_torch(z, y, w8, grad))


def ce_tail_torch(z, y, w8, grad: bool) -> torch.Tensor:
    """ce_tail in PyTorch operations: core.savers' chunked loss as it was written (the reference, and
    the path once a kernel has failed)."""
    zf = z.float()
    lse = torch.logsumexp(zf, dim=-1)
    nll = lse - zf.gather(1, y[:, None]).squeeze(1)
    if grad:
        p = zf.sub_(lse[:, None]).exp_()
        p[torch.arange(p.shape[0], device=p.device), y] -= 1.0
        if w8 is not None:
            p.mul_(w8[:, None])
        z.copy_(p)
    return nll


# ---------------------------------------------------------------------------------------
# Installing on a transformers model
# ---------------------------------------------------------------------------------------

class _InAttn(threading.local):
    depth = 0


# Set by the first kernel that fails to run (a GPU or Triton it cannot compile for): from then on every
# patched module takes transformers' path, and install() says why. Out-of-memory errors are not
# failures of the kernel: they go up to the engine's retry as they would from transformers' path.
BROKEN: Optional[str] = None


def _guarded(kernel, fallback):
    global BROKEN
    if BROKEN is not None:
        return fallback()
    try:
        return kernel()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any compile / launch failure: transformers' path from now on
        BROKEN = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        import warnings

        warnings.warn(f"snugtune's Triton kernels are off for this run: {BROKEN}", RuntimeWarning, stacklevel=2)
        return fallback()


_IN_ATTN = _InAttn()
_ROPE_ORIG: dict[str, object] = {}  # module name -> transformers' apply_rotary_pos_emb


def _rope_dispatcher(orig):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _IN_ATTN.depth > 0 and unsqueeze_dim == 1 and rotary_usable(q, k, cos, sin):
            return _guarded(lambda: rotary(q, k, cos, sin), lambda: orig(q, k, cos, sin, unsqueeze_dim))
        return orig(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._snug_orig = orig
    return apply_rotary_pos_emb


def _bind_rope(modname: str) -> bool:
    """Rebind the module's apply_rotary_pos_emb to the dispatcher (once per process)."""
    mod = sys.modules.get(modname)
    f = getattr(mod, "apply_rotary_pos_emb", None) if mod is not None else None
    if f is None:
        return False
    if hasattr(f, "_snug_orig"):
        return True
    try:
        params = list(inspect.signature(f).parameters)
    except (TypeError, ValueError):
        return False
    if params != ["q", "k", "cos", "sin", "unsqueeze_dim"]:
        return False  # another signature than the one this dispatcher stands in for
    _ROPE_ORIG[modname] = f
    mod.apply_rotary_pos_emb = _rope_dispatcher(f)
    return True


def _patch(mod, fn) -> None:
    fn._snug_orig = mod.forward
    mod.forward = fn


def _patch_attention(attn) -> None:
    orig = attn.forward

    def forward(*args, **kwargs):
        _IN_ATTN.depth += 1
        try:
            return orig(*args, **kwargs)
        finally:
            _IN_ATTN.depth -= 1

    _patch(attn, forward)


def _patch_norm(norm, gemma: bool) -> None:
    orig = norm.forward
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(x, *args, **kwargs):
        w = norm.weight
        if args or kwargs or w.requires_grad or x.shape[-1] != w.shape[0] or not _on_device(x, w):
            return orig(x, *args, **kwargs)
        return _guarded(lambda: _RMSNorm.apply(x, w, eps, gemma), lambda: orig(x))

    _patch(norm, forward)


def _patch_mlp(mlp, gelu: bool) -> None:
    orig = mlp.forward

    def forward(x, *args, **kwargs):
        if args or kwargs:
            return orig(x, *args, **kwargs)
        g = mlp.gate_proj(x)
        u = mlp.up_proj(x)
        if g.shape != u.shape or g.dtype != u.dtype or not _on_device(g, u):
            return mlp.down_proj(mlp.act_fn(g) * u)
        return mlp.down_proj(_guarded(lambda: _GLU.apply(g, u, gelu), lambda: mlp.act_fn(g) * u))

    _patch(mlp, forward)


def _gelu_tanh(act) -> bool:
    # transformers' GELUTanh is F.gelu(approximate="tanh") or its Python formula: the same function
    return type(act).__name__ in GELU_TANH_ACTS


def install(hf, norms: bool = True) -> str:
    """Route hf's RMSNorms, GLU MLPs and rotary embedding through the kernels; returns what it did.

    `norms` False leaves the norms alone (the fp16 guard, core.fp16guard, patches them itself)."""
    if BROKEN is not None:
        return f"off: a kernel failed earlier in this process ({BROKEN})"
    n_norm = n_mlp = n_attn = 0
    for mod in hf.modules():
        name = type(mod).__name__
        if "forward" in mod.__dict__:
            continue  # patched by someone else (a saver, a bench's marker): left as it is
        if norms and (name in LLAMA_NORMS or name in GEMMA_NORMS) and isinstance(getattr(mod, "weight", None),
                                                                                 torch.Tensor):
            _patch_norm(mod, name in GEMMA_NORMS)
            n_norm += 1
        elif name in MLP_CLASSES and all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            act = type(mod.act_fn).__name__
            if act in SILU_ACTS or _gelu_tanh(mod.act_fn):
                _patch_mlp(mod, act not in SILU_ACTS)
                n_mlp += 1
        elif name in ATTN_CLASSES and _bind_rope(type(mod).__module__):
            _patch_attention(mod)
            n_attn += 1
    return f"triton: {n_norm} RMSNorms, {n_mlp} GLU MLPs, rotary in {n_attn} attentions"


def uses_kernels(mod) -> bool:
    """Whether a module's forward is one of install()'s (for tests and benches)."""
    f = mod.__dict__.get("forward")
    return f is not None and getattr(f, "__qualname__", "").startswith(("_patch_norm", "_patch_mlp", "_patch_attention"))
