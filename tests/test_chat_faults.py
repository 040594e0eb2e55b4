"""Chat and export of a run whose base model folder is gone (moved or deleted after training):
one message in the run's terms, naming the file to edit, for both commands."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from core.errors import UserError


@pytest.fixture
def moved_model_run(tmp_path, tiny_model_dir):
    from test_export_gguf import _write_run

    model = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n", encoding="utf-8")
    run_dir = _write_run(tmp_path, model_dir=str(model), data_path=data)
    model.rename(tmp_path / "moved-model")
    return run_dir, model


def test_chat_and_export_say_the_base_model_moved_and_where_to_set_it(moved_model_run, tmp_path):
    from core.chat import ChatSession
    from core.export import export

    run_dir, model = moved_model_run
    for attempt in (lambda: ChatSession(run_dir), lambda: export(run_dir, merged=str(tmp_path / "out"))):
        with pytest.raises(UserError) as err:
            attempt()
        # before: "model directory '...' not found; give an existing local model directory or a Hub id"
        assert f"the run's base model {model} is not there any more" in str(err.value)
        assert f"set model.name_or_path in {run_dir / 'config.toml'}" in err.value.hint
    assert not (tmp_path / "out").exists()


def test_the_cli_export_of_a_moved_model_exits_2(moved_model_run, tmp_path):
    run_dir, _model = moved_model_run
    out = subprocess.run([sys.executable, "-m", "tui.cli", "export", str(run_dir), "--merged", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 2 and "is not there any more" in out.stderr and "Traceback" not in out.stderr


def test_a_run_that_failed_before_its_first_checkpoint_is_told_to_resume_not_wait(tmp_path):
    import os

    from test_tui_helpers import write_events

    from core.chat import adapter_dir

    run_dir = tmp_path / "demo-failed"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("", encoding="utf-8")
    write_events(run_dir, [{"event": "run_started", "config": {}, "versions": {}, "total_steps": 4,
                            "device": {"type": "cpu"}, "resumed_from": None},
                           {"event": "run_failed", "error": "disk full", "kind": "disk", "traceback": ""}])
    with pytest.raises(UserError) as err:
        adapter_dir(run_dir)
    # before: "wait for the run to save a checkpoint", for a run that will never save one
    assert "the run failed before it saved one: `snugtune resume demo-failed`" in err.value.hint
    (tmp_path / "demo-live").mkdir()
    write_events(tmp_path / "demo-live", [{"event": "run_started", "config": {}, "versions": {}, "total_steps": 4,
                                           "device": {"type": "cpu"}, "resumed_from": None}])
    (tmp_path / "demo-live" / "config.toml").write_text("", encoding="utf-8")
    (tmp_path / "demo-live" / "pid").write_text(f"{os.getpid()}\n")
    with pytest.raises(UserError) as err:
        adapter_dir(tmp_path / "demo-live")
    assert "wait for the run to save its first checkpoint" in err.value.hint
