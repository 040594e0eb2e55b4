"""The headless commands as a user runs them: `snugtune train/runs/attach/stop/resume/presets/export`.

Each test runs the real `snugtune` in a subprocess; the engine runs as its own process under it.
Training tests use the tiny model from conftest (a few seconds a run), except the built-in demo.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import make_tiny_config
from core.events import read_events

SNUGTUNE = Path(sys.executable).parent / "snugtune"
CMD = [str(SNUGTUNE)] if SNUGTUNE.exists() else [sys.executable, "-m", "tui.cli"]
LONG = 600  # generous ceiling for one command on a busy 2-core machine (not a timing assertion)


def snugtune(*args, env=None, timeout=LONG, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*CMD, *args], capture_output=True, text=True, env=full_env, timeout=timeout, **kw)


def run_dir_of(output: str) -> Path:
    m = re.search(r"^run directory: (.+)$", output, re.MULTILINE)
    assert m, output
    return Path(m.group(1).strip())


def wait_for_event(run_dir: Path, name: str, timeout: float = LONG) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for e in read_events(run_dir):
            if e["event"] == name:
                return e
        time.sleep(0.1)
    raise AssertionError(f"no {name} event in {run_dir}: {read_events(run_dir)}")


@pytest.fixture
def tiny_toml(tiny_model_dir, tiny_instruction_jsonl, runs_dir, tmp_path):
    """Write a tiny-model preset file; returns a function taking --set style overrides."""

    def make(*overrides: str, name: str = "tiny") -> Path:
        cfg = make_tiny_config(tiny_model_dir, tiny_instruction_jsonl, runs_dir, *overrides)
        return cfg.write_toml(tmp_path / f"{name}.toml", overwrite=True)

    return make


# ---- the built-in demo ------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_demo_with_four_steps_leaves_an_adapter_and_events(runs_dir):
    out = snugtune("train", "demo", "--set", "train.max_steps=4")
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = run_dir_of(out.stdout)
    assert run_dir.parent == runs_dir
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    events = read_events(run_dir)
    assert events[-1]["event"] == "run_finished" and events[-1]["steps"] == 4
    assert "step 4/4" in out.stdout and "loss" in out.stdout and "tok/s" in out.stdout and "ETA" in out.stdout


# ---- detach, attach, runs, stop, resume ------------------------------------------------------------


@pytest.mark.slow
def test_detached_run_is_followed_by_attach_listed_and_chatted_with_and_exported(tiny_toml, tmp_path):
    out = snugtune("train", str(tiny_toml()), "--detach", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    run_dir = Path(info["run_dir"])
    assert (run_dir / "pid").read_text().strip() == str(info["pid"])
    attached = snugtune("attach", run_dir.name)
    assert attached.returncode == 0, attached.stdout + attached.stderr
    assert "finished: 6 steps" in attached.stdout and "step 6/6" in attached.stdout
    listed = json.loads(snugtune("runs", "--json").stdout)
    mine = [r for r in listed if r["dir"] == str(run_dir)]
    assert len(mine) == 1 and mine[0]["status"] == "finished" and mine[0]["step"] == 6
    assert isinstance(mine[0]["loss"], float)
    table = snugtune("runs").stdout
    assert run_dir.name in table and "finished" in table
    # Attaching to a finished run replays it and returns.
    again = snugtune("attach", str(run_dir), "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout.strip().splitlines()[-1])["event"] == "run_finished"
    stop = snugtune("stop", run_dir.name)
    assert stop.returncode == 0 and "not running" in stop.stdout
    resume = snugtune("resume", run_dir.name)
    assert resume.returncode == 2 and "already finished" in resume.stderr
    chat = snugtune("chat", run_dir.name, "--compare", "--max-new-tokens", "5", input="What does len do?\n\n")
    assert chat.returncode == 0, chat.stderr
    assert "tuned> " in chat.stdout and "base > " in chat.stdout
    exported = snugtune("export", run_dir.name, "--merged", str(tmp_path / "merged"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "merged" / "config.json").is_file() and "merged model:" in exported.stdout



@pytest.mark.slow
def test_ctrl_c_in_the_foreground_checkpoints_and_resume_continues(tiny_toml):
    toml = tiny_toml("train.max_steps=30", "train.save_steps=1000", "data.eval_fraction=0")
    proc = subprocess.Popen([*CMD, "train", str(toml)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    run_dir = run_dir_of(first)
    wait_for_event(run_dir, "step_logged")
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does to the foreground command
    stdout, stderr = proc.communicate(timeout=LONG)
    assert proc.returncode == 0, stdout + stderr
    stopped = read_events(run_dir)[-1]
    assert stopped["event"] == "run_stopped" and 1 <= stopped["step"] < 30
    assert Path(stopped["checkpoint"]).name == f"checkpoint-{stopped['step']}"
    assert "stopped at step" in stdout and "saves a checkpoint" in stderr
    assert not (run_dir / "adapter").exists()

    resumed = snugtune("resume", run_dir.name)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    events = read_events(run_dir)
    second = events[[i for i, e in enumerate(events) if e["event"] == "run_started"][1]:]
    steps = [e["step"] for e in second if e["event"] == "step_logged"]
    assert steps == list(range(stopped["step"] + 1, 31))
    assert events[-1]["event"] == "run_finished" and (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_engine_is_reported_as_died(tiny_toml):
    out = snugtune("train", str(tiny_toml("train.max_steps=500", "data.eval_fraction=0")), "--detach")
    run_dir = run_dir_of(out.stdout)
    wait_for_event(run_dir, "step_logged")
    pid = int((run_dir / "pid").read_text())
    os.kill(pid, signal.SIGKILL)
    attached = snugtune("attach", run_dir.name)
    assert attached.returncode == 1
    assert "died" in attached.stdout and "engine.log" in attached.stdout
    listed = {r["name"]: r for r in json.loads(snugtune("runs", "--json").stdout)}
    assert listed[run_dir.name]["status"] == "died"


# ---- bad input -----------------------------------------------------------------------------------------


def test_unknown_preset_lists_the_known_ones():
    out = snugtune("train", "no-such-preset")
    assert out.returncode == 2
    assert "unknown preset 'no-such-preset'" in out.stderr and "demo" in out.stderr
    assert "Traceback" not in out.stderr


def test_invalid_values_name_the_key_and_create_no_run(runs_dir, tmp_path):
    out = snugtune("train", "demo", "--set", "lora.r=0")
    assert out.returncode == 2 and "lora.r" in out.stderr and "greater than or equal to 1" in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname_or_path = "m"\n[data]\npath = "d.jsonl"\n[train]\nmicro_bach = 2\n')
    out = snugtune("train", str(bad))
    assert out.returncode == 2 and str(bad) in out.stderr and "train.micro_bach" in out.stderr
    assert "micro_batch" in out.stderr  # the suggestion
    assert not runs_dir.exists() or not list(runs_dir.iterdir())


def test_a_gpu_preset_without_data_says_how_to_give_it(runs_dir):
    out = snugtune("train", "rtx-3060-qwen2.5-1.5b")
    assert out.returncode == 2 and "--set data.path=" in out.stderr
    assert not runs_dir.exists() or not list(runs_dir.iterdir())


def test_an_unwritable_runs_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = snugtune("train", "demo", "--set", f"output.runs_dir='{blocker / 'runs'}'")
    assert out.returncode == 2 and "cannot create the runs directory" in out.stderr and "output.runs_dir" in out.stderr


def test_unknown_runs_and_existing_export_dirs_are_refused(tiny_toml, runs_dir, tmp_path):
    out = snugtune("attach", "nothing-like-this")
    assert out.returncode == 2 and "no run named" in out.stderr
    from core import runs

    run_dir = runs.create_run_dir(make_tiny_config("m", "d.jsonl", runs_dir))
    (tmp_path / "exists").mkdir()
    out = snugtune("export", run_dir.name, "--merged", str(tmp_path / "exists"))
    assert out.returncode == 2 and "already exists" in out.stderr
    assert list((tmp_path / "exists").iterdir()) == []


# ---- the Hub, stood in for by a local server -------------------------------------------------------------


class _FakeHub(BaseHTTPRequestHandler):
    """Answers config.json requests the way the Hub does for missing and gated repositories."""

    def _answer(self):
        if "/gated/" in self.path or self.path.startswith("/someone/gated-model/"):
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model someone/gated-model is restricted.")
        else:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.parametrize("model,expected", [
    ("nobody/missing-model", "no such model on the Hub"),
    ("someone/gated-model", "gated and needs an access token"),
])
def test_hub_model_errors_are_one_clear_message_before_any_run_exists(model, expected, fake_hub, tiny_toml,
                                                                      runs_dir, tmp_path):
    toml = tiny_toml(f"model.name_or_path='{model}'")
    secret = "hf_" + "x" * 30
    for detach in ([], ["--detach"]):
        out = snugtune("train", str(toml), *detach, env={"HF_ENDPOINT": fake_hub, "HF_HOME": str(tmp_path / "hf"),
                                                         "HF_TOKEN": secret, "HF_HUB_OFFLINE": "0"})
        assert out.returncode == 2, out.stdout + out.stderr
        assert expected in out.stderr and "Traceback" not in out.stderr
        assert secret not in out.stdout + out.stderr
        assert not runs_dir.exists() or not list(runs_dir.iterdir())  # the preflight said it: no failed run left


@pytest.mark.slow
def test_the_engine_says_a_hub_error_itself_when_the_preflight_is_skipped(fake_hub, tiny_toml, tmp_path):
    toml = tiny_toml("model.name_or_path='someone/gated-model'")
    secret = "hf_" + "x" * 30
    out = snugtune("train", str(toml), "--no-preflight", env={"HF_ENDPOINT": fake_hub, "HF_HOME": str(tmp_path / "hf"),
                                                              "HF_TOKEN": secret, "HF_HUB_OFFLINE": "0"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "gated and needs an access token" in out.stdout and "Traceback" not in out.stdout
    assert secret not in out.stdout + out.stderr
    run_dir = run_dir_of(out.stdout)
    assert read_events(run_dir)[-1]["kind"] == "user" and not (run_dir / "adapter").exists()
    assert secret not in (run_dir / "events.jsonl").read_text() + (run_dir / "engine.log").read_text()


def test_an_unreachable_hub_is_one_clear_message(tiny_toml, tmp_path):
    toml = tiny_toml("model.name_or_path='nobody/some-model'")
    out = snugtune("train", str(toml), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 2
    assert "cannot be reached" in out.stderr and "local model directory" in out.stderr


def test_data_mistakes_are_found_before_the_run_directory_is_made(tiny_toml, runs_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2"\n')
    no_columns = tmp_path / "cols.jsonl"
    no_columns.write_text('{"foo": "x", "bar": "y"}\n')
    cases = [(f"data.path='{tmp_path / 'missing.jsonl'}'", "missing.jsonl"), (f"data.path='{bad}'", "line 2"),
             (f"data.path='{no_columns}'", "foo"), (f"model.name_or_path='{tmp_path / 'no-model'}'", "no-model")]
    for override, named in cases:
        out = snugtune("train", str(tiny_toml(override)), "--detach")
        assert out.returncode == 2, (override, out.stdout, out.stderr)
        assert named in out.stderr and "Traceback" not in out.stderr, (override, out.stderr)
        assert not runs_dir.exists() or not list(runs_dir.iterdir()), override


# ---- presets ---------------------------------------------------------------------------------------------------


def test_presets_list_and_show(config_dir):
    out = snugtune("presets")
    assert out.returncode == 0
    for name in ("demo", "gtx-1650-qwen2.5-0.5b", "rtx-3060-qwen2.5-1.5b", "rtx-4090-qwen2.5-3b"):
        assert name in out.stdout
    listed = json.loads(snugtune("presets", "--json").stdout)
    assert {p["source"] for p in listed} == {"builtin"} and all(p["description"] for p in listed)
    shown = snugtune("presets", "show", "demo")
    assert shown.returncode == 0 and "# Run it with: snugtune train demo" in shown.stdout
    as_json = json.loads(snugtune("presets", "show", "demo", "--json").stdout)
    assert as_json["model"]["name_or_path"] == "builtin:tiny-llama"
    missing = snugtune("presets", "show", "nope")
    assert missing.returncode == 2 and "unknown preset 'nope'" in missing.stderr


# ---- viewers follow the current attempt; stop --wait; runs rm; damaged logs; broken pipes ---------------

# A stand-in engine for the viewers' side (their logic is what is tested; the real engine is in the
# training tests above): it appends the events given, in order, each after the file named before
# it exists (None: at once); on SIGTERM it only notes the signal (in the file "got-term").
FAKE_ENGINE = r"""
import json, os, signal, sys, time
run_dir, steps = sys.argv[1], json.loads(sys.argv[2])
signal.signal(signal.SIGTERM, lambda *a: open(os.path.join(run_dir, "got-term"), "w").close())
for gate, event in steps:
    while gate and not os.path.exists(os.path.join(run_dir, gate)):
        time.sleep(0.05)
    with open(os.path.join(run_dir, "events.jsonl"), "a") as fh:
        fh.write(json.dumps({"v": 1, "time": time.time(), **event}) + "\n")
