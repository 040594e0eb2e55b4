"""Unpacked rows learn like the plain recipe: like-length micro-batches, in random order.

Found on Gemma 3 270M (H200, bench/real_weights.py --steps 200): with data.packing=false the
engine scored 75-92/128 held-out dates where the plain recipe (same rows, random sampler)
scored 128/128. transformers' group_by_length sampler, which the engine used for unpacked rows,
sorts 50 micro-batches at a time by length and hands them out longest first: where length
follows content (2-digit days are one token longer than 1-digit ones) dozens of steps in a row
train on one kind of sample, and the loss curve jumped back up at every change of kind.
"""
from __future__ import annotations

import json
import random

import pytest

from core.data import LengthBucketSampler, length_bucketed_order
from core.events import EventWriter
from core.runs import create_run_dir
from core.train import Engine
from tests.conftest import make_tiny_config


def _longest_run(keys: list) -> int:
    best = run = 1
    for a, b in zip(keys, keys[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[s:s + size] for s in range(0, len(order), size)]


def _two_lengths(n: int, seed: int = 3) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice((38, 39)) for _ in range(n)]


def test_micro_batches_are_of_like_length_but_in_random_order():
    lengths = _two_lengths(1600)
    order = length_bucketed_order(lengths, 8, seed=42)
    assert sorted(order) == list(range(1600))
    batches = _batches(order, 8)
    mixed = [b for b in batches if len({lengths[i] for i in b}) > 1]
    # like length in a micro-batch: at most one mixed batch per bucket of 50 (the padding stays low)
    assert len(mixed) <= len(batches) // 50 + 1
    kinds = [lengths[b[0]] for b in batches]
    # random order across batches: no long run of one kind (a fair coin over 200 batches: ~8)
    assert _longest_run(kinds) <= 14
    # and both kinds are spread over the epoch: each quarter holds both
    for q in range(4):
        assert set(kinds[q * 50:(q + 1) * 50]) == {38, 39}


def test_the_sorted_sampler_this_replaces_runs_one_kind_for_dozens_of_steps():
    # the failure mode itself, so the test above is known to measure something
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = _two_lengths(1600)
    order = get_length_grouped_indices(lengths, 8, generator=torch.Generator().manual_seed(42))
    kinds = [lengths[b[0]] for b in _batches(order, 8)]
    assert _longest_run(kinds) >= 20


def test_the_short_last_micro_batch_stays_last_and_epochs_differ_but_replay():
    lengths = _two_lengths(1003)
    order = length_bucketed_order(lengths, 8, seed=1)
    assert sorted(order) == list(range(1003)) and len(order[-3:]) == 3
    full = _batches(order[:1000], 8)
    assert all(len(b) == 8 for b in full)
    s = LengthBucketSampler(lengths, 8, seed=1)
    first = list(s)
    assert first == list(s)  # a resumed run skips exactly what it trained
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == sorted(first)


@pytest.fixture(scope="module")
def two_length_data(tmp_path_factory):
    # two answer lengths, content tied to length (as a date's day digits are)
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("two-lengths") / "data.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(800):
            out = "It is." if rng.random() < 0.5 else "It is. It is. It is. It is."
            fh.write(json.dumps({"instruction": "What does len do?", "input": "", "output": out}) + "\n")
    return path


def _engine(tiny_model_dir, data, tmp_path, packing: bool) -> Engine:
    cfg = make_tiny_config(tiny_model_dir, data, tmp_path / "runs", f"data.packing={str(packing).lower()}",
                           "data.eval_fraction=0.0", "train.max_steps=200")
    run_dir = create_run_dir(cfg)
    eng = Engine(run_dir, install_signal_handlers=False)
    eng.events = EventWriter(run_dir / "events.jsonl")  # what run() opens before setup()
    eng.setup()
    return eng


def test_the_engine_feeds_unpacked_rows_in_like_length_batches_of_random_order(tiny_model_dir, two_length_data,
                                                                                tmp_path):
    eng = _engine(tiny_model_dir, two_length_data, tmp_path, packing=False)
    trainer = eng._make_trainer()
    widths, padded = [], 0
    for batch in trainer.get_train_dataloader():
        mask = batch["attention_mask"]
        widths.append(int(mask.shape[1]))
        padded += int((mask == 0).sum())
        assert batch["labels"][mask == 0].eq(-100).all()  # padding is never a label
    assert len(widths) == 200  # every row once (800 rows, micro-batch 4)
    assert len(set(widths)) == 2
    # the like-length grouping still saves the padding: under 1 pad token per row on average
    assert padded < 800
    assert _longest_run(widths) <= 14


def test_packed_rows_keep_the_random_sampler(tiny_model_dir, two_length_data, tmp_path):
    from torch.utils.data import RandomSampler

    eng = _engine(tiny_model_dir, two_length_data, tmp_path, packing=True)
    assert isinstance(eng._make_trainer()._get_train_sampler(), RandomSampler)
