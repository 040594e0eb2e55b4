"""core.kernels' Triton kernels against transformers' own modules, on the CPU (Triton's interpreter).

Forward and backward of RMSNorm (Llama / Qwen2 and Gemma's 1 + w), SwiGLU / GeGLU and rotary on
small random shapes, then whole tiny Qwen2 and Gemma 3 models with and without the kernels. The
kernels round where transformers' 16-bit operations round, so most outputs are bit-for-bit equal;
the tolerances leave room only for a row reduction's order and the last bit of exp / rsqrt / tanh.
No timing here: bench/gpu_time.py measures the GPU time on a GPU.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")


def _load_kernels():
    # Triton decides at decoration time whether a kernel is interpreted; the variable is restored
    # afterwards (the interpreted kernels stay interpreted), so no other test sees it.
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = sys.modules.get("core.kernels")
        return importlib.reload(mod) if mod is not None and not mod.INTERPRET else importlib.import_module("core.kernels")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


K = _load_kernels()

import torch.nn.functional as F  # noqa: E402
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm  # noqa: E402

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _quiet():
    # the interpreter evaluates exp() in numpy, which warns where it reaches inf (the kernels' limits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _grad_fns(loss) -> set:
    """The class names of every autograd node behind `loss` (which kernels really ran)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        stack.extend(nf for nf, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


@pytest.mark.parametrize("cls,gemma", [(Qwen2RMSNorm, False), (Gemma3RMSNorm, True)])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_rmsnorm_matches_transformers(cls, gemma, dtype):
    g = _gen(1)
    norm = cls(96, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g) * 0.3 + (0.0 if gemma else 1.0))
    norm.weight.requires_grad_(False)
    x = (torch.randn(3, 37, 96, generator=g) * 4).to(dtype).requires_grad_(True)
    gy = torch.randn(3, 37, 96, generator=g).to(dtype)
    y = K.rms_norm(x, norm.weight, 1e-6, gemma)
    (dx,) = torch.autograd.grad(y, x, gy)
    yr = norm(x)
    (dxr,) = torch.autograd.grad(yr, x, gy)
    assert y.dtype == yr.dtype and y.shape == yr.shape
    assert _rel(y, yr) < 1e-6 and _rel(dx, dxr) < 1e-5
    # against the formula in float64: no further from it than transformers' own path
    x64 = x.detach().double().requires_grad_(True)
    w64 = norm.weight.double()
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * ((1 + w64) if gemma else w64)
    (dx64,) = torch.autograd.grad(y64, x64, gy.double())
    assert _rel(dx, dx64) <= _rel(dxr, dx64) * 1.05 + 1e-6
    assert _rel(y, y64.detach()) <= _rel(yr, y64.detach()) * 1.05 + 1e-6


def test_rmsnorm_strided_rows_and_output_dtype():
    # a view with a row stride (q_norm of a sliced projection) and a 32-bit weight on a 16-bit input
    g = _gen(2)
    base = torch.randn(10, 160, generator=g).to(BF16)
    x = base[:, :128].requires_grad_(False)
    w = (torch.randn(128, generator=g) * 0.2 + 1.0)
    norm = Qwen2RMSNorm(128, eps=1e-5)
    norm.weight.data = w
    norm.weight.requires_grad_(False)
    y = K.rms_norm(x, w, 1e-5, False)
    yr = norm(x)
    assert y.dtype == torch.float32 == yr.dtype  # promote(fp32 weight, bf16 input), as transformers
    assert _rel(y, yr) < 1e-6


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_glu_matches_transformers(gelu, dtype):
    g_ = _gen(3)
    gt = (torch.randn(4, 33, 300, generator=g_) * 3).to(dtype).requires_grad_(True)
    ut = torch.randn(4, 33, 300, generator=g_).to(dtype).requires_grad_(True)
    gh = torch.randn(4, 33, 300, generator=g_).to(dtype)
    act = transformers.activations.ACT2FN["gelu_pytorch_tanh" if gelu else "silu"]
    h = K.glu(gt, ut, gelu)
    d = torch.autograd.grad(h, (gt, ut), gh)
    hr = act(gt) * ut
    dr = torch.autograd.grad(hr, (gt, ut), gh)
    assert _rel(h, hr) < 1e-5
    assert all(_rel(a, b) < 1e-5 for a, b in zip(d, dr))
    # large |g| saturates cleanly (no NaN from exp overflow)
    big = torch.tensor([-200.0, -50.0, 0.0, 50.0, 200.0]).to(dtype)
    out = K.glu(big, torch.ones_like(big), gelu)
    assert torch.isfinite(out).all() and torch.equal(out, act(big) * torch.ones_like(big))


