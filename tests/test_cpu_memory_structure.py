"""bench/cpu_memory_structure.py's live-peak measure: the CPU allocator's records give the exact peak of what a
function allocates and keeps alive (what the bench compares to the estimate's structure)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_live_peak_counts_what_lives_at_once():
    from bench.cpu_memory_structure import live_peak

    def f():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB
        del a
        c = torch.empty(3000, 1000)  # 12 MB, with b alive: the peak is b + c
        return b, c

    kept = []
    peak, end = live_peak(lambda: kept.append(f()))
    assert peak == 14_000_000 and end == 14_000_000  # b and c outlive the call
    kept.clear()
    peak, end = live_peak(lambda: f())
    assert peak == 14_000_000 and end == 0
