"""core.savers on the CPU: the savers change memory, never the math.

Tiny models (hidden 64, 2 layers, seq <= 128) built locally; bitsandbytes 4-bit runs on CPU.
"""
from __future__ import annotations

import copy

import pytest
import torch

from core import savers
from core.config import RunConfig


def _cfg(**train):
    return RunConfig.from_dict({"model": {"name_or_path": "tiny"}, "data": {"path": "x.jsonl", "max_seq_len": 128},
                                "train": train})


def _plan(model, **train):
    """The plan the engine would execute for this tiny model on the CPU (core.plan)."""
    from core.catalog import spec_from_config
    from core.gpu import cpu_target
    from core.plan import plan

    hf = savers._unwrap(model)
    return plan(_cfg(**train), spec_from_config(hf.config.to_dict(), "tiny", source="local"), cpu_target())


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _hf_loss(hidden, weight, labels, num_items_in_batch=None, softcap=None):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = hidden @ weight.t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return ForCausalLMLoss(logits, labels, weight.shape[0], num_items_in_batch=num_items_in_batch)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("nib", [None, 37])
@pytest.mark.parametrize("head_trainable", [False, True])
def test_chunked_loss_matches_hf_and_grads(softcap, nib, head_trainable):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 50, 16, 97
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 3
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :10] = -100  # a masked prompt
    labels[1, 30:] = -100  # padding
    h1 = hidden.clone().requires_grad_(True)
    w1 = weight.clone().requires_grad_(head_trainable)
    ref = _hf_loss(h1, w1, labels, nib, softcap)
    ref.backward()
    h2 = hidden.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(head_trainable)
    # chunk of 7 tokens: many chunks, the last one partial
    ours = savers.chunked_lm_loss(h2, w2, labels, num_items_in_batch=nib, softcap=softcap, chunk_tokens=7)
    (ours * 2.0).backward()  # a non-unit upstream gradient must scale the stored one
    # both compute the logits' softmax in fp32 (HF upcasts with .float()), so fp32 tolerances
    assert torch.allclose(ours.detach(), ref.detach(), rtol=1e-6), (float(ours), float(ref))
    assert _rel(h2.grad, 2 * h1.grad) < 1e-5
    assert h2.grad[0, :9].abs().max() == 0  # ignored positions get no gradient
    if head_trainable:
        assert _rel(w2.grad, 2 * w1.grad) < 1e-5
    else:
        assert w2.grad is None


def test_chunked_loss_shift_labels_and_all_ignored():
    hidden = torch.randn(1, 8, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64)
    shift = torch.randint(0, 11, (1, 8))
    shift[0, 3] = -100
    ref = _hf_loss(hidden, weight, None if False else torch.full((1, 8), -100), None)  # all ignored: HF gives nan
    assert torch.isnan(ref)
    ours = savers.chunked_lm_loss(hidden, weight, torch.full((1, 8), -100))
    assert float(ours.detach()) == 0.0  # we return 0 so a fully masked micro-batch cannot poison training
    from transformers.loss.loss_utils import ForCausalLMLoss

    ref2 = ForCausalLMLoss(hidden @ weight.t(), None, 11, shift_labels=shift)
    ours2 = savers.chunked_lm_loss(hidden, weight, shift_labels=shift, chunk_tokens=3)
    assert torch.allclose(ours2, ref2)


def _tiny_llama(tied=True, dtype=torch.float32, seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=tied, attn_implementation="sdpa")
    return LlamaForCausalLM(c).to(dtype)


