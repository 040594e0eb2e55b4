"""bench/gpu_time.py's pieces that run without a GPU, and the speed fix it measures.

The bench itself needs CUDA for numbers; here: the FLOPs formula against hand counts, the kernel
classifier on names the profiler reports (H200, torch 2.11, bench/results/run2_profile_*.txt),
and the fused NF4 + LoRA node giving bit-identical gradients with and without the 16-bit adapter
copies kept for backward (core.savers.REUSE_IN_BACKWARD).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import gpu_time  # noqa: E402

from core import savers  # noqa: E402


def test_flops_per_token_qwen15b_by_hand():
    cfg = gpu_time.shape_cfg("qwen2.5-1.5b")
    f = gpu_time.flops_per_token(cfg, 1024)
    # per block: q 1536x1536, k/v 1536x256 each, o 1536x1536, gate/up/down 1536x8960 each
    per_layer = 1536 * 1536 * 2 + 2 * 1536 * 256 + 3 * 1536 * 8960
    assert f["N"] == 28 * per_layer + 151936 * 1536
    assert f["attn_per_token"] == 6 * 28 * 12 * 128 * 1024
    assert f["conv_6N"] == 6 * f["N"] + f["attn_per_token"]
    assert f["qlora_4N"] < f["conv_6N"]
    f8 = gpu_time.flops_per_token(gpu_time.LLAMA31_8B, 2048)
    assert 7.4e9 < f8["N"] < 7.6e9  # 6.98 B in the blocks + 0.53 B untied head


@pytest.mark.parametrize("name,ops,kind", [
    ("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_TNT", ["aten::mm", "aten::matmul"], "matmul"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, ...)",
     ["bitsandbytes::dequantize_4bit"], "dequant"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma", ["aten::_cudnn_attention_backward"], "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, exp>", ["aten::exp_", "_ChunkedLinearCE"], "loss"),
    ("void at::native::unrolled_elementwise_kernel<copy>", ["aten::copy_", "aten::_to_copy", "aten::to"], "copies"),
    ("Memcpy HtoD (Pinned -> Device)", ["aten::copy_"], "copies"),
    ("void kOptimizerStatic8bit2StateBlockwise<float, 0, 256, 1>", ["bitsandbytes::optimizer_update_8bit_blockwise",
                                                                    "gt.opt"], "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, mul>", ["aten::mul", "gt.block"], "elementwise"),
    ("nvjet_sm90_tst_96x128_64x6_2x1_v_bz_NNN", ["gt.graph"], "matmul"),  # a graph replay: by name
])
def test_kernel_kinds(name, ops, kind):
    assert gpu_time.kind_of(name, ops) == kind


def test_phases():
    assert gpu_time.phase_of(["aten::mm", "gt.block", "gt.fwd"], True) == "forward"
    assert gpu_time.phase_of(["aten::mm", "gt.block", "_CheckpointBlockBackward"], True) == "recompute"
    assert gpu_time.phase_of(["aten::mm", "autograd::engine::evaluate_function: MmBackward0"], True) == "backward"
    assert gpu_time.phase_of(["Optimizer.step#PagedAdamW8bit.step"], True) == "optimizer"
    assert gpu_time.phase_of(["gt.graph"], True) == "graph replay"


def _fused_layer(tmp_path, alpha=24, cache_absmax=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    c = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    Qwen2ForCausalLM(c).to(torch.bfloat16).save_pretrained(tmp_path / "q")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=q, dtype=torch.bfloat16,
                                             device_map={"": "cpu"})
    savers.prepare_for_kbit_training(m, False)  # as the engine: before the adapters (they stay fp32)
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]))
    for n, p in m.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
            with torch.no_grad():
                p.normal_(0, 0.05)  # B starts at zero in peft: give both adapters values
    assert savers.fuse_lora_4bit(m, cache_absmax=cache_absmax) == 7
    return m.base_model.model.model.layers[0].self_attn.q_proj


def _reference(layer, x, g):
    """The fused node's math as it was written before this pass: the fp32 masters cast again in
    backward, every scale a separate multiply (core.savers before bench/gpu_time.py run 1)."""
    import bitsandbytes.functional as bnbf

    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = float(layer.scaling["default"])
    base = layer.base_layer
    W = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)
    dt = W.dtype
    x2 = x.reshape(-1, x.shape[-1])
    xa = torch.nn.functional.linear(x2, A.to(dt))
    if savers.LORA_SUM_FP32:  # the forward's sum in fp32, rounded once (real_weights run 4's change)
        out = torch.mm(x2.float(), W.float().t())
        out.addmm_(xa.float(), B.float().t(), alpha=s)
        if base.bias is not None:
            out.add_(base.bias.to(dt))
        out = out.to(dt)
    else:
        out = torch.nn.functional.linear(x2, W, base.bias.to(dt) if base.bias is not None else None)
        out.addmm_(xa, B.to(dt).t(), alpha=s)
    g2 = g.reshape(-1, g.shape[-1])
    gxa = torch.mm(g2, B.to(dt)).mul_(s)
    dB = torch.mm(g2.t(), xa).mul_(s).to(B.dtype)
    dA = torch.mm(gxa.t(), x2).to(A.dtype)
    dx = torch.mm(g2, W)
    dx.addmm_(gxa, A.to(dt))
    return out.view(x.shape[:-1] + out.shape[-1:]), dx.view(x.shape), dA, dB


@pytest.mark.parametrize("alpha", [16, 24])  # scale 2 (a power of two: folded into the matmul) and 3
def test_fused_node_gradients_bit_identical_to_the_earlier_kernels(tmp_path, alpha):
    layer = _fused_layer(tmp_path, alpha)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 9, 64, generator=gen).to(torch.bfloat16)
    g = torch.randn(2, 9, 64, generator=gen).to(torch.bfloat16)
    A.grad = B.grad = None
    x = x0.clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    with torch.no_grad():
        ry, rdx, rdA, rdB = _reference(layer, x0, g)
    for got, ref in ((y.detach(), ry), (x.grad, rdx), (A.grad, rdA), (B.grad, rdB)):
        assert got.dtype == ref.dtype and torch.equal(got, ref)


def test_kept_adapter_casts_give_identical_gradients(tmp_path, monkeypatch):
    """The 16-bit adapter copies kept from forward: same output and same x/A/B gradients, bit for bit,
    as casting the fp32 masters again in backward (a scale of 3, not a power of two)."""
    layer = _fused_layer(tmp_path)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 9, 64, generator=gen).to(torch.bfloat16)
    g = torch.randn(2, 9, 64, generator=gen).to(torch.bfloat16)
    got = {}
    for keep in (False, True):
        monkeypatch.setattr(savers, "REUSE_IN_BACKWARD", keep)
        A.grad = B.grad = None
        x = x0.clone().requires_grad_(True)
        y = layer(x)
        y.backward(g)
        got[keep] = (y.detach(), x.grad, A.grad.clone(), B.grad.clone())
    assert got[True][2].dtype == torch.float32 and got[True][3].dtype == torch.float32
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a, b)
    assert float(got[True][3].abs().sum()) > 0


def test_recompute_reuses_the_dequantized_weight(tmp_path, monkeypatch):
    """Where memory is spare (expanded scales), a linear run inside a checkpointed block's recompute
    keeps its dequantized weight for the backward that follows: one dequantization fewer, the same
    bits; outside a recompute, or with memory tight, the backward dequantizes again."""
    calls = []
    real = savers._dequant

    def counting(spec):
        calls.append(1)
        return real(spec)

    monkeypatch.setattr(savers, "_dequant", counting)
    monkeypatch.setattr(savers, "REUSE_DEQUANT_IN_RECOMPUTE", True)
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(1, 7, 64, generator=gen).to(torch.bfloat16)
    g = torch.randn(1, 7, 64, generator=gen).to(torch.bfloat16)
    got = {}
    for cache in (False, True):
        layer = _fused_layer(tmp_path / str(cache), 16, cache_absmax=cache)
        for active in (False, True):
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.grad = None
            x = x0.clone().requires_grad_(True)
            calls.clear()
            monkeypatch.setattr(savers._Recompute, "active", active)
            y = layer(x)
            monkeypatch.setattr(savers._Recompute, "active", False)
            y.backward(g)
            reused = cache and active
            assert len(calls) == (1 if reused else 2), (cache, active, len(calls))
            got[(cache, active)] = (y.detach(), x.grad, layer.lora_A["default"].weight.grad.clone(),
                                    layer.lora_B["default"].weight.grad.clone())
    for key in [(False, True), (True, False), (True, True)]:
        for a, b in zip(got[(False, False)], got[key]):
            assert torch.equal(a, b), key


def test_checkpointed_block_flags_its_recompute_only():
    """_CheckpointBlock raises the recompute flag around the block's second forward, nowhere else."""
    seen = []

    def run(h):
        seen.append(savers._Recompute.active)
        return h * 2.0

    x = torch.randn(3, 4, requires_grad=True)
    out = savers._CheckpointBlock.apply(x, run, 0, None, [], False)
    assert seen == [False]
    out.sum().backward()
    assert seen == [False, True] and not savers._Recompute.active
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