def _cos_sin(T, D, B=1, dtype=BF16):
    pos = torch.arange(T, dtype=torch.float32)[None].expand(B, T) + torch.arange(B)[:, None] * 7
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    fr = pos[..., None] * inv
    emb = torch.cat([fr, fr], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("B,cos_b,dtype", [(2, 1, BF16), (2, 2, BF16), (1, 1, torch.float16)])
def test_rotary_matches_transformers(B, cos_b, dtype):
    g = _gen(5)
    T, Hq, Hk, D = 19, 6, 2, 32
    # transformers' layout: projections (B, T, H, D) viewed as (B, H, T, D)
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, T, Hk, D, generator=g).to(dtype).transpose(1, 2).requires_grad_(True)
    cos, sin = _cos_sin(T, D, cos_b, dtype)
    qo, ko = K.rotary(q, k, cos, sin)
    qr, kr = modeling_qwen2.apply_rotary_pos_emb._snug_orig(q, k, cos, sin) \
        if hasattr(modeling_qwen2.apply_rotary_pos_emb, "_snug_orig") else modeling_qwen2.apply_rotary_pos_emb(q, k, cos, sin)
    assert qo.stride() == qr.stride() and torch.equal(qo, qr) and torch.equal(ko, kr)
    gq = torch.randn(qo.shape, generator=g).to(dtype)
    gk = torch.randn(ko.shape, generator=g).to(dtype)
    d = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    dr = torch.autograd.grad((qr, kr), (q, k), (gq, gk))
    assert all(torch.equal(a, b) for a, b in zip(d, dr))


def test_rotary_usable_refuses_what_it_does_not_do():
    q = torch.randn(1, 2, 5, 8).to(BF16)
    cos, sin = _cos_sin(5, 8)
    assert K.rotary_usable(q, q, cos, sin)
    assert not K.rotary_usable(q, q, cos.float(), sin.float())  # mixed dtypes: transformers promotes
    assert not K.rotary_usable(q, q, cos[..., :4], sin[..., :4])  # partial rotary
    assert not K.rotary_usable(q.to("meta"), q.to("meta"), cos.to("meta"), sin.to("meta"))


# ---- whole models ---------------------------------------------------------------------------

def _tiny(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":
        cfg = AutoConfig.for_model("qwen2", **common)
    else:
        cfg = AutoConfig.for_model("gemma3_text", head_dim=32, sliding_window=8, query_pre_attn_scalar=32,
                                   layer_types=["sliding_attention", "full_attention"], **common)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=BF16)
    with torch.no_grad():  # norm weights away from their init (ones / zeros) so the weight terms count
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    for n, p in m.named_parameters():
        p.requires_grad_("norm" not in n)  # frozen norms, as under LoRA
    return m


def _loss_and_grads(m, ids):
    m.zero_grad(set_to_none=True)
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach().float(), torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])


