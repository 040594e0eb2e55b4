"""Run directories: created fresh, listed with their status, stopped, launched in their own session."""
import os
import signal
import subprocess
import sys
import time

import pytest

from core import runs
from core.config import RunConfig
from core.errors import UserError
from core.events import EventWriter


def _cfg(runs_dir=None, name=None, **extra):
    data = {"model": {"name_or_path": "some/model"}, "data": {"path": "data.jsonl"}}
    if runs_dir or name:
        data["output"] = {k: v for k, v in (("runs_dir", str(runs_dir) if runs_dir else None), ("name", name)) if v}
    data.update(extra)
    return RunConfig.from_dict(data)


def test_run_dirs_are_never_reused_and_hold_the_config(tmp_path):
    cfg = _cfg(tmp_path / "runs", name="exp")
    a, b, c = (runs.create_run_dir(cfg) for _ in range(3))  # same second: suffixes keep them apart
    assert len({a, b, c}) == 3
    assert all(p.name.startswith("exp-") for p in (a, b, c))
    assert RunConfig.from_toml(a / "config.toml") == cfg


def test_runs_dir_comes_from_config_then_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SNUGTUNE_RUNS_DIR", str(tmp_path / "env-runs"))
    assert runs.create_run_dir(_cfg()).parent == tmp_path / "env-runs"
    assert runs.create_run_dir(_cfg(tmp_path / "cfg-runs")).parent == tmp_path / "cfg-runs"


def test_an_unusable_runs_dir_is_a_clear_error_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="(?s)cannot create the runs directory.*output.runs_dir"):
        runs.create_run_dir(_cfg(blocker / "runs"))
    assert blocker.read_text() == "not a directory"


def _fake_run(base, name, events, pid=None):
    d = base / name
    d.mkdir(parents=True)
    _cfg().write_toml(d / "config.toml")
    w = EventWriter(d)
    for ev, fields in events:
        w.emit(ev, **fields)
    if pid is not None:
        (d / "pid").write_text(str(pid))
    return d


def test_list_runs_reports_each_status(runs_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    started = ("run_started", {"total_steps": 10, "config": {"model": {"name_or_path": "m"}}})
    _fake_run(runs_dir, "a-finished", [started, ("step_logged", {"step": 10, "loss": 1.5}),
                                       ("run_finished", {"steps": 10, "final_loss": 1.5, "adapter_path": "x"})])
    _fake_run(runs_dir, "b-failed", [started, ("run_failed", {"error": "boom", "kind": "internal"})])
    _fake_run(runs_dir, "c-stopped", [started, ("step_logged", {"step": 4, "loss": 2.0}),
                                      ("run_stopped", {"step": 4, "checkpoint": "c"})])
    _fake_run(runs_dir, "d-running", [started, ("step_logged", {"step": 2, "loss": 3.0})], pid=os.getpid())
    _fake_run(runs_dir, "e-died", [started, ("step_logged", {"step": 3, "loss": 2.5})], pid=dead.pid)
    got = {r["name"]: r for r in runs.list_runs()}
    assert {n: r["status"] for n, r in got.items()} == {
        "a-finished": "finished", "b-failed": "failed", "c-stopped": "stopped", "d-running": "running", "e-died": "died",
    }
    assert got["a-finished"]["loss"] == 1.5 and got["a-finished"]["step"] == 10
    assert got["c-stopped"]["step"] == 4 and got["d-running"]["total_steps"] == 10
    assert got["b-failed"]["error"] == "boom"


def test_a_resumed_run_is_running_again_after_its_stop(runs_dir):
    d = _fake_run(runs_dir, "r", [("run_started", {}), ("run_stopped", {"step": 3}), ("run_started", {}),
                                  ("step_logged", {"step": 4, "loss": 1.0})], pid=os.getpid())
    assert runs.run_status(d)["status"] == "running"


def test_resolve_run_by_dir_name_and_unique_prefix(runs_dir):
    a = _fake_run(runs_dir, "alpha-20260101-000000", [])
    _fake_run(runs_dir, "beta-20260101-000000", [])
    _fake_run(runs_dir, "beta-20260102-000000", [])
    assert runs.resolve_run(str(a)) == a.resolve()
    assert runs.resolve_run("alpha-20260101-000000") == a.resolve()
    assert runs.resolve_run("alpha") == a.resolve()
    with pytest.raises(UserError, match="matches several runs"):
        runs.resolve_run("beta")
    with pytest.raises(UserError, match="no run named 'gamma'"):
        runs.resolve_run("gamma")


def test_request_stop_writes_the_stop_file_and_terminates_the_engine(tmp_path):
    # an engine that has written its first line (its signal handlers are installed by then; before
    # that the stop file alone is used: tests/test_userpath2_runs.py)
    d = _fake_run(tmp_path, "r", [("setup_progress", {"message": "resolving the model"})])
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (d / "pid").write_text(str(proc.pid))
    assert runs.request_stop(d) is True
    assert (d / "stop").exists()
    assert proc.wait(timeout=300) == -signal.SIGTERM


def test_spawn_starts_the_engine_in_its_own_session_with_the_allocator_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    d = runs.create_run_dir(_cfg(tmp_path / "runs"))
    proc = runs.spawn(d)
    try:
        # right after the fork, before exec, /proc shows an empty environment: wait for the exec
        deadline = time.monotonic() + 300
        while True:
            env = open(f"/proc/{proc.pid}/environ", "rb").read().split(b"\0")
            if len(env) > 1 or time.monotonic() > deadline or proc.poll() is not None:
                break
            time.sleep(0.05)
        sid = os.getsid(proc.pid)
    finally:
        proc.kill()  # only its start matters here (the model id does not exist anyway)
        proc.wait(timeout=60)
    assert b"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in env
    assert sid == proc.pid != os.getsid(0)  # a session leader: the terminal's signals do not reach it
    assert (d / "pid").read_text().strip() == str(proc.pid)
    assert (d / "engine.log").exists()


def test_last_checkpoint_picks_the_highest_step(tmp_path):
    for n in (5, 40, 10):
        (tmp_path / "checkpoints" / f"checkpoint-{n}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-x").mkdir()
    assert runs.last_checkpoint(tmp_path).name == "checkpoint-40"
    assert runs.last_checkpoint(tmp_path / "nowhere") is None


def test_relative_local_paths_are_frozen_absolute_in_the_run_config(tmp_path, monkeypatch):
    (tmp_path / "my.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.from_dict({"model": {"name_or_path": "Qwen/Qwen2.5-0.5B"}, "data": {"path": "my.jsonl"},
                               "output": {"runs_dir": str(tmp_path / "runs")}})
    saved = RunConfig.from_toml(runs.create_run_dir(cfg) / "config.toml")
    assert saved.data.path == str(tmp_path / "my.jsonl")
    assert saved.model.name_or_path == "Qwen/Qwen2.5-0.5B"  # a Hub id stays a Hub id
    builtin = cfg.with_overrides(["data.path='builtin:python-docs-qa'"])
    assert RunConfig.from_toml(runs.create_run_dir(builtin) / "config.toml").data.path == "builtin:python-docs-qa"


