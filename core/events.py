"""The run's event log: one JSON object a line in `<run_dir>/events.jsonl`.

This file is the only channel from the engine to any viewer (the wizard, `snugtune attach`,
`tail -f`). The engine appends; viewers read or follow. No torch here: the wizard imports it.

Every line is `{"v": SCHEMA_VERSION, "event": NAME, "time": unix_seconds, ...fields}`;
see docs/ARCHITECTURE.md for the events and their fields.
"""
from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass, field
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
    """Appends events to a run's log, whole lines only, flushed and fsynced so that a viewer
    (or a post-mortem after a crash) sees every event the engine emitted.

    Each event is one `write` of its whole line on an O_APPEND descriptor. A line can still be
    torn: the engine killed mid-write, or a full disk accepting part of it. A torn line is never
    continued: a writer that opens a log whose last line lacks its newline, or whose own last
    write failed part-way, starts on a new line, so the next event is never glued to garbage
    (readers skip the torn line and say so).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._torn = _ends_mid_line(self.path)

    def emit(self, event: str, **fields: Any) -> dict:
        if self._fd is None:
            raise ValueError(f"{self.path}: the event writer is closed")
        record = {"v": SCHEMA_VERSION, "event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(record, default=_jsonable, allow_nan=True).encode("ascii") + b"\n"
        data = (b"\n" if self._torn else b"") + line
        written = 0
        try:
            while written < len(data):
                n = os.write(self._fd, data[written:])
                if n <= 0:  # a regular file never does this; guard against a loop on odd filesystems
                    raise OSError(errno.EIO, "short write", str(self.path))
                written += n
        except OSError:
            # Nothing written leaves the log as it was; part of a line must be ended by the next write.
            if written:
                self._torn = True
            raise
        self._torn = False
        try:
            os.fsync(self._fd)
        except OSError:
            pass  # some filesystems (pipes, some FUSE mounts) cannot fsync; the write is enough
        return record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_mid_line(path: Path) -> bool:
    """Whether a file's last byte is something other than a newline (a torn last line)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:
        return False


def _events_path(path: str | Path) -> Path:
    path = Path(path)
    return path / EVENTS_FILE if path.is_dir() else path


def _parse_line(raw: bytes) -> tuple[Optional[dict], Optional[str]]:
    """An event from one line of the log, or (None, why not). A blank line is (None, None).

    The engine writes ASCII JSON (json.dumps escapes everything else), so a byte that is not
    UTF-8 means the line was damaged: it is skipped whole rather than half-trusted."""
    if not raw.strip():
        return None, None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte {exc.start + 1})"
    try:
        record = json.loads(text)
    except ValueError:
        return None, "not JSON (a torn or overwritten line)"
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        return None, "not an event (no \"event\" name)"
    return record, None


def _parse(line: str) -> Optional[dict]:
    return _parse_line(line.encode("utf-8", "surrogateescape"))[0]