@pytest.mark.parametrize("kind,norms,mlps,attns", [("qwen2", 5, 2, 2), ("gemma3", 13, 2, 2)])
def test_install_on_a_tiny_model_keeps_loss_and_gradients(kind, norms, mlps, attns):
    from core import savers

    m = _tiny(kind)
    ids = torch.randint(0, 128, (2, 16), generator=_gen(6))
    loss0, g0 = _loss_and_grads(m, ids)
    what = K.install(m)
    assert what == f"triton: {norms} RMSNorms, {mlps} GLU MLPs, rotary in {attns} attentions"
    loss1, g1 = _loss_and_grads(m, ids)
    assert abs(float(loss1 - loss0)) <= 1e-3 * abs(float(loss0))
    cos = float(F.cosine_similarity(g0.double(), g1.double(), dim=0))
    assert cos > 0.999, cos
    # the kernels really ran (their autograd nodes are in the graph)
    out = m(input_ids=ids, labels=ids)
    assert {"_RMSNormBackward", "_GLUBackward", "_RotaryBackward"} <= _grad_fns(out.loss)
    # uninstall_savers puts transformers' forwards back
    savers.uninstall_savers(m)
    assert not any(K.uses_kernels(mod) for mod in m.modules())
    loss2, g2 = _loss_and_grads(m, ids)
    assert torch.equal(loss2, loss0) and torch.equal(g2, g0)


def test_rotary_dispatcher_outside_attention_is_transformers():
    m = _tiny("qwen2")
    K.install(m)
    q = torch.randn(1, 2, 5, 8).to(BF16).requires_grad_(True)
    cos, sin = _cos_sin(5, 8)
    qo, _ = modeling_qwen2.apply_rotary_pos_emb(q, q, cos, sin)  # not inside an attention forward
    assert type(qo.grad_fn).__name__ != "_RotaryBackward"


def test_savers_leave_cpu_models_on_transformers_path(tiny_model_dir):
    from core import savers
    from core.plan import plan
    from core.catalog import spec_from_dir
    from core.config import RunConfig
    from core.gpu import cpu_target
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = RunConfig.from_dict({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"path": "x", "max_seq_len": 64}})
    applied = savers.install_savers(m, plan(cfg, spec_from_dir(tiny_model_dir), cpu_target()))
    assert applied["kernels"] == "off: not on a CUDA device" and savers.LORA_EPILOGUE is None
    assert savers.CE_TAIL is None  # the chunked loss keeps its PyTorch ops
    assert not any(K.uses_kernels(mod) for mod in m.modules())


def test_installed_kernels_set_the_epilogue_and_loss_hooks(monkeypatch):
    from core import savers

    monkeypatch.setattr(savers, "_install_kernels_on", lambda hf, plan, dev: "triton: 1 RMSNorms, 0 GLU MLPs, rotary in 0 attentions")
    monkeypatch.setattr(savers, "LORA_EPILOGUE", None)
    monkeypatch.setattr(savers, "CE_TAIL", None)
    savers._install_kernels(None, None, torch.device("cpu"))
    assert savers.LORA_EPILOGUE.__name__ == "lora_epilogue" and savers.CE_TAIL.__name__ == "ce_tail"
    monkeypatch.setattr(savers, "_install_kernels_on", lambda hf, plan, dev: "off: SNUGTUNE_KERNELS=off")
    savers._install_kernels(None, None, torch.device("cpu"))
    assert savers.LORA_EPILOGUE is None and savers.CE_TAIL is None


def test_install_savers_tiles_the_fused_mlp(tiny_model_dir, monkeypatch):
    # run 2 of bench/gpu_time.py: the MLP tiling took the kernels' patched forward for an earlier
    # tiling and skipped it, so a 26,176-token row ran its MLP untiled and ran out of memory
    from core import savers
    from core.catalog import spec_from_dir
    from core.config import RunConfig
    from core.gpu import cpu_target
    from core.plan import plan
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(savers, "_install_kernels", lambda hf, p, dev: K.install(hf, norms=not p.fp16_guard))
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = RunConfig.from_dict({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"path": "x", "max_seq_len": 64}})
    applied = savers.install_savers(m, plan(cfg, spec_from_dir(tiny_model_dir), cpu_target()))
    assert applied["kernels"].startswith("triton:") and applied["mlp_tiling"].startswith("tiles of")
    mlps = [lyr.mlp for lyr in savers._decoder_layers(m)]
    assert mlps and all(getattr(p.forward, "_snug_tiled", False) for p in mlps)
    assert all(p.forward._snug_orig.__qualname__.startswith("_patch_mlp") for p in mlps)