def test_a_relaunched_run_is_running_before_its_engine_says_anything(runs_dir):
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        d = _fake_run(runs_dir, "r", [("run_started", {}), ("run_stopped", {"step": 3})])
        stopped = runs.read_log(d).events[-1]["time"]
        (d / "pid").write_text(str(engine.pid))  # what a resume's launch does first
        os.utime(d / "pid", (stopped + 1, stopped + 1))
        assert runs.run_status(d)["status"] == "running"
        assert runs.request_stop(d) is True  # so `snugtune stop` reaches it too
    finally:
        engine.kill()
        engine.wait()
    assert runs.run_status(d)["status"] == "stopped"  # its process gone without a word: the stop stands


def test_damaged_logs_never_break_the_list(runs_dir):
    _fake_run(runs_dir, "a-good", [("run_started", {"total_steps": 2}), ("step_logged", {"step": 1, "loss": 1.0})])
    garbled = _fake_run(runs_dir, "b-garbled", [("run_started", {"total_steps": 2})])
    with open(garbled / "events.jsonl", "ab") as fh:
        fh.write(b"\xff\xfe not an event\n")
    unreadable = runs_dir / "c-unreadable"
    unreadable.mkdir()
    _cfg().write_toml(unreadable / "config.toml")
    (unreadable / "events.jsonl").mkdir()
    got = {r["name"]: r for r in runs.list_runs()}
    assert set(got) == {"a-good", "b-garbled", "c-unreadable"}
    assert got["b-garbled"]["log_skipped"] == 1 and "line 2" in got["b-garbled"]["log_note"]
    assert got["c-unreadable"]["status"] == "unreadable" and "cannot read" in got["c-unreadable"]["error"]


def test_runs_are_named_after_the_preset_or_the_data(tmp_path):
    cfg = RunConfig.from_dict({"model": {"name_or_path": "Qwen/Qwen2.5-0.5B"}, "data": {"path": "/d/chats.jsonl.gz"},
                               "output": {"runs_dir": str(tmp_path)}})
    assert runs.create_run_dir(cfg, preset="demo").name.startswith("demo-")
    assert runs.create_run_dir(cfg, preset="/presets/tiny.toml").name.startswith("tiny-")
    assert runs.create_run_dir(cfg).name.startswith("chats-")
    assert runs.run_name(cfg.with_overrides(["data.path='builtin:python-docs-qa'"])) == "python-docs-qa"
    assert runs.run_name(cfg.with_overrides(["output.name='exp1'"]), preset="demo") == "exp1"


def test_remove_run_deletes_a_stopped_run_and_refuses_a_running_one(runs_dir):
    stopped = _fake_run(runs_dir, "s", [("run_started", {}), ("run_stopped", {"step": 1})])
    (stopped / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    running = _fake_run(runs_dir, "r", [("run_started", {})], pid=os.getpid())
    with pytest.raises(UserError, match="is running"):
        runs.remove_run(running)
    assert (running / "config.toml").is_file()
    runs.remove_run(stopped)
    assert not stopped.exists() and [p.name for p in runs_dir.iterdir()] == ["r"]
    with pytest.raises(UserError, match="not a run directory"):
        runs.remove_run(runs_dir)
