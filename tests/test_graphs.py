"""core.graphs and the savers' static mode on the CPU.

The capture itself needs a GPU (bench/ measures it, with the per-step loss against the plain
recipe); everything a replay computes runs here: static mode gives the same loss and gradients
as the normal path, packed rows stay apart, and replayed gradients accumulate as eager ones.
"""
from __future__ import annotations

import copy

import pytest
import torch

from core import graphs, savers
from tests.test_savers import _assert_same, _plan, _lora, _loss_and_grads, _tiny_gemma2, _tiny_llama


@pytest.mark.parametrize("softcap", [None, 7.0])
@pytest.mark.parametrize("mode", ["num_items", "mean"])
def test_static_loss_equals_chunked_loss(softcap, mode):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 40, 16, 89
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :7] = -100
    labels[1, 25:] = -100
    nib = 61 if mode == "num_items" else None
    ga = 3
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = savers.chunked_lm_loss(h1, w1, labels, num_items_in_batch=nib, softcap=softcap, chunk_tokens=9)
    if nib is None:
        ref = ref / ga  # the Trainer's division when it passes no item count
    ref.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    given = torch.tensor(float(nib or 0))
    per_token = torch.tensor(0.0 if nib else float(ga))
    ours = savers.chunked_lm_loss_static(h2, w2, labels, given, per_token, softcap=softcap, chunk_tokens=9)
    ours.backward()
    assert torch.allclose(ours.detach(), ref.detach(), rtol=1e-6), (float(ours), float(ref))  # fp32 accumulator
    assert torch.allclose(h2.grad, h1.grad, atol=1e-12)
    assert torch.allclose(w2.grad, w1.grad, atol=1e-12)
    # a row with nothing to learn: zero, not NaN
    h3 = hidden.clone().requires_grad_(True)
    z = savers.chunked_lm_loss_static(h3, weight, torch.full((B, T), -100), torch.tensor(0.0), torch.tensor(1.0))
    z.backward()
    assert float(z) == 0.0 and torch.count_nonzero(h3.grad) == 0


def test_segment_ids_match_row_segments():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    seg = savers._segment_ids(pos, None)
    rows = savers._row_segments(pos, None)
    for b, row in enumerate(rows):
        for n, (s0, s1) in enumerate(row):
            assert (seg[b, s0:s1] == n).all()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert savers._segment_ids(torch.arange(6)[None], mask).tolist() == [[0, 0, 0, 0, 1, 1]]
    assert savers._segment_ids(None, None) is None


def _static_loss_and_grads(model, batch):
    b = dict(batch)
    nib = b.pop("num_items_in_batch", None)
    with savers.static_mode(torch.tensor(float(nib or 0)), torch.tensor(0.0 if nib else 1.0)):
        return _loss_and_grads(model, b)


@pytest.mark.parametrize("layout", ["packed", "padded", "plain"])
def test_static_mode_same_loss_and_grads_through_the_model(layout):
    """Everything a CUDA graph replays, run eagerly: same loss and LoRA gradients as the normal path."""
    model = _lora(_tiny_llama())
    savers.install_savers(model, _plan(model, offload_activations="off"))
    g = torch.Generator().manual_seed(4)
    T = 64
    ids = torch.randint(0, 211, (2, T), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels}
    if layout == "packed":  # three samples in row 0, two in row 1 (the second padding-like)
        batch["position_ids"] = torch.stack([torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)]),
                                             torch.cat([torch.arange(50), torch.arange(14)])])
        labels[0, [20, 50]] = -100
        labels[1, 50:] = -100
    elif layout == "padded":
        am = torch.ones((2, T), dtype=torch.long)
        am[1, 40:] = 0
        labels[1, 40:] = -100
        batch.update(attention_mask=am, position_ids=torch.arange(T)[None].expand(2, T).clone())
    batch["num_items_in_batch"] = int((labels[:, 1:] != -100).sum())
    ref = _loss_and_grads(model, batch)
    ours = _static_loss_and_grads(model, batch)
    _assert_same(ref, ours, rtol=1e-4)
    assert savers._PackState.static is False and savers._PackState.seg_ids is None  # left as found
    if layout == "packed":  # and the samples really are kept apart: no position ids, another loss
        flat = {k: v for k, v in batch.items() if k != "position_ids"}
        assert abs(float(_static_loss_and_grads(model, flat)[0]) - float(ref[0])) > 1e-4


