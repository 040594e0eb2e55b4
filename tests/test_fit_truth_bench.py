"""bench/fit_truth.py's own rules: engine trials train rows of exactly the chosen length, probes sit
where running out of memory proves the 85% share, and the share is reported as measured."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import fit_truth as FT  # noqa: E402


def test_engine_trial_rows_are_exactly_the_chosen_length(tmp_path):
    # runs 1-4 packed whole ~2,190-token samples: rows of 6,494-6,799 tokens at 8,192
    from core.config import RunConfig
    from core.data import build_datasets
    from core.demo import resolve_builtin
    from core.model import load_tokenizer

    seq = 3000
    data = FT.write_exact_data(tmp_path / "d.jsonl", seq, 3)
    cfg = RunConfig.from_dict({
        "gpu": {"profile": "cpu"}, "model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"path": str(data), "format": "text", "max_seq_len": seq, "eval_fraction": 0.0, "packing": True,
                 "long_samples": "truncate"},
    })
    rows, _, _ = build_datasets(cfg.data, load_tokenizer(resolve_builtin("builtin:tiny-llama"), cfg))
    assert [len(r["input_ids"]) for r in rows] == [seq] * 3
    # one sample a row: position ids run 0..seq-1 (full causal attention over the row)
    assert all(r["position_ids"] == list(range(seq)) for r in rows)


def test_a_probe_that_runs_out_of_memory_proves_the_share():
    for choice, limit in ((9472, 32768), (81856, 131072), (63040, 131072)):
        n = FT.probe_length(choice, 0.85, limit)
        assert n % 64 == 0 and choice / n >= 0.85 and choice / (n + 64) < 0.85
    assert FT.probe_length(30272, 0.85, 32768) == 32768  # capped by the position limit
    assert FT.probe_length(32768, 0.85, 32768) is None  # the choice is the limit: nothing to probe


def _row(seq, lt, fa):
    return {"shape": "qwen3-1.7b", "card": "4gb", "start": "full", "fits": True, "seq": seq, "micro_batch": 1,
            "grad_accum": 8, "held_out": True, "est_reserved_gib": 3.4, "est_allocated_gib": 3.2,
            "position_limit": 32768, "plan": {"keep_blocks": 0, "offload": True},
            "engine": {"rc": 0, "steps": 1, "measured_reserved_gib": 3.4, "measured_allocated_gib": 3.1},
            "longest_trains": lt, "fails_at": fa}


def test_the_share_is_the_choice_over_the_measured_bracket():
    meta = {"command": "x", "cards_gib": {"4gb": 3.82}, "profile": "rtx-3050", "held_out": ["qwen3-1.7b"]}
    md = FT.markdown({"meta": meta, "rows": [_row(15488, 16832, 17152)]})
    assert "| 90%-92% |" in md and "min 90%" in md
    # runs that disagree at the boundary (one trained 17,472, another ran out at 17,152): between the two
    md = FT.markdown({"meta": meta, "rows": [_row(15488, 17472, 17152)]})
    assert "89%-90% (runs disagree at the boundary)" in md and "min 89%" in md
    # no bracket, but the position limit bounds the longest that can be chosen
    md = FT.markdown({"meta": meta, "rows": [_row(30272, 30272, None)]})
    assert ">= 92% (position limit 32768)" in md
