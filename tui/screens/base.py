"""What every step shares: the step bar, the status line, the footer keys, and the one
handler for failed workers."""
from __future__ import annotations

from typing import Any, Iterable

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState

from tui.widgets.stepbar import StepBar


def attr(obj: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` that `obj` has, as an attribute or a key (core objects may be
    dataclasses or dicts; the wizard reads both)."""
    for name in names:
        if isinstance(obj, dict):
            if name in obj and obj[name] is not None:
                return obj[name]
        elif getattr(obj, name, None) is not None:
            return getattr(obj, name)
    return default


def hub_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a model lookup or Hub search raises for the user to read (not bugs)."""
    from core import catalog
    from core.errors import UserError

    extra = [getattr(mod, "HubUnreachable", None) for mod in (catalog, _hub_module())]
    return (UserError, *[e for e in extra if isinstance(e, type)])


def estimator():
    """core.estimate, or None while it is not installed (the screens then show no numbers)."""
    try:
        from core import estimate
    except ImportError:
        return None
    return estimate


def _hub_module():
    try:
        from core import hub
    except ImportError:
        return None
    return hub


class Cancelled(Exception):
    """The screen that started a command went away (the wizard quit or moved on)."""


def subprocess_env() -> dict:
    """The environment of the wizard's subprocesses (data inspect, export, chat): progress bars off.
    Their output is read as text, its last line shown as progress or as the error ("exporting:
    Loading weights:  74%|███▎ | 174/236" was the export's status line for a real model)."""
    import os

    from core.runs import quiet_env

    return quiet_env(os.environ)


def run_command(cmd: list[str], timeout_s: float, *, keep_on_cancel: bool = False,
                poll_s: float = 0.2) -> tuple[int, str, str]:
    """Run a command from a worker thread: (exit code, stdout, stderr).

    Unlike subprocess.run, it notices when its worker is cancelled (the wizard quitting must not
    wait minutes for a tokenizer): the command is then killed, or with `keep_on_cancel` (an
    export half-way through a write) left to finish in its own session. Raises Cancelled, or
    subprocess.TimeoutExpired after `timeout_s`.
    """
    import subprocess
    import tempfile
    import time

    from textual.worker import get_current_worker

    worker = get_current_worker()
    # output to files, not pipes: nothing has to read while we poll
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=keep_on_cancel, env=subprocess_env())
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if worker.is_cancelled:
                if not keep_on_cancel:
                    proc.kill()
                    proc.wait()
                raise Cancelled()
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise subprocess.TimeoutExpired(cmd, timeout_s)
            worker.cancelled_event.wait(poll_s)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def fmt_gib(x: Any) -> str:
    return "?" if x is None else f"{float(x):.1f} GiB"


def plural(n: float, word: str) -> str:
    """`1 epoch`, `2 epochs`, `0.5 epochs`, `1 step` (issue 14: "1 epochs", "(1 steps)")."""
    return f"{n:g} {word}" + ("" if n == 1 else "s")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return "<1s"  # not "0s": something that takes no time at all reads as a bug
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 90 * 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class StepScreen(Screen):
    """A wizard step. Subclasses set STEP (0-5) and write `compose_body`."""

    STEP = 0
    TITLE_TEXT = ""
    BINDINGS = [
        Binding("ctrl+n", "app.next_step", "Next", priority=True),
        Binding("ctrl+b", "app.prev_step", "Back", priority=True),
        Binding("ctrl+s", "app.save_preset", "Save preset", priority=True),
        Binding("ctrl+q", "app.quit", "Quit", priority=True),
    ]

    def compose(self) -> ComposeResult:
        yield StepBar(self.STEP, id="stepbar")
        yield from self.compose_body()
        yield Static("", id="status")
        yield Footer()

    @on(events.Mount)
    def _first_frame(self) -> None:
        if self.app.exit_after_first_frame:
            self.call_after_refresh(self.app.first_frame_painted)

    def compose_body(self) -> Iterable:
        return []

    # ---- the status line ------------------------------------------------------------

    def set_status(self, message: str | Text, kind: str = "info") -> None:
        """One line above the footer: info, or an error that stays until replaced."""
        status = self.query_one("#status", Static)
        status.set_classes(kind)
        if isinstance(message, str):
            prefix = {"error": "✗ ", "warning": "! ", "ok": "✓ "}.get(kind, "")
            message = Text(prefix + message)
        status.update(message)

    # ---- leaving the step -------------------------------------------------------------

    def leave_problem(self) -> str | None:
        """Why the user cannot go forward yet (None: they can). Shown in the status line."""
        return None

    def save_state(self) -> None:
        """Write what is on screen into the app's configuration before leaving."""

    # ---- the one place failed workers are reported ------------------------------------

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            self.set_status(f"{event.worker.name or 'background task'} failed: {error}", "error")
