"""The event log: write, read, follow (live, terminal events, a dead engine)."""
import json
import os
import subprocess
import sys
import threading
import time

from core.events import (SCHEMA_VERSION, TERMINAL_EVENTS, EventWriter, current_attempt, follow, pid_alive,
                         read_events, read_log)


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
    # with offset 0 the follower stops at the first session's end; by default, at the current attempt's
    assert [e["event"] for e in follow(tmp_path, alive=lambda: True, poll_s=0.01, after_offset=0)][-1] == "run_stopped"
    assert [e["event"] for e in follow(tmp_path, alive=lambda: True, poll_s=0.01)][-1] == "run_finished"


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
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert not pid_alive(proc.pid)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    # Not waited for: a zombie until reaped, which must count as dead.
    deadline = time.time() + 300
    while pid_alive(zombie.pid) and time.time() < deadline:
        time.sleep(0.01)
    assert not pid_alive(zombie.pid)
    zombie.wait()


# ---- damaged logs: whole lines only, unreadable lines skipped and said ----------------------------


def test_a_writer_that_finds_a_torn_last_line_starts_a_new_one(tmp_path):
    p = tmp_path / "events.jsonl"
    EventWriter(p).emit("run_started", total_steps=3)
    with open(p, "ab") as fh:
        fh.write(b'{"v": 1, "event": "step_logged", "st')  # the engine killed mid-write
    with EventWriter(p) as w:  # the resumed engine
        w.emit("run_started", resumed_from="checkpoint-2")
    assert [e["event"] for e in read_events(p)] == ["run_started", "run_started"]
    log = read_log(p)
    assert log.skipped == [(2, "not JSON (a torn or overwritten line)")]
    assert "1 unreadable line of events.jsonl skipped (line 2" in log.skipped_note()


def test_lines_that_are_not_utf8_or_not_events_are_skipped_and_counted(tmp_path):
    p = tmp_path / "events.jsonl"
    good = b'{"v": 1, "event": "step_logged", "step": 1, "time": 1}\n'
    p.write_bytes(good + b'{"v": 1, "event": "step_lo\xff\xfe"}\n' + b"[1, 2]\n" + b"\x00\x00garbage\n" + good)
    log = read_log(p)
    assert [e["step"] for e in log.events] == [1, 1]
    assert [n for n, _ in log.skipped] == [2, 3, 4]
    assert log.skipped[0][1].startswith("not UTF-8") and log.skipped[1][1].startswith("not an event")
    got = list(follow(p, alive=lambda: False, poll_s=0.01))
    assert [e["event"] for e in got] == ["step_logged", "log_line_skipped", "log_line_skipped", "log_line_skipped",
                                        "step_logged", "run_failed"]
    assert [e["line"] for e in got if e["event"] == "log_line_skipped"] == [2, 3, 4]


def test_an_unreadable_log_is_reported_not_raised(tmp_path):
    (tmp_path / "events.jsonl").mkdir()  # unreadable as a file, also for root
    log = read_log(tmp_path)
    assert log.events == [] and "cannot read" in log.error
    assert read_events(tmp_path) == []


# ---- the current attempt -----------------------------------------------------------------------------


def _stopped_then_relaunched(run_dir, pid):
    w = EventWriter(run_dir)
    w.emit("run_started")
    w.emit("step_logged", step=1)
    stopped = w.emit("run_stopped", step=1)
    end_of_first = (run_dir / "events.jsonl").stat().st_size
    (run_dir / "pid").write_text(f"{pid}\n")  # a launch writes the pid file before any event
    # dated a second after the stop, as a relaunch by hand is (file times follow a coarse clock)
    os.utime(run_dir / "pid", (stopped["time"] + 1, stopped["time"] + 1))
    return w, end_of_first


def test_a_relaunched_run_still_in_setup_is_a_new_attempt(tmp_path):
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        w, end_of_first = _stopped_then_relaunched(tmp_path, engine.pid)
        assert current_attempt(tmp_path) == end_of_first
        got = []

        def resumed_engine():
            w.emit("run_started", resumed_from="checkpoint-1")
            w.emit("step_logged", step=2)
            w.emit("run_finished", steps=2)

        t = threading.Timer(0.1, resumed_engine)
        t.start()
        for e in follow(tmp_path, poll_s=0.01, from_offset=current_attempt(tmp_path)):
            got.append(e["event"])
        t.join()
        # the old attempt's run_stopped is neither shown nor taken for this attempt's end
        assert got == ["run_started", "step_logged", "run_finished"]
    finally:
        engine.kill()
        engine.wait()


def test_a_finished_or_stopped_run_shows_its_last_attempt(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    w, end_of_first = _stopped_then_relaunched(tmp_path, dead.pid)
    # relaunched, but its process is gone without a word: the stopped attempt is still the last
    assert current_attempt(tmp_path) == 0
    w.emit("run_started", resumed_from="checkpoint-1")
    w.emit("run_finished", steps=2)
    assert current_attempt(tmp_path) == end_of_first
    got = [e["event"] for e in follow(tmp_path, poll_s=0.01, from_offset=current_attempt(tmp_path))]
    assert got == ["run_started", "run_finished"]