def test_tiled_fused_mlp_matches_untiled():
    from core import savers

    m = _tiny("qwen2")
    K.install(m)
    ids = torch.randint(0, 128, (1, 16), generator=_gen(7))
    loss0, g0 = _loss_and_grads(m, ids)
    for lyr in m.model.layers:
        savers.tiled_mlp_forward(lyr.mlp, 96, min_tokens=1, tile=5)  # 16 tokens: tiles of 5, 5, 5, 1
    loss1, g1 = _loss_and_grads(m, ids)
    # the same rows through the same kernels; the CPU's bf16 matmuls block 5-row tiles differently
    assert abs(float(loss1 - loss0)) <= 1e-3 * abs(float(loss0))
    assert float(F.cosine_similarity(g0.double(), g1.double(), dim=0)) > 0.9999


def test_a_failing_kernel_falls_back_to_transformers(monkeypatch):
    m = _tiny("qwen2")
    ids = torch.randint(0, 128, (1, 12), generator=_gen(8))
    loss0, g0 = _loss_and_grads(m, ids)
    K.install(m)

    def broken(*a, **k):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(K, "BROKEN", None)
    monkeypatch.setattr(K._RMSNorm, "apply", broken)
    with pytest.warns(RuntimeWarning, match="kernels are off"):
        loss1, _ = _loss_and_grads(m, ids)
    assert K.BROKEN.startswith("RuntimeError: no kernel")
    loss2, g2 = _loss_and_grads(m, ids)  # every patched module on transformers' path now
    assert torch.equal(loss1, loss0) and torch.equal(loss2, loss0) and torch.equal(g2, g0)
    assert K.install(_tiny("qwen2")).startswith("off: a kernel failed earlier")


def test_install_without_norms_leaves_them_to_the_fp16_guard():
    m = _tiny("gemma3")
    what = K.install(m, norms=False)
    assert what == "triton: 0 RMSNorms, 2 GLU MLPs, rotary in 2 attentions"
    assert not any(K.uses_kernels(mod) for mod in m.modules() if type(mod).__name__ in K.GEMMA_NORMS)


@pytest.mark.parametrize("path", ["tensor_cores", "fma"])
@pytest.mark.parametrize("dtype,R,bias", [(BF16, 16, False), (BF16, 16, True), (BF16, 8, True), (torch.float16, 16, True),
                                          (BF16, 40, False)])
def test_lora_epilogue_matches_the_fp32_sum(path, dtype, R, bias, monkeypatch):
    # core.savers' fp32 LoRA sum: o.addmm_(xa.float(), B.float().t(), alpha=scale); o.add_(bias); o.to(dt).
    # "tensor_cores": B split into three bf16 parts (an fp16 xa into two) on tl.dot; "fma": cards
    # without bf16 tensor cores, r outer products
    monkeypatch.setattr(K, "_tensor_cores", lambda dev: path == "tensor_cores")
    g = _gen(9)
    T, N, scale = 70, 300, 2.0
    o = torch.randn(T, N, generator=g) * 3
    xa = torch.randn(T, R, generator=g).to(dtype)
    B = torch.randn(N, R, generator=g) * 0.05
    b = (torch.randn(N, generator=g) * 0.5).to(dtype) if bias else None
    ref = K.lora_epilogue_torch(o.clone(), xa, B, b, scale, dtype)
    y = K.lora_epilogue(o, xa, B, b, scale, dtype)
    assert y.dtype == dtype and y.shape == ref.shape
    # the exact sum (float64) rounded once: every output but those where fp32's order of summation
    # crossed a rounding edge (the exact value is rounded via fp32 here, so allow a few)
    exact = (o.double() + scale * (xa.double() @ B.double().t()) + (b.double() if bias else 0.0)).float().to(dtype)
    assert float((y == exact).float().mean()) > 0.999
    assert float((y == ref).float().mean()) > 0.999
    assert float(((y.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-3)).max()) <= 2 ** -7