def _tiny_gemma2(seed=0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    c = Gemma2Config(vocab_size=203, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                     final_logit_softcapping=5.0, attn_logit_softcapping=3.0, sliding_window=24,
                     tie_word_embeddings=False, attn_implementation="eager")
    return Gemma2ForCausalLM(c)


def _lora(model, seed=1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for n, p in m.named_parameters():  # non-zero B so gradients reach every adapter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return m


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def _assert_same(a, b, rtol=1e-4, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=rtol, atol=atol), (float(la), float(lb))
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        assert torch.allclose(ga[k], gb[k], rtol=rtol, atol=atol * 10), (k, (ga[k] - gb[k]).abs().max())


def _batch(vocab, T=96, packed=False, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, T), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    b = {"input_ids": ids, "labels": labels, "num_items_in_batch": int((labels[:, 1:] != -100).sum())}
    if packed:
        lens = [[30, 40, T - 70], [T // 2, T - T // 2]]
        b["position_ids"] = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lens])
    return b


@pytest.mark.parametrize("offload", ["off", "on"])
@pytest.mark.parametrize("tied", [True, False])
def test_install_savers_same_loss_and_lora_grads(offload, tied):
    base = _lora(_tiny_llama(tied=tied))
    ours = copy.deepcopy(base)
    batch = _batch(211)
    ref = _loss_and_grads(base, batch)
    savers.install_savers(ours, _plan(ours, offload_activations="off"))
    applied = savers.install_savers(ours, _plan(ours, offload_activations=offload))  # replaces, not stacks
    for mod in savers._unwrap(ours).modules():
        f = mod.__dict__.get("forward")
        assert f is None or not hasattr(getattr(f, "_snug_orig", None), "_snug_orig")
    assert applied["loss"].startswith("chunked") and applied["attention"].startswith("snug")
    assert applied["offload"] is (offload == "on")
    _assert_same(ref, _loss_and_grads(ours, batch))
    # eval (no grad, no labels) still gives the model's logits
    ours.eval()
    with torch.no_grad():
        lg = ours(input_ids=batch["input_ids"]).logits
        lg_ref = base.eval()(input_ids=batch["input_ids"]).logits
    assert torch.allclose(lg, lg_ref, atol=1e-5)


def test_packed_rows_never_attend_across_samples():
    """A packed row gives the same per-sample loss and gradients as the samples run one by one."""
    base = _lora(_tiny_llama())
    ours = copy.deepcopy(base)
    savers.install_savers(ours, _plan(ours))
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 211, (1, 30), generator=g), torch.randint(0, 211, (1, 50), generator=g)
    packed = {"input_ids": torch.cat([a, b], 1), "position_ids": torch.cat([torch.arange(30), torch.arange(50)])[None]}
    lab = packed["input_ids"].clone()
    lab[0, 30] = -100  # sample b's first token is no target (a's last token must not predict it)
    packed["labels"] = lab
    n = 29 + 49
    ref_loss = 0.0
    base.train()
    base.zero_grad()
    for s in (a, b):
        out = base(input_ids=s, labels=s, num_items_in_batch=n)
        out.loss.backward()
        ref_loss += float(out.loss)
    ref_grads = {k: p.grad.clone() for k, p in base.named_parameters() if p.requires_grad}
    loss, grads = _loss_and_grads(ours, {**packed, "num_items_in_batch": n})
    _assert_same((torch.tensor(ref_loss), ref_grads), (loss.double().float(), grads))
    # and the packing really matters: without position ids, b would see a
    unpacked = ours(input_ids=packed["input_ids"], labels=lab, num_items_in_batch=n).loss
    assert abs(float(unpacked) - ref_loss) > 1e-4


def test_gemma2_softcap_tiled_attention_and_untied_head():
    base = _lora(_tiny_gemma2())
    ours = copy.deepcopy(base)
    batch = _batch(203, T=80)  # longer than the sliding window (24)
    ref = _loss_and_grads(base, batch)
    applied = savers.install_savers(ours, _plan(ours))
    assert "softcap" in applied["loss"]
    old = savers.ATTN_TILE_ELEMS
    savers.ATTN_TILE_ELEMS = 4 * 17 * 80  # force several query tiles
    try:
        _assert_same(ref, _loss_and_grads(ours, batch), rtol=2e-4)
    finally:
        savers.ATTN_TILE_ELEMS = old


def test_mlp_tiling_same_outputs_and_grads():
    from transformers.models.llama.modeling_llama import LlamaMLP

    m = _tiny_llama()
    mlp = m.model.layers[0].mlp
    assert isinstance(mlp, LlamaMLP)
    ref_mlp = copy.deepcopy(mlp)
    for p in list(mlp.parameters()) + list(ref_mlp.parameters()):
        p.requires_grad_(True)
    savers.tiled_mlp_forward(mlp, 128, tile=16)
    x = torch.randn(2, 100, 64, requires_grad=True)  # 100 = 6 full tiles + a partial one
    x2 = x.detach().clone().requires_grad_(True)
    y, y_ref = mlp(x), ref_mlp(x2)
    assert torch.allclose(y, y_ref, atol=1e-6)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    for (n, p), (_, q) in zip(mlp.named_parameters(), ref_mlp.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), n


def test_checkpoint_with_tiled_mlp_inside_model():
    base = _lora(_tiny_llama())
    ours = copy.deepcopy(base)
    savers.install_savers(ours, _plan(ours, offload_activations="on"))
    for lyr in savers._decoder_layers(savers._unwrap(ours)):
        f = lyr.mlp.forward
        savers.tiled_mlp_forward(lyr.mlp, 128, tile=32, min_tokens=33)  # wrap again with small tiles
        assert lyr.mlp.forward is not f
    # use_cache=False: with a cache HF's own mask ignores packing (ours always honours it)
    batch = {**_batch(211, T=100, packed=True), "use_cache": False}
    _assert_same(_loss_and_grads(base, batch), _loss_and_grads(ours, batch))


def test_prepare_keeps_16bit_and_freezes():
    m = _tiny_llama(dtype=torch.bfloat16)
    m.model.norm.weight.data = m.model.norm.weight.data.float()  # an fp32 leftover is cast down
    savers.prepare_for_kbit_training(m)
    assert all(not p.requires_grad for p in m.parameters())
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_real_4bit_llama_through_peft_loss_falls(tmp_path):
    """Real bitsandbytes NF4 on the CPU, through PeftModel: same losses as without savers, and falling."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny_llama(dtype=torch.bfloat16).save_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(0)
    # only 4 of the 211 tokens occur: the adapters can learn that quickly
    ids = torch.tensor([3, 17, 42, 99])[torch.randint(0, 4, (2, 64), generator=g)]
    pos = torch.cat([torch.arange(32), torch.arange(32)])[None].expand(2, 64)  # two packed samples a row
    runs = {}
    for use in (False, True):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
        assert any(p.__class__.__name__ == "Params4bit" for p in m.parameters())
        savers.prepare_for_kbit_training(m, True)
        torch.manual_seed(0)
        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
        if use:
            applied = savers.install_savers(m, _plan(m, offload_activations="on"))
            assert applied["checkpointing"].startswith("2/2") and applied["offload"] is True
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(6):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(input_ids=ids, labels=ids, position_ids=pos, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss))
        runs[use] = losses
    assert all(v == v for v in runs[True])
    assert runs[True][-1] < 0.92 * runs[True][0], runs[True]
    for a, b in zip(runs[False], runs[True]):
        assert abs(a - b) / a < 0.01, runs


@pytest.mark.parametrize("cache_absmax", [False, True])
def test_fused_lora_4bit_matches_peft(tmp_path, cache_absmax):
    """The fused NF4 + LoRA node gives peft's outputs and gradients (x, A, B), biases included."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    c = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    Qwen2ForCausalLM(c).to(torch.bfloat16).save_pretrained(tmp_path / "q")  # q/k/v carry biases
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=q, dtype=torch.bfloat16,
                                             device_map={"": "cpu"})
    m = _lora(m)
    layer = m.base_model.model.model.layers[0].self_attn.q_proj
    ref = copy.deepcopy(layer)
    assert savers.fuse_lora_4bit(m, cache_absmax=cache_absmax) == 7
    assert "forward" in layer.__dict__ and layer.base_layer.bias is not None
    x = torch.randn(2, 9, 64, dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), ref(x2)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert _rel(y.float(), y_ref.float()) < 1e-2  # bf16 arithmetic, different rounding order
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert _rel(x.grad.float(), x2.grad.float()) < 2e-2
    for name in ("lora_A", "lora_B"):
        pa = getattr(layer, name)["default"].weight
        pb = getattr(ref, name)["default"].weight
        assert pa.grad.dtype == torch.float32 and _rel(pa.grad, pb.grad) < 2e-2, name


