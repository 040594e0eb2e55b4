"""Runs, round 3: a run folder renamed or moved by its user ("my-best-run") keeps the paths of
where it was in its events. Before, `snugtune attach` and the CLI's stop line named the old folder
(`resume with snugtune resume OLD-NAME`, a checkpoint and adapter path that no longer exist) and
the wizard's Done step showed the old adapter path."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from tui.cmd_runs import Printer


def test_a_renamed_run_is_named_and_pointed_at_where_it_is_now(tmp_path):
    old = Path("/somewhere/else/run-20250101-000000")
    now = tmp_path / "my-best-run"
    out = io.StringIO()
    p = Printer(out, run=now.name, run_dir=now)
    p.event({"event": "run_stopped", "step": 3, "checkpoint": str(old / "checkpoints" / "checkpoint-3")})
    p.event({"event": "run_finished", "steps": 6, "final_loss": 1.0, "adapter_path": str(old / "adapter")})
    text = out.getvalue()
    assert f"checkpoint {now / 'checkpoints' / 'checkpoint-3'}" in text
    assert "snugtune resume my-best-run" in text and str(old) not in text
    assert f"adapter: {now / 'adapter'}" in text


def test_without_a_run_directory_the_events_paths_stand(tmp_path):
    out = io.StringIO()
    Printer(out).event({"event": "run_stopped", "step": 2, "checkpoint": "/r/run-a/checkpoints/checkpoint-2"})
    assert "snugtune resume run-a" in out.getvalue()


# ---- a full disk when the run directory is made ------------------------------------------------------

@pytest.fixture
def full_runs_dir(small_tmpfs, monkeypatch):
    """SNUGTUNE_RUNS_DIR on a small tmpfs filled to its last byte."""
    from tests.conftest import fill

    fill(small_tmpfs)
    monkeypatch.setenv("SNUGTUNE_RUNS_DIR", str(small_tmpfs))
    return small_tmpfs


def test_a_full_disk_at_run_creation_leaves_no_half_made_run(full_runs_dir):
    # before: "cannot write .../config.toml (No space left on device)" and the run folder stayed,
    # holding only the cut-short temporary config
    from core import runs
    from core.errors import UserError
    from core.presets import load_preset

    with pytest.raises(UserError) as err:
        runs.create_run_dir(load_preset("demo"))
    assert "nothing was made" in str(err.value) and "free some disk space" in (err.value.hint or "")
    assert sorted(p.name for p in full_runs_dir.iterdir()) == ["filler"]
