"""Small dialogs that return a value: a name prompt, a yes/no, the list of runs still going,
every run (open or delete one)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from tui.screens.base import attr
from tui.keyorder import focus_now


class PromptScreen(ModalScreen[str | None]):
    """Ask for one line of text; Enter returns it, Escape returns None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, placeholder: str = "", value: str = ""):
        super().__init__()
        self.title_text, self.placeholder, self.value = title, placeholder, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            # a Static wraps where a Label is cut at the dialog's edge ("... to (a ne" at 100 columns)
            yield Static(self.title_text, classes="dialog-title", markup=False)
            yield Input(self.value, placeholder=self.placeholder, id="prompt")
            yield Static("Enter to confirm · Escape to cancel", classes="hint")
        yield Footer()

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        value = event.value.strip()
        if value:
            self.dismiss(value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question: y confirms, n or Escape refuses."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            # a Static, not a Label: a long question (a run's name and directory) wraps, not cut
            yield Static(self.question, classes="dialog-title", markup=False)
            yield Static("y: yes · n: no", classes="hint")
        yield Footer()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class RunsScreen(ModalScreen[Path | None]):
    """Runs still going when the wizard starts: Enter attaches to one, Escape starts afresh."""

    BINDINGS = [Binding("escape", "dismiss_none", "New setup")]

    def __init__(self, runs: list[Any]):
        super().__init__()
        self.runs = runs

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Runs still going — attach to one?", classes="dialog-title")
            options = []
            for i, run in enumerate(self.runs):
                path = Path(attr(run, "run_dir", "path", "dir", default=str(run)))
                step, total = attr(run, "step", default=0), attr(run, "total_steps")
                where = f"step {step}/{total}" if total else "starting"
                loss = attr(run, "loss")
                options.append(Option(f"{path.name}  {where}" + (f"  loss {loss:.3f}" if isinstance(loss, float) else ""),
                                      id=str(i)))
            yield OptionList(*options, id="runs")
            yield Static("Enter: attach · Escape: set up a new run", classes="hint")
        yield Footer()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        run = self.runs[int(event.option.id)]
        self.dismiss(Path(attr(run, "run_dir", "path", "dir", default=str(run))))

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


def run_line(run: dict) -> str:
    """One run as the list shows it: name, status, step, loss (as `snugtune runs` has them)."""
    step, total = run.get("step") or 0, run.get("total_steps")
    loss = run.get("loss")
    return (f"{run['name']}  {run['status']}  step {step}/{total or '?'}"
            + (f"  loss {loss:.3f}" if isinstance(loss, (int, float)) else ""))


class RunListScreen(ModalScreen[Path | None]):
    """Every run in the runs directory, newest first: Enter opens one in the live panel, d (or
    Delete) removes one after asking, like `snugtune runs rm`; a running run is refused."""

    BINDINGS = [Binding("escape", "close", "Close"), Binding("d,delete", "delete", "Delete run")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="runlist-dialog"):
            yield Label("Runs", classes="dialog-title")
            yield OptionList(id="runlist")
            yield Static("", id="runlist-said", classes="hint", markup=False)
            yield Static("Enter: open in the live panel · d: delete (asks) · Escape: close", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.fill()
        focus_now(self.query_one("#runlist", OptionList))

    def fill(self) -> None:
        from core import runs
        from core.errors import UserError

        listing = self.query_one("#runlist", OptionList)
        listing.clear_options()
        try:
            self.runs = list(reversed(runs.list_runs()))
        except UserError as exc:
            self.runs = []
            self.say(str(exc), "error")
            return
        listing.add_options([Option(run_line(r), id=str(i)) for i, r in enumerate(self.runs)])
        if self.runs:
            listing.highlighted = 0
        else:
            self.say(f"no runs in {runs.default_runs_dir()}")

    def say(self, message: str, kind: str = "info") -> None:
        prefix = {"error": "✗ ", "ok": "✓ ", "warning": "! "}.get(kind, "")
        said = self.query_one("#runlist-said", Static)
        said.set_classes(f"hint {kind}")
        said.update(prefix + message)

    def _highlighted(self) -> dict | None:
        index = self.query_one("#runlist", OptionList).highlighted
        return self.runs[index] if index is not None and 0 <= index < len(self.runs) else None

    @on(OptionList.OptionSelected, "#runlist")
    def _open(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(Path(self.runs[int(event.option.id)]["dir"]))

    def action_delete(self) -> None:
        from core import runs

        run = self._highlighted()
        if run is None:
            return
        run_dir = Path(run["dir"])
        status = runs.run_status(run_dir)  # now, not when the list was filled
        if status["status"] == "running":
            self.say(f"run {run_dir.name} is running (pid {status['pid']}); nothing removed. Stop it first: "
                     f"ctrl+x in its live panel, or `snugtune stop {run_dir.name} --wait`", "error")
            return
        self.app.push_screen(
            ConfirmScreen(f"Delete run {run_dir.name} ({status['status']}, step {status['step']}/"
                          f"{status['total_steps'] or '?'}) and everything in {run_dir}?"),
            lambda yes: self._delete(run_dir) if yes else self.say("nothing removed"))

    def _delete(self, run_dir: Path) -> None:
        from core import runs
        from core.errors import UserError

        try:
            runs.remove_run(run_dir)  # refuses a run that started meanwhile
        except UserError as exc:
            self.say(str(exc), "error")
            return
        self.fill()
        self.say(f"removed {run_dir}", "ok")

    def action_close(self) -> None:
        self.dismiss(None)


class FilePickerScreen(ModalScreen[str | None]):
    """A file tree to pick a data file from (directories and data files only); backspace goes
    up a folder, above the one it opened in (issue 14: it could not)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("backspace", "parent", "Parent folder")]

    def __init__(self, root: str | Path, suffixes: set[str]):
        super().__init__()
        self.root, self.suffixes = Path(root), suffixes

    def compose(self) -> ComposeResult:
        from textual.widgets import DirectoryTree

        from tui.screens.data import data_suffix  # here: tui.screens.data imports this module

        suffixes = self.suffixes

        class DataTree(DirectoryTree):
            def filter_paths(self, paths):
                return [p for p in paths if not p.name.startswith(".")
                        and (p.is_dir() or data_suffix(p) in suffixes)]

        with Vertical(classes="dialog", id="picker"):
            yield Label(f"Pick a data file under {self.root}", classes="dialog-title", id="picker-title", markup=False)
            yield DataTree(self.root, id="tree")
            yield Static("Enter: open a folder / pick a file · Backspace: parent folder · Escape: cancel",
                         classes="hint")
        yield Footer()

    def action_parent(self) -> None:
        if self.root.parent == self.root:
            return  # at the file system's root
        self.root = self.root.parent
        self.query_one("#tree").path = self.root
        self.query_one("#picker-title", Label).update(f"Pick a data file under {self.root}")

    def on_directory_tree_file_selected(self, event) -> None:
        self.dismiss(str(event.path))

    def action_cancel(self) -> None:
        self.dismiss(None)


class CommandScreen(ModalScreen[None]):
    """The `snugtune train ...` line of the setup, selectable, and already on the clipboard."""

    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, command: str, note: str | None = None):
        super().__init__()
        self.command, self.note = command, note

    def compose(self) -> ComposeResult:
        from textual.widgets import TextArea

        with Vertical(classes="dialog", id="command-dialog"):
            yield Label("The same run from a shell", classes="dialog-title")
            yield TextArea(self.command, read_only=True, soft_wrap=True, show_line_numbers=False, id="command")
            if self.note:
                yield Static(self.note, classes="hint", markup=False)
            yield Static("Copied to the clipboard where the terminal allows it (OSC 52); or select it here "
                         "(shift+arrows, ctrl+c). Escape: close", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.app.copy_to_clipboard(self.command)
        focus_now(self.query_one("#command"))

    def action_close(self) -> None:
        self.dismiss(None)
