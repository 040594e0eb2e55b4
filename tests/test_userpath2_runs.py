"""Runs, round 2: a resume whose data file changed under it, and a stop asked for before the
engine has set up (a Ctrl-C in the first seconds of `snugtune train`). Both failed before their
fix: the resume trained the new rows with the old data order without a word, and the stop's
SIGTERM killed the engine while it imported torch, so the run showed as "died" and exit 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import runs
from core.config import RunConfig
from core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def rows(n: int, word: str = "Say") -> str:
    return "".join(json.dumps({"instruction": f"{word} {i}", "output": f"{i}"}) + "\n" for i in range(n))


def make_run(runs_dir: Path, data: Path) -> Path:
    cfg = RunConfig.from_dict({"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": str(data)},
                               "output": {"runs_dir": str(runs_dir), "name": "r"}})
    run_dir = runs.create_run_dir(cfg)
    # a run that was stopped at a checkpoint, as the engine leaves it
    (run_dir / "events.jsonl").write_text(json.dumps({"v": 1, "event": "run_stopped", "time": 1, "step": 2,
                                                      "checkpoint": str(run_dir / "checkpoints/checkpoint-2")}) + "\n")
    return run_dir


def test_a_resume_whose_data_file_changed_is_refused_with_what_changed(runs_dir, tmp_path):
    data = tmp_path / "my.jsonl"
    data.write_text(rows(8), encoding="utf-8")
    run_dir = make_run(runs_dir, data)
    runs.check_resumable(run_dir)  # unchanged: fine
    os.utime(data, (1, 1))  # touched, same bytes: still fine (the contents are compared)
    runs.check_resumable(run_dir)
    data.write_text(rows(8, "Sax"), encoding="utf-8")  # same size, other rows
    with pytest.raises(UserError, match=r"cannot resume r-.*: its data changed since it started "
                       r"\(.*my\.jsonl changed \(same size, other contents\)\)") as err:
        runs.check_resumable(run_dir)
    assert f"snugtune train {run_dir / 'config.toml'}" in str(err.value)
    data.write_text(rows(9), encoding="utf-8")
    with pytest.raises(UserError, match=r"bytes then, .* now"):
        runs.check_resumable(run_dir)
    data.unlink()
    with pytest.raises(UserError, match=r"my\.jsonl is gone"):
        runs.check_resumable(run_dir)
    data.write_text(rows(8), encoding="utf-8")  # put back as it was: resumable again
    runs.check_resumable(run_dir)


def test_a_folder_of_shards_with_a_shard_added_is_said(runs_dir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text(rows(4), encoding="utf-8")
    run_dir = make_run(runs_dir, shards)
    (shards / "b.jsonl").write_text(rows(4), encoding="utf-8")
    with pytest.raises(UserError, match=r"1 file\(s\) added \(b\.jsonl\)"):
        runs.check_resumable(run_dir)


def test_the_cli_refuses_the_resume_with_exit_2_and_starts_nothing(runs_dir, tmp_path):
    data = tmp_path / "my.jsonl"
    data.write_text(rows(8), encoding="utf-8")
    run_dir = make_run(runs_dir, data)
    data.write_text(rows(3), encoding="utf-8")
    before = (run_dir / "events.jsonl").read_bytes()
    out = subprocess.run([sys.executable, "-m", "tui.cli", "resume", str(run_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "its data changed since it started" in out.stderr, out.stderr
    assert (run_dir / "events.jsonl").read_bytes() == before and not (run_dir / "pid").exists()


def test_a_stop_before_the_engine_has_written_a_line_is_not_a_kill(runs_dir, tmp_path):
    data = tmp_path / "my.jsonl"
    data.write_text(rows(4), encoding="utf-8")
    cfg = RunConfig.from_dict({"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": str(data)},
                               "output": {"runs_dir": str(runs_dir)}})
    run_dir = runs.create_run_dir(cfg)
    go = tmp_path / "go"
    # Stands in for an engine still importing torch: no signal handler of its own yet, no event
    # written. It ends by itself (exit 0) once the stop file exists and the test says go, so a
    # SIGTERM is the only thing that could end it otherwise (-15).
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
        f"sys.exit(0 if os.path.exists({str(run_dir / 'stop')!r}) else 3)\n")])
    try:
        (run_dir / "pid").write_text(f"{child.pid}\n")
        while not (tmp_path / "ready").exists():  # polled: the child's start-up takes what it takes
            assert child.poll() is None
            time.sleep(0.01)
        assert runs.still_starting(run_dir)
        assert runs.request_stop(run_dir) is True
        go.touch()
        assert child.wait(timeout=300) == 0  # before: -15, killed mid-import
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_cache_that_cannot_be_written_is_one_message_with_the_variable_that_moves_it(tmp_path, monkeypatch):
    # A read-only home (a container, a shared account): was an OSError traceback from mkdir, exit 1.
    # A file where the folder should be fails the same way for root, who ignores permission bits.
    (tmp_path / "home-cache").write_text("a file, not a folder")
    monkeypatch.setenv("SNUGTUNE_CACHE", str(tmp_path / "home-cache" / "snugtune"))
    from core.demo import ensure_tiny_llama

    with pytest.raises(UserError, match=r"(?s)cannot write snugtune.s cache .*home-cache/snugtune/demo .*SNUGTUNE_CACHE"):
        ensure_tiny_llama()
    out = subprocess.run([sys.executable, "-m", "tui.cli", "data", "inspect", "demo"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "cannot write snugtune's cache" in out.stderr and "Traceback" not in out.stderr


def test_a_run_directory_deleted_under_a_viewer_is_said_as_deleted_not_as_a_dead_engine(tmp_path):
    # The viewer's follower ends with a synthetic "died" when the pid file is gone; with the whole
    # folder gone, the engine may well still train (here: this test's own process stands in for it).
    died = {"v": 1, "event": "run_failed", "kind": "died", "synthetic": True,
            "error": "the engine process ended without a final event (killed, or crashed hard)"}
    run_dir = tmp_path / "r-20261201-120000"
    run_dir.mkdir()
    assert runs.deleted_run(died, run_dir, os.getpid()) == died  # the folder is there: a real death
    run_dir.rmdir()
    said = runs.deleted_run(died, run_dir, os.getpid())
    assert said["kind"] == "deleted" and f"{run_dir} was deleted" in said["error"]
    assert f"its engine (pid {os.getpid()}) still runs" in said["error"] and f"kill {os.getpid()}" in said["error"]
    assert "kill" not in runs.deleted_run(died, run_dir, None)["error"]
    from tui.cmd_runs import _exit_code

    assert _exit_code(said) == 1


def test_a_misspelt_preset_name_gets_the_close_one(config_dir):
    from core.presets import find_preset

    with pytest.raises(UserError, match=r"unknown preset 'dmeo' \(did you mean 'demo'\?\); known presets: demo"):
        find_preset("dmeo")
    with pytest.raises(UserError) as err:
        find_preset("zzzzzz")
    assert "did you mean" not in str(err.value)


def test_a_resume_with_another_lora_or_model_in_config_toml_is_refused_other_edits_are_not(runs_dir, tmp_path):
    # before: peft's loader failed with a page of "size mismatch for ...lora_A...", exit 1, and the
    # run was marked failed
    data = tmp_path / "my.jsonl"
    data.write_text(rows(8), encoding="utf-8")
    run_dir = make_run(runs_dir, data)
    toml = run_dir / "config.toml"
    cfg = RunConfig.from_toml(toml)
    cfg.with_overrides(["train.max_steps=500", "train.save_steps=7"]).write_toml(toml, overwrite=True)
    runs.check_resumable(run_dir)  # more steps, other save steps: fine
    cfg.with_overrides(["lora.r=8"]).write_toml(toml, overwrite=True)
    with pytest.raises(UserError, match=r"config\.toml changed since it started \(lora\.r: 16 then, 8 now\)"):
        runs.check_resumable(run_dir)
    cfg.with_overrides(["model.name_or_path='other/model'"]).write_toml(toml, overwrite=True)
    with pytest.raises(UserError, match=r"model\.name_or_path: \"builtin:tiny-llama\" then, \"other/model\" now"):
        runs.check_resumable(run_dir)
    cfg.write_toml(toml, overwrite=True)
    runs.check_resumable(run_dir)