def test_auto_decisions_follow_the_micro_batch_size():
    """offload/selective checkpointing are re-decided per micro-batch: a longer row than max_seq_len offloads."""
    m = _lora(_tiny_llama())
    savers.install_savers(m, _plan(m, offload_activations="auto"))
    st = savers._unwrap(m)._snug_ckpt_state
    assert st["offloader"] is None and not st["offload_now"](torch.empty(1, 4096, 64))  # CPU: auto is off
    m2 = _lora(_tiny_llama())
    savers.install_savers(m2, _plan(m2, offload_activations="on"))
    st2 = savers._unwrap(m2)._snug_ckpt_state
    assert st2["offload_now"](torch.empty(1, 8, 64)) and st2["upto"](torch.empty(1, 8, 64)) == 2
    # the CUDA rule (core.plan.offload_rule): Qwen2.5-1.5B (28 layers, H 1536) under a 3.65 GiB budget
    from core.plan import offload_rule

    cap = int(3.65 * 2**30)
    assert not offload_rule("auto", True, True, 28, 1024, 1536, cap)[0]  # 84 MiB of inputs: keep them
    assert offload_rule("auto", True, True, 28, 16384, 1536, cap)[0]  # 1.3 GiB: offload
    assert not offload_rule("off", True, True, 28, 16384, 1536, cap)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_loss_16bit_close_to_hf(dtype):
    """16-bit hidden states and head (the training setting): loss and gradient within 16-bit rounding."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 64, 32, generator=g).to(dtype)
    weight = (torch.randn(300, 32, generator=g) * 0.2).to(dtype)
    labels = torch.randint(0, 300, (1, 64), generator=g)
    h1 = hidden.clone().requires_grad_(True)
    ref = _hf_loss(h1, weight, labels, num_items_in_batch=2000)  # a large divisor: tiny gradients
    (ref * 1024).backward()  # as a GradScaler would
    h2 = hidden.clone().requires_grad_(True)
    ours = savers.chunked_lm_loss(h2, weight, labels, num_items_in_batch=2000, chunk_tokens=16)
    (ours * 1024).backward()
    assert abs(float(ours.detach()) - float(ref.detach())) / float(ref.detach()) < 1e-2
    assert h2.grad.dtype == dtype and _rel(h2.grad.float(), h1.grad.float()) < 2e-2


@pytest.mark.slow
def test_through_hf_trainer_same_losses(tmp_path):
    """HF Trainer (gradient accumulation passes num_items_in_batch; evaluation reads outputs.loss)."""
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(0, 211, (48,), generator=g)
        lab = ids.clone()
        lab[:10] = -100  # an unlearned prompt, different token counts per row
        lab[torch.randint(10, 48, (5,), generator=g)] = -100
        rows.append({"input_ids": ids, "labels": lab, "position_ids": torch.cat([torch.arange(20), torch.arange(28)])})
    logs = {}
    for use in (False, True):
        m = _lora(_tiny_llama())
        if use:
            savers.install_savers(m, _plan(m))
        args = TrainingArguments(output_dir=str(tmp_path / str(use)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3, logging_steps=1,
                                 use_cpu=True, report_to=[], save_strategy="no", seed=0, data_seed=0,
                                 per_device_eval_batch_size=2)
        tr = Trainer(model=m, args=args, train_dataset=rows, eval_dataset=rows[:4])
        tr.train()
        ev = tr.evaluate()
        logs[use] = ([h["loss"] for h in tr.state.log_history if "loss" in h], ev["eval_loss"])
    (a, ea), (b, eb) = logs[False], logs[True]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert abs(x - y) / x < 1e-3, logs
    assert abs(ea - eb) / ea < 1e-3, logs
