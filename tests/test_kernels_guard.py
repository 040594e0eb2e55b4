"""The fp16 guard's norms through core/kernels.py's fused RMSNorm, on the CPU (Triton's interpreter).

core.fp16guard keeps the residual stream fp32 under fp16: the norms that read it take fp32 and hand
the matmuls fp16, the norms that feed it (Gemma's post-norms) take fp16 and return fp32. With the
kernels installed those norms are the fused kernel with those dtypes (session 7; before, the guard's
own PyTorch norms, which keep fp32 copies: fp16 + guard held 1.31 GiB against bf16's 1.18 on Gemma 3
270M, bench/results/real_weights_run5.md). Checked here against the guard's PyTorch path and a
float64 reference, forward and backward, and what each keeps for the backward.
"""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("transformers")


# the kernels interpreted (TRITON_INTERPRET at their decoration), the warnings filter and the error measure are
# tests/test_kernels.py's
from tests.test_kernels import K, _gen, _grad_fns, _quiet, _rel  # noqa: E402,F401

import torch.nn.functional as F  # noqa: E402

from core import fp16guard  # noqa: E402

F16 = torch.float16


def _tiny(kind: str = "gemma3", layers: int = 2):
    """A tiny fp16 model with frozen norms moved off their init (so the weight terms count)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "gemma3":
        cfg = AutoConfig.for_model("gemma3_text", head_dim=32, sliding_window=8, query_pre_attn_scalar=32,
                                   layer_types=["sliding_attention", "full_attention"][:layers], **common)
    elif kind == "gemma2":
        cfg = AutoConfig.for_model("gemma2", head_dim=16, sliding_window=8, query_pre_attn_scalar=16, **common)
    else:
        cfg = AutoConfig.for_model(kind, **common)
    cfg._attn_implementation = "eager" if kind == "gemma2" else "sdpa"  # (transformers' Gemma 2: eager only)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=F16)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    for n, p in m.named_parameters():
        p.requires_grad_("norm" not in n)
    return m


def _guarded(kind: str, fused: bool, layers: int = 2):
    m = _tiny(kind, layers)
    K.install(m, norms=False)  # as core.savers does under the guard: the norms are left to it
    what = fp16guard.install(m, F16, kernels=fused)["fp16_guard"]
    return m, what


def _ref64(x, w, eps, gemma):
    """RMSNorm in float64: x / rms(x) * (1 + w) (Gemma) or * w (Llama)."""
    x = x.double()
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return n * (1.0 + w.double()) if gemma else n * w.double()


# ---- one norm, both directions of the stream -----------------------------------------------------

# (Llama-style blocks, Qwen2 here, have no norm that feeds the stream: the guard forced on reads it only)
@pytest.mark.parametrize("kind,role", [("gemma3", "reads"), ("gemma3", "feeds"), ("qwen2", "reads")])
def test_guard_norm_fused_matches_its_pytorch_norm_and_float64(kind, role):
    """A norm that reads the stream: fp32 in (values past fp16's 65,504), fp16 out; one that feeds it:
    fp16 in, fp32 out. The fused result against the guard's PyTorch norm and float64, forward and
    backward (dx in the input's dtype)."""
    fused, _ = _guarded(kind, True)
    torch_m, _ = _guarded(kind, False)
    lyr, lyr_t = fused.model.layers[0], torch_m.model.layers[0]
    name = "input_layernorm" if role == "reads" else "post_attention_layernorm"
    norm, norm_t = getattr(lyr, name), getattr(lyr_t, name)
    assert norm.forward.__qualname__ != norm_t.forward.__qualname__
    g = _gen(3)
    if role == "reads":  # the residual stream: Gemma 3 270M's reaches 104,000 (core/fp16guard.py)
        x = (torch.randn(2, 19, 64, generator=g) * 3e4).float()
        gy = torch.randn(2, 19, 64, generator=g).to(F16)
        want_y, want_dx = F16, torch.float32
    else:  # the attention's fp16 output
        x = (torch.randn(2, 19, 64, generator=g) * 40).to(F16)
        gy = (torch.randn(2, 19, 64, generator=g) * 1e3).float()  # the stream's gradient is fp32
        want_y, want_dx = torch.float32, F16
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    y = norm(xa)
    yt = norm_t(xb)
    y64 = _ref64(x64, norm.weight, norm.eps if hasattr(norm, "eps") else norm.variance_epsilon, kind == "gemma3")
    (dx,) = torch.autograd.grad(y, xa, gy)
    (dxt,) = torch.autograd.grad(yt, xb, gy)
    (dx64,) = torch.autograd.grad(y64, x64, gy.double())
    assert y.dtype == yt.dtype == want_y and dx.dtype == dxt.dtype == want_dx
    assert type(y.grad_fn).__name__ == "_RMSNormBackward" and type(yt.grad_fn).__name__ != "_RMSNormBackward"
    # the same fp32 arithmetic rounded once: no further from float64 than the guard's PyTorch norm (a
    # 16-bit result: within one rounding of it; an fp32 one: the row sum's order)
    ulp = 2.0 ** -10 if want_y == F16 else 2.0 ** -22
    assert _rel(y, yt) <= ulp and _rel(y, y64) <= _rel(yt, y64) + ulp
    ulp_dx = 2.0 ** -10 if want_dx == F16 else 2.0 ** -20
    assert _rel(dx, dxt) <= ulp_dx and _rel(dx, dx64) <= _rel(dxt, dx64) + ulp_dx
    assert _rel(y, y64) < 2 * ulp and _rel(dx, dx64) < 2 * ulp_dx


def _saved_bytes(fn, x):
    """Bytes autograd keeps for fn(x)'s backward (each storage once), and the kept tensors."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    seen, total = set(), 0
    for t in kept:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key in seen or tuple(t.shape) == (x.shape[-1],):  # the frozen weight, or its 1 + w
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total, kept, y


def test_guard_norms_keep_what_the_fused_bf16_norm_keeps():
    """The fused guard norm that feeds the stream keeps its fp16 input and 1/rms, what the fused norm
    keeps in bf16 (the PyTorch path keeps an fp32 copy: twice that); one that reads the stream keeps the
    stream tensor it was given, nothing more (the block's first norm: the block input, kept anyway)."""
    fused, _ = _guarded("gemma3", True)
    torch_m, _ = _guarded("gemma3", False)
    lyr, lyr_t = fused.model.layers[0], torch_m.model.layers[0]
    T, h = 2 * 23, 64
    x16 = torch.randn(2, 23, h, generator=_gen(4)).to(F16).requires_grad_(True)
    feed, _, _ = _saved_bytes(lyr.post_attention_layernorm, x16)
    feed_t, _, _ = _saved_bytes(lyr_t.post_attention_layernorm, x16)
    xb = x16.detach().to(torch.bfloat16).requires_grad_(True)
    w = lyr.post_attention_layernorm.weight
    bf16, _, _ = _saved_bytes(lambda t: K.rms_norm(t, w.to(torch.bfloat16), 1e-6, True), xb)
    assert feed == T * h * 2 + T * 4 == bf16
    assert feed_t >= T * h * 4
    x32 = (torch.randn(2, 23, h, generator=_gen(5)) * 1e4).requires_grad_(True)
    read, kept, _ = _saved_bytes(lyr.pre_feedforward_layernorm, x32)
    assert read == T * h * 4 + T * 4
    assert any(t.untyped_storage().data_ptr() == x32.untyped_storage().data_ptr() for t in kept)  # no copy


# ---- whole models --------------------------------------------------------------------------------

def _loss_and_grads(m, ids):
    m.zero_grad(set_to_none=True)
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach().float(), torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])


@pytest.mark.parametrize("kind,cls,others", [("gemma3", "Gemma3RMSNorm", 4), ("gemma2", "Gemma2RMSNorm", 0)])
def test_guarded_gemma_with_fused_norms_keeps_loss_and_gradients(kind, cls, others):
    """A tiny Gemma 3 / Gemma 2 in fp16 under the guard: the fused norms give the loss and gradients of
    the guard's PyTorch norms; every norm is fused (the 4 a block and the final one on the fp32 stream,
    Gemma 3's q/k norms as the ordinary fused norm); the stream stays fp32 between the blocks."""
    fused, what = _guarded(kind, True)
    torch_m, what_t = _guarded(kind, False)
    assert f"fused Triton norms: 9 of the stream's, {others} others" in what and "fused" not in what_t
    norms = [m for m in fused.modules() if type(m).__name__ == cls]
    assert len(norms) == 9 + others and all("forward" in m.__dict__ for m in norms)
    ids = torch.randint(0, 128, (2, 16), generator=_gen(6))
    seen = {}

    def hook(mod, args, out):
        seen.setdefault("stream", []).append(out[0].dtype if isinstance(out, tuple) else out.dtype)

    handles = [lyr.register_forward_hook(hook) for lyr in fused.model.layers]
    loss1, g1 = _loss_and_grads(fused, ids)
    for hd in handles:
        hd.remove()
    loss0, g0 = _loss_and_grads(torch_m, ids)
    assert seen["stream"] == [torch.float32, torch.float32]
    assert torch.isfinite(loss1) and abs(float(loss1 - loss0)) <= 2e-3 * abs(float(loss0))
    assert float(F.cosine_similarity(g0.double(), g1.double(), dim=0)) > 0.999
    assert "_RMSNormBackward" in _grad_fns(fused(input_ids=ids, labels=ids).loss)
    assert "_RMSNormBackward" not in _grad_fns(torch_m(input_ids=ids, labels=ids).loss)
    from core import savers

    savers.uninstall_savers(fused)  # every patch carries _snug_orig
    assert not fp16guard.installed(fused) and not any(K.uses_kernels(m) for m in fused.modules())


def test_guard_without_kernels_keeps_its_own_norms():
    """kernels=False (CPU, SNUGTUNE_KERNELS=off, a plan without them) and FUSED_NORMS off: the PyTorch norms."""
    m, what = _guarded("gemma3", False)
    assert "fused" not in what
    assert not any(K.uses_kernels(x) for x in m.modules() if "Norm" in type(x).__name__)
    old = fp16guard.FUSED_NORMS
    fp16guard.FUSED_NORMS = False
    try:
        m2, what2 = _guarded("gemma3", True)
    finally:
        fp16guard.FUSED_NORMS = old
    assert "fused" not in what2 and not any(K.uses_kernels(x) for x in m2.modules() if "Norm" in type(x).__name__)
    ids = torch.randint(0, 128, (1, 12), generator=_gen(9))
    assert torch.equal(_loss_and_grads(m, ids)[0], _loss_and_grads(m2, ids)[0])


def test_a_failing_kernel_sends_the_guard_to_its_own_norms(monkeypatch):
    """A kernel that fails (a GPU or Triton it cannot compile for): one warning, then the guard's PyTorch
    norms, whose loss and gradients the run gets bit for bit."""
    monkeypatch.setattr(K, "BROKEN", None)
    fused, _ = _guarded("gemma3", True)
    torch_m, _ = _guarded("gemma3", False)
    ids = torch.randint(0, 128, (1, 12), generator=_gen(8))

    def broken(*a, **k):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(K._RMSNorm, "apply", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss1, _ = _loss_and_grads(fused, ids)
        loss2, g2 = _loss_and_grads(fused, ids)
    said = [w for w in caught if "kernels are off" in str(w.message)]
    assert len(said) == 1 and K.BROKEN.startswith("RuntimeError: no kernel")
    # (after the failure every kernel takes its PyTorch path, GLU and rotary too, in both models)
    loss0, g0 = _loss_and_grads(torch_m, ids)
    assert torch.equal(loss1, loss0) and torch.equal(loss2, loss0) and torch.equal(g2, g0)
    # a model set up after the failure: the guard's own norms from the start
    _, what = _guarded("gemma3", True)
    assert "fused" not in what
