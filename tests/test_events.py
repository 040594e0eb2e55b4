"""The event log: write, read, follow (live, terminal events, a dead engine)."""
import json
import subprocess
import sys
import threading
import time

from core.events import SCHEMA_VERSION, TERMINAL_EVENTS, EventWriter, follow, pid_alive, read_events


def test_written_events_read_back_in_order_with_schema_fields(tmp_path):
    with EventWriter(tmp_path / "events.jsonl") as w:
        w.emit("run_started", total_steps=3)
        w.emit("step_logged", step=1, loss=2.5)
    events = read_events(tmp_path)  # a run directory works as well as the file
    assert [e["event"] for e in events] == ["run_started", "step_logged"]
    assert all(e["v"] == SCHEMA_VERSION and isinstance(e["time"], float) for e in events)
    assert events[1]["loss"] == 2.5
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_writer_appends_to_an_existing_log(tmp_path):
    EventWriter(tmp_path).emit("run_started")
    EventWriter(tmp_path).emit("run_started")  # a resumed run appends, never truncates
    assert len(read_events(tmp_path)) == 2


def test_a_torn_or_garbled_line_is_skipped(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text('{"v": 1, "event": "run_started", "time": 1}\nnot json\n{"v": 1, "event": "step_lo')
    assert [e["event"] for e in read_events(p)] == ["run_started"]


def test_follow_yields_events_appended_later_and_stops_at_the_terminal_one(tmp_path):
    w = EventWriter(tmp_path)
    w.emit("run_started")

    def engine():
        for step in (1, 2, 3):
            time.sleep(0.05)
            w.emit("step_logged", step=step)
        w.emit("run_finished", steps=3)
        w.emit("step_logged", step=99)  # after the end: never reached by a follower

    t = threading.Thread(target=engine)
    t.start()
    got = list(follow(tmp_path, alive=lambda: True, poll_s=0.01))
    t.join()
    assert [e["event"] for e in got] == ["run_started", "step_logged", "step_logged", "step_logged", "run_finished"]
    assert got[-1]["event"] in TERMINAL_EVENTS


def test_follow_after_a_resume_passes_the_earlier_sessions_end(tmp_path):
    w = EventWriter(tmp_path)
    w.emit("run_started")
    w.emit("run_stopped", step=2)  # the first session ended here
    resumed_at = (tmp_path / "events.jsonl").stat().st_size
    w.emit("run_started", resumed_from="checkpoint-2")
    w.emit("step_logged", step=3)
    w.emit("run_finished", steps=3)
    got = list(follow(tmp_path, alive=lambda: True, poll_s=0.01, after_offset=resumed_at))
    assert [e["event"] for e in got] == ["run_started", "run_stopped", "run_started", "step_logged", "run_finished"]
    # without the offset the follower stops at the first session's end
    assert [e["event"] for e in follow(tmp_path, alive=lambda: True, poll_s=0.01)][-1] == "run_stopped"


def test_follow_can_be_cancelled_while_the_run_goes_on(tmp_path):
    EventWriter(tmp_path).emit("run_started")
    stop = threading.Event()
    seen = []
    for event in follow(tmp_path, alive=lambda: True, poll_s=0.01, cancelled=stop.is_set, wait=stop.wait):
        seen.append(event["event"])
        stop.set()  # a viewer detaching: the generator ends at its next poll
    assert seen == ["run_started"]


def test_follow_reports_a_dead_engine_that_left_no_terminal_event(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (tmp_path / "pid").write_text(f"{proc.pid}\n")
    EventWriter(tmp_path).emit("step_logged", step=1)
    got = list(follow(tmp_path, poll_s=0.01))
    assert [e["event"] for e in got] == ["step_logged", "run_failed"]
    assert got[-1]["kind"] == "died" and "engine.log" in got[-1]["error"]


def test_pid_alive_tells_running_from_dead_and_zombie_processes():
    assert pid_alive(__import__("os").getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert not pid_alive(proc.pid)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    # Not waited for: a zombie until reaped, which must count as dead.
    deadline = time.time() + 30
    while pid_alive(zombie.pid) and time.time() < deadline:
        time.sleep(0.01)
    assert not pid_alive(zombie.pid)
    zombie.wait()