@pytest.mark.slow
def test_engine_savers_train_bit_identically_with_the_reuse(tmp_path, monkeypatch):
    """Through install_savers with 1 of 3 blocks kept (spare memory: expanded scales, weight reuse in
    the 2 recomputed blocks): 3 AdamW steps give the same losses and adapters, bit for bit, with the
    backward's reuse on and off, and the reuse really dequantizes less."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from core.catalog import spec_from_config
    from core.config import RunConfig
    from core.gpu import cpu_target
    from core.plan import plan

    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(c).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 211, (1, 48), generator=torch.Generator().manual_seed(2))
    calls = []
    real = savers._dequant
    monkeypatch.setattr(savers, "_dequant", lambda spec: calls.append(1) or real(spec))
    monkeypatch.setattr(savers, "REUSE_DEQUANT_IN_RECOMPUTE", True)
    runs = {}
    for reuse in (False, True):
        monkeypatch.setattr(savers, "REUSE_IN_BACKWARD", reuse)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
        savers.prepare_for_kbit_training(m, True)
        torch.manual_seed(0)
        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
        cfg = RunConfig.from_dict({"model": {"name_or_path": "tiny"}, "data": {"path": "x.jsonl", "max_seq_len": 48},
                                   "train": {}})
        pl = plan(cfg, spec_from_config(savers._unwrap(m).config.to_dict(), "tiny", source="local"), cpu_target(),
                  keep=1)
        applied = savers.install_savers(m, pl)
        assert applied["checkpointing"].startswith("2/3") and applied["cached_block_scales"] is True, applied
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses, counts = [], []
        for _ in range(3):
            calls.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            counts.append(len(calls))
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss))
        adapters = [p.detach().clone() for n, p in m.named_parameters() if "lora_" in n]
        runs[reuse] = (losses, adapters, counts)
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))
    # 21 projections: forward 21 + recompute 14 + backward 21 = 56; the reuse saves the 14 recomputed ones
    assert runs[False][2] == [56] * 3 and runs[True][2] == [42] * 3, (runs[False][2], runs[True][2])
