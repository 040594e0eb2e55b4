"""The run's event log: one JSON object a line in `<run_dir>/events.jsonl`.

This file is the only channel from the engine to any viewer (the wizard, `snugtune attach`,
`tail -f`). The engine appends; viewers read or follow. No torch here: the wizard imports it.

Every line is `{"v": SCHEMA_VERSION, "event": NAME, "time": unix_seconds, ...fields}`;
see docs/ARCHITECTURE.md for the events and their fields.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

SCHEMA_VERSION = 1
EVENTS_FILE = "events.jsonl"

# A run ends with exactly one of these; a viewer stops following after it.
TERMINAL_EVENTS = frozenset({"run_finished", "run_failed", "run_stopped"})

ENGINE_DIED = (
    "the engine process ended without a final event (killed, or crashed hard); "
    "see engine.log in the run directory"
)


def _jsonable(obj: Any) -> Any:
    # Numbers from torch/numpy arrive as scalars with .item(); paths as Path objects.
    if hasattr(obj, "item"):
        try:
            return obj.item()
        except Exception:  # noqa: BLE001 - fall through to str
            pass
    return str(obj)


class EventWriter:
    """Appends events to a run's log, one line each, flushed and fsynced so that a viewer
    (or a post-mortem after a crash) sees every event the engine emitted."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def emit(self, event: str, **fields: Any) -> dict:
        record = {"v": SCHEMA_VERSION, "event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(record, default=_jsonable, allow_nan=True)
        # One write per line: a reader never sees half of one line followed by another.
        self._fh.write(line + "\n")
        self._fh.flush()
        try:
            os.fsync(self._fh.fileno())
        except OSError:
            pass  # some filesystems (pipes, some FUSE mounts) cannot fsync; the flush is enough
        return record

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _events_path(path: str | Path) -> Path:
    path = Path(path)
    return path / EVENTS_FILE if path.is_dir() else path


def _parse(line: str) -> Optional[dict]:
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None  # a torn line (engine killed mid-write) is skipped, not fatal
    return record if isinstance(record, dict) and "event" in record else None


def read_events(path: str | Path) -> list[dict]:
    """All complete events in a run's log (a run directory or the events.jsonl path)."""
    p = _events_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    # A last line without its newline may still be being written: leave it for next time.
    lines = text.split("\n")
    return [e for e in (_parse(line) for line in lines[:-1]) if e is not None] + (
        [e] if lines[-1] and (e := _parse(lines[-1])) is not None else []
    )


def pid_alive(pid: int) -> bool:
    """Whether a process is running (a zombie, dead but not reaped, counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            # Field 3 is the state; the command name (field 2) may hold spaces, so split after ')'.
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) said it exists


def read_pid(run_dir: str | Path) -> Optional[int]:
    try:
        return int((Path(run_dir) / "pid").read_text().strip())
    except (OSError, ValueError):
        return None


def follow(
    path: str | Path,
    *,
    alive: Optional[Callable[[], bool]] = None,
    pid: Optional[int] = None,
    poll_s: float = 0.25,
    start_grace_s: float = 10.0,
    after_offset: int = 0,
    cancelled: Optional[Callable[[], bool]] = None,
    wait: Optional[Callable[[float], object]] = None,
) -> Iterator[dict]:
    """Yield a run's events from the start, then new ones as the engine appends them.

    Stops after a terminal event whose line ends past byte `after_offset` (a resumed run's
    log holds the earlier session's `run_stopped`: pass the log's size at the resume). If the
    engine process is gone and the log has no such event, yields one synthetic `run_failed`
    event with kind "died" and stops. Liveness comes from `alive()` if given, else `pid`, else
    the run directory's `pid` file (a run directory with no pid file yet is given
    `start_grace_s` seconds to get one). `cancelled()` ends the follow early; `wait(seconds)`
    replaces the sleep between polls (a worker's cancellable wait).
    """
    p = _events_path(path)
    run_dir = p.parent
    offset = 0  # bytes read so far
    base = 0  # byte offset where `buf` starts
    buf = b""
    started = time.monotonic()
    pause = wait or time.sleep

    def engine_alive() -> bool:
        if alive is not None:
            return alive()
        the_pid = pid if pid is not None else read_pid(run_dir)
        if the_pid is None:
            return time.monotonic() - started < start_grace_s
        return pid_alive(the_pid)

    def ends_run(event: dict, line_end: int) -> bool:
        return event.get("event") in TERMINAL_EVENTS and line_end > after_offset

    while cancelled is None or not cancelled():
        # Check liveness before reading, so that events written just before death are read.
        was_alive = engine_alive()
        try:
            with open(p, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
        except FileNotFoundError:
            chunk = b""
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            base += len(line) + 1
            event = _parse(line.decode("utf-8", "replace"))
            if event is None:
                continue
            yield event
            if ends_run(event, base):
                return
        if not was_alive:
            # Maybe the last line lacks its newline (killed mid-write): take it if it parses.
            event = _parse(buf.decode("utf-8", "replace"))
            if event is not None:
                yield event
                if ends_run(event, offset):
                    return
            yield {
                "v": SCHEMA_VERSION,
                "event": "run_failed",
                "time": round(time.time(), 3),
                "kind": "died",
                "error": ENGINE_DIED,
                "traceback": None,
                "synthetic": True,
            }
            return
        pause(poll_s)
