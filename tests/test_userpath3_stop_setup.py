"""A stop asked for while the engine sets up (round 3, item 6). Before, the stop (ctrl+x, `snugtune
stop`, Ctrl-C in `snugtune train`) was only read once setup had finished: the user waited through
the whole model load (minutes for a 7B) to see it stop. Now a signal ends the stage that is running
(resolving the model, the tokenizer, the data, loading the weights: none writes in the run
directory), and the stop file is read between stages; either way the run ends with run_stopped,
before run_started, nothing trained and nothing half-written."""
from __future__ import annotations

import os
import signal

import core.data
from core import runs
from core.events import read_events
from core.train import Engine


def _names(run_dir) -> list[str]:
    return [e["event"] for e in read_events(run_dir)]


def test_sigterm_while_the_model_loads_stops_at_once(tiny_run_config, monkeypatch):
    run_dir = runs.create_run_dir(tiny_run_config())
    loaded = []
    original = Engine._load_model

    def load_after_a_stop(self, source=None):
        # what request_stop does once the engine has written events: SIGTERM to the engine
        os.kill(os.getpid(), signal.SIGTERM)
        loaded.append(source)  # reached only if the signal waited for setup to end
        return original(self, source)

    monkeypatch.setattr(Engine, "_load_model", load_after_a_stop)
    before = signal.getsignal(signal.SIGTERM)
    assert Engine(run_dir).run() == 0
    assert signal.getsignal(signal.SIGTERM) == before  # the engine's handler is gone again
    names = _names(run_dir)
    assert loaded == []
    assert names[-1] == "run_stopped" and "run_started" not in names and "step_logged" not in names
    stopped = read_events(run_dir)[-1]
    assert stopped["step"] == 0 and stopped["checkpoint"] is None
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "adapter").exists()
    assert runs.run_status(run_dir)["status"] == "stopped"


def test_the_stop_file_is_read_between_setup_stages(tiny_run_config, monkeypatch):
    # the stop file alone (a viewer whose engine had written no event yet sends no signal)
    run_dir = runs.create_run_dir(tiny_run_config())
    original = core.data.build_datasets

    def build_then_stop_asked(*args, **kwargs):
        out = original(*args, **kwargs)
        (run_dir / runs.STOP_FILE).write_text("asked\n")
        return out

    monkeypatch.setattr(core.data, "build_datasets", build_then_stop_asked)
    assert Engine(run_dir).run() == 0
    events = read_events(run_dir)
    messages = [e.get("message") for e in events if e["event"] == "setup_progress"]
    assert "preparing the data" in messages and "loading the model" not in messages
    assert events[-1]["event"] == "run_stopped" and not (run_dir / runs.STOP_FILE).exists()


def test_a_stop_during_setup_is_said_as_one_that_saves_nothing(tmp_path):
    # before: "stopping: the engine saves a checkpoint first" while the run was still loading its
    # model (there was nothing to save), and `snugtune stop` said "starting" only before the first event
    from core.events import EventWriter

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    w = EventWriter(run_dir / "events.jsonl")
    w.emit("setup_progress", message="loading the model")
    assert runs.setting_up(run_dir)
    w.emit("run_started", config={}, total_steps=6)
    assert not runs.setting_up(run_dir)
    w.emit("run_stopped", step=3, checkpoint=None)
    w.emit("setup_progress", message="resolving the model")  # a resume, setting up again
    assert runs.setting_up(run_dir)
    w.close()
    assert "nothing to save" in runs.STOP_IN_SETUP