"""


def fake_run(runs_dir: Path, name: str, events: list[dict]) -> Path:
    from core.events import EventWriter

    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    make_tiny_config("m", "d.jsonl", runs_dir).write_toml(run_dir / "config.toml")
    with EventWriter(run_dir) as w:
        for e in events:
            w.emit(**e)
    return run_dir


def start_fake_engine(run_dir: Path, steps: list) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", FAKE_ENGINE, str(run_dir), json.dumps(steps)])
    (run_dir / "pid").write_text(f"{proc.pid}\n")  # as runs.spawn does
    last = read_events(run_dir)[-1]["time"] if read_events(run_dir) else time.time()
    os.utime(run_dir / "pid", (last + 1, last + 1))  # a relaunch comes after the last event
    return proc


FIRST_ATTEMPT = [{"event": "run_started", "total_steps": 3}, {"event": "step_logged", "step": 1, "total_steps": 3, "loss": 2.0},
                 {"event": "run_stopped", "step": 1, "checkpoint": "checkpoint-1"}]


def test_attach_with_no_name_follows_the_newest_running_run_from_its_resume(runs_dir):
    older = fake_run(runs_dir, "older", [{"event": "run_started", "total_steps": 9}])
    sleeper = start_fake_engine(older, [["never", {"event": "run_finished"}]])
    newer = fake_run(runs_dir, "newer", FIRST_ATTEMPT)
    engine = start_fake_engine(newer, [
        [None, {"event": "run_started", "total_steps": 3, "resumed_from": "checkpoint-1"}],
        ["go", {"event": "step_logged", "step": 2, "total_steps": 3, "loss": 1.5}],
        [None, {"event": "eval_logged", "step": 2, "eval_loss": None}],
        [None, {"event": "run_finished", "steps": 2, "final_loss": 1.5, "adapter_path": "a"}],
    ])
    try:
        attach = subprocess.Popen([*CMD, "attach", "--text"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert run_dir_of(attach.stdout.readline()) == newer
        (newer / "go").touch()
        out, err = attach.communicate(timeout=LONG)
    finally:
        for p in (sleeper, engine):
            p.kill()
            p.wait()
    assert attach.returncode == 0, out + err
    assert "finished: 2 steps" in out and "eval at step 2: loss -" in out
    assert "stopped at step 1" not in out and "step 1/3" not in out  # the earlier attempt is not replayed
    assert "also running: older" in err


def test_attach_with_no_name_and_nothing_running_says_so(runs_dir):
    fake_run(runs_dir, "done", FIRST_ATTEMPT)
    out = snugtune("attach")
    assert out.returncode == 2 and "no run is running" in out.stderr and "snugtune attach done" in out.stderr


def test_stop_wait_returns_when_the_engine_has_stopped_not_before(runs_dir):
    run_dir = fake_run(runs_dir, "r", FIRST_ATTEMPT)  # a resumed run: its log already holds a run_stopped
    engine = start_fake_engine(run_dir, [
        [None, {"event": "run_started", "total_steps": 3, "resumed_from": "checkpoint-1"}],
        ["go", {"event": "run_stopped", "step": 2, "checkpoint": str(run_dir / "checkpoints" / "checkpoint-2")}],
    ])
    try:
        # the ready marker: the fake engine's run_started, written after its SIGTERM handler is set
        # (before its first line, `stop` writes the stop file only: see runs.request_stop)
        deadline = time.monotonic() + LONG
        while len(read_events(run_dir)) <= len(FIRST_ATTEMPT) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop = subprocess.Popen([*CMD, "stop", "r", "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert "asked run r to save a checkpoint" in stop.stdout.readline()
        deadline = time.monotonic() + LONG
        while not (run_dir / "got-term").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (run_dir / "got-term").exists()
        # the engine got the signal but has not stopped yet: neither has `stop --wait`
        assert stop.poll() is None
        (run_dir / "go").touch()
        out, err = stop.communicate(timeout=LONG)
    finally:
        engine.kill()
        engine.wait()
    assert stop.returncode == 0, out + err
    assert "stopped at step 2 (checkpoint-2)" in out and "snugtune resume r" in out


def test_stop_wait_gives_up_after_its_timeout_with_its_own_message(runs_dir):
    run_dir = fake_run(runs_dir, "slow", [{"event": "run_started", "total_steps": 3}])
    engine = start_fake_engine(run_dir, [["never", {"event": "run_stopped"}]])
    try:
        out = snugtune("stop", "slow", "--wait", "--timeout", "1")
    finally:
        engine.kill()
        engine.wait()
    assert out.returncode == 1
    assert "has not stopped within 1 s" in out.stderr and f"pid {engine.pid}" in out.stderr
    assert "Traceback" not in out.stderr


def test_runs_rm_asks_refuses_a_running_run_and_deletes_with_yes(runs_dir):
    stopped = fake_run(runs_dir, "old-run", FIRST_ATTEMPT)
    running = fake_run(runs_dir, "live-run", [{"event": "run_started"}])
    engine = start_fake_engine(running, [["never", {"event": "run_finished"}]])
    try:
        asked = snugtune("runs", "rm", "old-run", input="")  # no terminal to ask on
        assert asked.returncode == 2 and "--yes" in asked.stderr and stopped.is_dir()
        refused = snugtune("runs", "rm", "live-run", "--yes")
        assert refused.returncode == 2 and "is running" in refused.stderr and running.is_dir()
    finally:
        engine.kill()
        engine.wait()
    removed = snugtune("runs", "rm", "old-run", "--yes")
    assert removed.returncode == 0 and not stopped.exists()
    assert [r["name"] for r in json.loads(snugtune("runs", "--json").stdout)] == ["live-run"]


def test_runs_lists_damaged_and_unreadable_logs_without_a_traceback(runs_dir):
    garbled = fake_run(runs_dir, "garbled", FIRST_ATTEMPT)
    with open(garbled / "events.jsonl", "ab") as fh:
        fh.write(b"\x9c\xff\x00 binary junk\n")
    unreadable = fake_run(runs_dir, "unreadable", [])
    (unreadable / "events.jsonl").unlink()
    (unreadable / "events.jsonl").mkdir()
    out = snugtune("runs")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert re.search(r"garbled\s+stopped", out.stdout) and re.search(r"unreadable\s+unreadable", out.stdout)
    assert "note: garbled: 1 unreadable line of events.jsonl skipped (line 4: not UTF-8" in out.stdout
    attached = snugtune("attach", "garbled", "--text")
    assert attached.returncode == 0 and "stopped at step 1" in attached.stdout


@pytest.mark.parametrize("args", [["runs"], ["presets"], ["estimate", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "gtx-1650", "--json"]])
def test_a_closed_pipe_is_silent(args, runs_dir):
    fake_run(runs_dir, "some-run", FIRST_ATTEMPT)
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -1` gone before anything is written: every write fails
    try:
        out = subprocess.run([*CMD, *args], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=LONG)
    finally:
        os.close(write_end)
    assert out.returncode == 141 and out.stderr == ""