@dataclass
class LogRead:
    """What reading a run's log found: the events, where each one's line ends (byte offsets),
    the lines skipped (1-based line number, why) and, if the file could not be read, why."""

    events: list[dict] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    error: Optional[str] = None
    size: int = 0

    def skipped_note(self) -> Optional[str]:
        if not self.skipped:
            return None
        lines = ", ".join(str(n) for n, _ in self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
        return (f"{len(self.skipped)} unreadable line{'s' if len(self.skipped) > 1 else ''} of {EVENTS_FILE} "
                f"skipped (line {lines}: {self.skipped[0][1]})")


def read_log(path: str | Path) -> LogRead:
    """Read a run's log (a run directory or the events.jsonl path) without ever raising.

    A last line without its newline may still be being written: it is taken if it parses and
    otherwise left for next time (not counted as skipped)."""
    p = _events_path(path)
    out = LogRead()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return out
    except OSError as exc:
        out.error = f"cannot read {p} ({exc.strerror or exc})"
        return out
    out.size = len(data)
    pos = 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        pos += len(raw) + (0 if last else 1)
        event, why = _parse_line(raw)
        if event is not None:
            out.events.append(event)
            out.ends.append(pos)
        elif why is not None and not last:
            out.skipped.append((number, why))
    return out


def read_events(path: str | Path) -> list[dict]:
    """All readable events in a run's log (a run directory or the events.jsonl path); lines
    that are not events are skipped (read_log says which). [] if there is no log yet."""
    return read_log(path).events


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


def _pid_file_time(run_dir: Path) -> Optional[float]:
    try:
        return (run_dir / "pid").stat().st_mtime
    except OSError:
        return None


def attempt_index(log: LogRead, run_dir: str | Path) -> int:
    """Where the run's current attempt starts: an index into `log.events`.

    A run directory holds every attempt of its run: the first launch and each resume append to
    the same log, each ending with a terminal event. The last terminal event belongs to an
    earlier attempt when a newer one has begun: when events follow it, or when the pid file
    (written by every launch, before the engine says anything) is newer than it and its
    process is alive, the resume that is still importing torch. Then the current attempt is
    everything after it; otherwise the last attempt is the one that ended with it.
    """
    run_dir = Path(run_dir)
    terminals = [i for i, e in enumerate(log.events) if e.get("event") in TERMINAL_EVENTS]
    if not terminals:
        return 0
    last = terminals[-1]
    superseded = last < len(log.events) - 1
    if not superseded:
        pid_time, pid = _pid_file_time(run_dir), read_pid(run_dir)
        ended = log.events[last].get("time")
        superseded = (pid_time is not None and pid is not None and isinstance(ended, (int, float))
                      and pid_time > ended and pid_alive(pid))
    if superseded:
        return last + 1
    return terminals[-2] + 1 if len(terminals) > 1 else 0


def current_attempt(run_dir: str | Path) -> int:
    """The byte offset in events.jsonl where the run's current attempt starts (see attempt_index):
    a viewer follows from there (`follow(..., from_offset=..., after_offset=...)`)."""
    log = read_log(run_dir)
    i = attempt_index(log, run_dir)
    return log.ends[i - 1] if i > 0 else 0


def follow(
    path: str | Path,
    *,
    alive: Optional[Callable[[], bool]] = None,
    pid: Optional[int] = None,
    poll_s: float = 0.25,
    start_grace_s: float = 10.0,
    after_offset: Optional[int] = None,
    from_offset: int = 0,
    cancelled: Optional[Callable[[], bool]] = None,
    wait: Optional[Callable[[float], object]] = None,
    position: Optional[dict] = None,
) -> Iterator[dict]:
    """Yield a run's events from byte `from_offset` of its log, then new ones as the engine
    appends them, until the current attempt's terminal event.

    Stops after a terminal event whose line ends past byte `after_offset`. None (the default)
    means the current attempt (current_attempt(): a resumed run's log holds the earlier
    attempts' `run_stopped` or `run_failed`); a launcher that knows better passes the log's
    size from just before it started the engine. If the engine process is gone and the log has
    no such event, yields one synthetic `run_failed` event with kind "died" and stops. Liveness
    comes from `alive()` if given, else `pid`, else the run directory's `pid` file (a run
    directory with no pid file yet is given `start_grace_s` seconds to get one).

    A line that is not an event (garbage, a torn write followed by more lines, bytes that are
    not UTF-8) is skipped and reported by a `log_line_skipped` event (`line`, `reason`) that
    is not in the file. `cancelled()` ends the follow early; `wait(seconds)` replaces the sleep
    between polls (a worker's cancellable wait); `position["offset"]`, if given, is kept at the
    end of the last line read, for a follow that picks up where this one left off.
    """
    p = _events_path(path)
    run_dir = p.parent
    if after_offset is None:
        after_offset = current_attempt(run_dir)
    offset = from_offset  # bytes read so far
    base = from_offset  # byte offset where `buf` starts
    buf = b""
    line_no = 0
    if from_offset:
        try:
            with open(p, "rb") as fh:
                line_no = fh.read(from_offset).count(b"\n")
        except OSError:
            pass
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

    def skipped(reason: str) -> dict:
        return {"v": SCHEMA_VERSION, "event": "log_line_skipped", "time": round(time.time(), 3),
                "line": line_no, "reason": reason, "path": str(p)}

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
        except OSError as exc:
            chunk = b""
            if not was_alive:
                yield skipped(f"cannot read the log ({exc.strerror or exc})")
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            base += len(line) + 1
            line_no += 1
            if position is not None:
                position["offset"] = base
            event, why = _parse_line(line)
            if event is None:
                if why is not None:
                    yield skipped(why)
                continue
            yield event
            if ends_run(event, base):
                return
        if not was_alive:
            # Maybe the last line lacks its newline (killed mid-write): take it if it parses.
            event, why = _parse_line(buf)
            if event is not None:
                yield event
                if ends_run(event, offset):
                    return
            elif why is not None:
                line_no += 1
                yield skipped(why + ", the last line")
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