def test_lora_epilogue_keeps_a_term_under_half_a_bf16_step():
    # what the fp32 sum is for (core.savers.LORA_SUM_FP32): a LoRA term of 1/8 of a bf16 step still moves
    # the outputs by itself on average, because the base output is rounded only together with it
    g = _gen(10)
    T, N, R = 64, 256, 16
    o = 1.0 + torch.rand(T, N, generator=g)  # in [1, 2): bf16's step there is 2^-7
    xa = torch.full((T, R), 1.0 / R).to(BF16)
    B = torch.full((N, R), 2.0 ** -10)  # scale 1: the term is 2^-10 on every output
    y = K.lora_epilogue(o.clone(), xa, B, None, 1.0, BF16)
    moved = float((y.double() - o.double()).mean())
    assert abs(moved - 2.0 ** -10) < 0.1 * 2.0 ** -10
    # rounding first and adding after (the old sum) loses it: bf16(bf16(o) + 2^-10) == bf16(o)
    assert torch.equal((o.to(BF16).float() + 2.0 ** -10).to(BF16), o.to(BF16))


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_ce_tail_matches_the_chunked_loss_ops(dtype, weighted):
    g = _gen(11)
    C, V = 7, 2500  # V not a multiple of the kernel's block of the row
    z = (torch.randn(C, V, generator=g) * 4).to(dtype)
    y = torch.randint(0, V, (C,), generator=g)
    w8 = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]) if weighted else None
    z_ref = z.clone()
    nll_ref = K.ce_tail_torch(z_ref, y, w8, True)
    nll = K.ce_tail(z, y, w8, True)
    assert torch.allclose(nll, nll_ref, rtol=0, atol=2e-6)
    # the gradient written over the logits: the same fp32 numbers, each rounded once to z's dtype
    assert float((z == z_ref).float().mean()) > (0.999 if dtype != torch.float32 else 0.3)
    assert float((z.float() - z_ref.float()).abs().max()) <= 1e-6
    if weighted:
        assert not z[1].any() and not z[4].any()
    z2 = (torch.randn(C, V, generator=g) * 4).to(dtype)
    keep = z2.clone()
    assert torch.allclose(K.ce_tail(z2, y, None, False), K.ce_tail_torch(keep.clone(), y, None, False), rtol=0, atol=2e-6)
    assert torch.equal(z2, keep)  # no gradient asked: the logits are left as they were


@pytest.mark.parametrize("static", [False, True])
def test_chunked_loss_through_ce_tail(static, monkeypatch):
    from core import savers

    g = _gen(12)
    T, H, V = 37, 48, 1500
    hidden = (torch.randn(1, T, H, generator=g)).to(BF16)
    weight = (torch.randn(V, H, generator=g) * 0.2).to(BF16)
    labels = torch.randint(0, V, (1, T), generator=g)
    labels[0, :5] = -100

    def run():
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        if static:
            loss = savers.chunked_lm_loss_static(h, w, labels, torch.tensor(0.0), torch.tensor(1.0), chunk_tokens=10)
        else:
            loss = savers.chunked_lm_loss(h, w, labels, chunk_tokens=10)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    monkeypatch.setattr(savers, "CE_TAIL", None)
    l0, gh0, gw0 = run()
    monkeypatch.setattr(savers, "CE_TAIL", K.ce_tail)
    l1, gh1, gw1 = run()
    assert abs(float(l1 - l0)) <= 1e-6 * abs(float(l0))
    assert _rel(gh1, gh0) < 1e-3 and _rel(gw1, gw0) < 1e-4