def test_static_mode_gemma2_softcap_packed():
    model = _lora(_tiny_gemma2())
    savers.install_savers(model, _plan(model, offload_activations="off"))
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 203, (1, 60), generator=g)
    labels = ids.clone()
    labels[0, 35] = -100
    batch = {"input_ids": ids, "labels": labels, "num_items_in_batch": 58,
             "position_ids": torch.cat([torch.arange(35), torch.arange(25)])[None]}
    _assert_same(_loss_and_grads(model, batch), _static_loss_and_grads(model, batch), rtol=2e-4)


def test_model_support_says_why_not():
    model = _lora(_tiny_llama())
    ok, why = graphs.model_support(model)
    assert not ok and "CUDA" in why  # on the CPU
    step = graphs.CudaGraphStep(model)
    assert step.disabled and step.status.startswith("off:")
    assert step.step({"input_ids": torch.zeros((1, 8), dtype=torch.long)}) is None  # the caller's eager step runs


def test_replayed_gradients_accumulate_like_eager_ones():
    """_accumulate: the graph's buffers become .grad (lent only at the window's last micro-batch)."""
    step = graphs.CudaGraphStep()
    p1, p2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    step.params = [p1, p2]
    buf = [torch.ones(3), torch.full((2,), 2.0)]
    step._accumulate(buf, last_in_window=False)  # first of two micro-batches: copied, not lent
    assert p1.grad is not buf[0] and torch.equal(p1.grad, buf[0])
    buf[0].fill_(10.0)
    buf[1].fill_(20.0)  # the next replay overwrites the buffers in place
    step._accumulate(buf, last_in_window=True)
    assert p1.grad.tolist() == [11.0] * 3 and p2.grad.tolist() == [22.0] * 2
    p1.grad = p2.grad = None  # optimizer step, zero_grad(set_to_none=True)
    step._accumulate(buf, last_in_window=True)  # window of one: the buffer itself is lent
    assert p1.grad is buf[0]
    p1.grad.zero_()  # zero_grad(set_to_none=False) keeps the lent buffer as .grad
    buf[0].fill_(5.0)
    step._accumulate(buf, last_in_window=False)
    assert p1.grad is not buf[0] and p1.grad.tolist() == [5.0] * 3


def test_collate_pads_packed_rows_to_one_shape():
    from core.data import collate

    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]}]
    b = collate(rows, 0, pad_packed_to=6)
    assert b["input_ids"].shape == (1, 6) and b["labels"].tolist() == [[-100, 6, 7, -100, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2]] and "attention_mask" not in b
    unpacked = collate([{"input_ids": [5, 6], "labels": [5, 6]}], 0, pad_packed_to=6)
    assert unpacked["input_ids"].shape == (1, 2)  # only packed rows are padded


def test_status_says_why_a_batch_was_not_taken():
    step = graphs.CudaGraphStep(max_tokens=16)
    step.model = object()  # bound, but the batch is refused before anything runs
    step.hf = None
    assert step._key({"input_ids": torch.zeros((1, 8), dtype=torch.long), "labels": None, "extra": 1}) is None
    assert "more than" in step.status
    assert step._key({"input_ids": torch.zeros((1, 32), dtype=torch.long), "labels": None}) is None
    assert "over 16 tokens" in step.status


def test_static_mode_builds_one_mask_for_every_block(monkeypatch):
    """Static mode's T x T mask is built once a micro-batch and every block's attention (and each
    recompute) gets that same tensor, additive, in the attention's dtype, with 16-aligned rows: a mask
    per block was one T x T tensor more per un-checkpointed block (fit_truth run 7)."""
    import torch.nn.functional as F

    model = _lora(_tiny_llama())
    savers.install_savers(model, _plan(model, offload_activations="off"))
    masks = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(savers.F, "scaled_dot_product_attention", spy)
    T = 40  # not a multiple of 16: the padded row stride is what is checked
    ids = torch.randint(0, 211, (2, T), generator=torch.Generator().manual_seed(5))
    pos = torch.stack([torch.cat([torch.arange(25), torch.arange(15)]), torch.arange(T)])
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}
    _static_loss_and_grads(model, batch)
    layers = model.config.num_hidden_layers
    assert len(masks) >= layers and all(m is not None for m in masks)
    assert len({m.data_ptr() for m in masks}) == 1  # one tensor, forward and recompute alike
    m = masks[0]
    assert m.is_floating_point()  # additive: SDPA uses it as it is, no copy a call
    assert m.shape == (2, 1, T, T) and m.stride(-2) % 16 == 0
    # causal and same-sample: row 0's second sample (from 25) does not see the first
    assert m[0, 0, 30, 10] == float("-inf") and m[0, 0, 30, 26] == 0 and m[0, 0, 10, 30] == float("-inf")
    assert m[1, 0, 30, 10] == 0
    assert savers._PackState.static_mask is None  # dropped with the static mode
