"""The snugtune wizard: six steps from "which GPU?" to a trained, tested, saved adapter.

The app holds the state the steps share (the configuration being built, the chosen GPU
and model, the run); each step is a screen in tui/screens/ that reads and writes it.
Nothing here imports the ML stack: estimates are pure Python from core, and anything
that needs torch or a tokenizer runs as a subprocess.
"""
from __future__ import annotations

import copy
import json
import importlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual.app import App
from textual.binding import Binding

from core.errors import UserError
from tui.screens.base import StepScreen, attr

if TYPE_CHECKING:
    from core.config import RunConfig

# core.config (pydantic) is imported where it is used, not here: without a preset the first
# step does not need it, and pydantic's import is a fifth of the wizard's start-up.

# Set by bench/tui_startup.py: exit as soon as the first step has been painted; if the value
# is a file path, the time of that first frame (time.time()) is written there first.
EXIT_AFTER_FIRST_FRAME = "SNUGTUNE_EXIT_AFTER_FIRST_FRAME"

# What a wizard started without a preset begins from. The model and data are chosen in
# steps 2 and 3; until then the configuration is incomplete and is not validated.
BLANK_CONFIG: dict[str, Any] = {"gpu": {"profile": "auto"}, "model": {"name_or_path": ""}, "data": {"path": ""}}


STEP_SCREENS = [("gpu", "GpuScreen"), ("model", "ModelScreen"), ("data", "DataScreen"),
                ("settings", "SettingsScreen"), ("train", "TrainScreen"), ("done", "DoneScreen")]


class SnugtuneApp(App[int]):
    """The wizard. `preset`: a loaded RunConfig to start from (jumps to Settings).
    `gpus`: the detected cards, or None to ask NVML (tests pass [] for a fixed screen).
    `attach`: a run directory to open the live panel on."""

    CSS_PATH = "wizard.tcss"
    TITLE = "snugtune"
    # The command palette's ctrl+p is not shown in the footer; every action has its own key.
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True),
                Binding("ctrl+c", "interrupt", show=False, priority=True)]

    def __init__(self, preset: RunConfig | None = None, *, preset_name: str | None = None,
                 gpus: list | None = None, attach: str | Path | None = None, check_runs: bool = True):
        super().__init__()
        self.cfg_data: dict[str, Any] = preset.to_dict() if preset is not None else copy.deepcopy(BLANK_CONFIG)
        self.preset_name = preset_name
        self.detected_gpus = gpus  # None: not asked yet
        self.gpu_error: str | None = None
        self._gpu_targets: dict[tuple, Any] = {}
        self.spec: Any = None  # core.catalog.ModelSpec of the chosen model
        self.data_report: dict | None = None  # the last `data inspect --json` report
        # reports by what they read (path, format, columns, model, length, template, file mtime):
        # coming back to the data step, or settings asking for lengths, reuses them (issue 14)
        self.data_cache: dict[tuple, dict] = {}
        self._data_reading: set[tuple] = set()
        self.data_reads = 0  # `data inspect` runs started (the tests count them)
        self.run_dir: Path | None = Path(attach) if attach else None
        self.last_estimate: Any = None
        self.run_result: dict | None = None  # the run_finished event of the run in step 5
        self.run_state: str | None = None  # the state step 5 last showed (ready, running, failed...)
        self.export_job: tuple | None = None  # (Popen, destination, log) of the done step's last export
        self.check_runs = check_runs and attach is None
        self.exit_after_first_frame = os.environ.get(EXIT_AFTER_FIRST_FRAME, "")
        self.step = 0
        if attach is not None:
            self.step = 4
        elif preset is not None:
            self.step = 3

    async def on_event(self, event) -> None:
        from textual import events

        if isinstance(event, events.Key) and not event.is_forwarded:
            # every key runs to the end before the next one starts (tui/keyorder.py says why)
            from tui.keyorder import handle_in_order

            await handle_in_order(self, event)
            return
        await super().on_event(event)

    # ---- the configuration ------------------------------------------------------------

    def config(self) -> RunConfig:
        """The configuration as it stands, validated (raises ConfigError with the field)."""
        from core.config import RunConfig

        return RunConfig.from_dict(self.cfg_data)

    def set_value(self, dotted: str, value: Any) -> None:
        """Set `section.key` in the configuration being built; None removes the key."""
        section, _, key = dotted.partition(".")
        node = self.cfg_data.setdefault(section, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value

    def get_value(self, dotted: str, default: Any = None) -> Any:
        section, _, key = dotted.partition(".")
        return self.cfg_data.get(section, {}).get(key, default)

    def estimate_config(self) -> RunConfig:
        """The configuration for estimates made before every step is filled in: a blank
        data path does not change the memory a model needs, so a stand-in fills it."""
        from core.config import RunConfig

        data = copy.deepcopy(self.cfg_data)
        if not data.get("data", {}).get("path"):
            data.setdefault("data", {})["path"] = "(not chosen yet)"
        if not data.get("model", {}).get("name_or_path"):
            data.setdefault("model", {})["name_or_path"] = (attr(self.spec, "id", default="(not chosen yet)")
                                                            if self.spec is not None else "(not chosen yet)")
        return RunConfig.from_dict(data)

    def gpu_target(self) -> Any:
        """The GPU to plan for (core.gpu.resolve_gpu), or None when that fails."""
        from core import gpu

        gpu_cfg = self.cfg_data.get("gpu", {})
        key = (gpu_cfg.get("profile", "auto"), gpu_cfg.get("vram_budget_gib"), gpu_cfg.get("device_index", 0))
        # 'auto' asks NVML each time (tens of ms on the UI thread): once per choice is enough
        if key not in self._gpu_targets:
            try:
                self._gpu_targets[key] = gpu.resolve_gpu(*key)
            except UserError:
                return None
        return self._gpu_targets[key]

    # ---- reading the data (one reader for the data and settings steps) -------------------

    def data_key(self, path: str, fmt: str, columns: dict[str, str]) -> tuple:
        import json

        try:
            p = Path(path).expanduser()
            # a directory of data files: each file's version (editing one changes no folder mtime)
            files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
            stamp: tuple | None = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
        except OSError:
            stamp = None  # a Hub dataset or builtin: data: the name is the version
        return (path, fmt, json.dumps(columns, sort_keys=True), self.get_value("model.name_or_path"),
                self.get_value("data.max_seq_len"), self.get_value("data.template"), stamp)

    def action_interrupt(self) -> None:
        """Ctrl-C: copies a selected text in a box, as Textual does; otherwise says how to quit. Inside
        a text box (where the cursor is on most steps) it did nothing at all before: the box took it
        as a copy of nothing, and Textual's own reminder shows only where no box has the focus."""
        focused = self.focused
        selection = getattr(focused, "selection", None)
        note = interrupt_note(self)
        if selection is not None and not getattr(selection, "is_empty", True) and hasattr(focused, "action_copy"):
            # a field selects its whole value when it gets the focus, so this is the usual case: the
            # copy is made, and said, with how to quit (a user who meant "quit" is told how)
            focused.action_copy()
            note = "copied the selected text · " + note
        if hasattr(self.screen, "set_status") and self.screen.query("#status"):
            self.screen.set_status(note, "warning")
        else:
            self.notify(note, title="Ctrl-C")

    def read_data(self, path: str, fmt: str, columns: dict[str, str]) -> tuple[tuple, dict | None]:
        """(key, the cached report) or (key, None) with a read started or already going; the
        answer comes as a DataInspected message to the screen on show. The read belongs to the
        App, not to a step, so moving between steps does not kill and restart it."""
        key = self.data_key(path, fmt, columns)
        if key in self.data_cache:
            self.data_report = self.data_cache[key]
            return key, self.data_report
        if key not in self._data_reading:
            self._data_reading.add(key)
            self.data_reads += 1
            self.run_worker(lambda: self._read_data(key, path, fmt, columns), thread=True, exit_on_error=False,
                            name="data preview", group="data")
        return key, None

    def _read_data(self, key: tuple, path: str, fmt: str, columns: dict[str, str]) -> None:
        from tui.screens.data import inspect_data

        try:
            report, error = inspect_data(self, path, fmt, columns)
        except Exception as exc:  # noqa: BLE001 - said on screen; the next ask reads again
            report, error = None, f"reading the data failed: {exc}"
        self.call_from_thread(self._data_read, key, path, report, error)

    def _data_read(self, key: tuple, path: str, report: dict | None, error: str | None) -> None:
        from tui.messages import DataInspected

        self._data_reading.discard(key)
        if report is None and error is None:
            return  # cancelled (the wizard is quitting)
        if report is not None:
            self.data_cache[key] = report
        # the screen on show takes it (and sets data_report) when the message arrives
        self.screen.post_message(DataInspected(path, report=report, error=error, key=key))

    # ---- moving between steps ---------------------------------------------------------

    def on_mount(self) -> None:
        self.goto(self.step)
        if self.check_runs:
            self.offer_running_runs()

    def make_screen(self, step: int) -> StepScreen:
        # one module per step, imported when first shown: the first frame waits for one only
        module, name = STEP_SCREENS[step]
        return getattr(importlib.import_module(f"tui.screens.{module}"), name)()

    def goto(self, step: int) -> None:
        self.step = step
        screen = self.make_screen(step)
        if isinstance(self.screen, StepScreen):
            self.switch_screen(screen)
        else:
            self.push_screen(screen)

    def first_frame_painted(self) -> None:
        """Called by the first step after its first refresh (bench/tui_startup.py)."""
        target = self.exit_after_first_frame
        if not target:
            return
        self.exit_after_first_frame = ""
        if target != "1":
            Path(target).write_text(f"{time.time():.6f}\n")
        self.exit(0)

    def action_next_step(self) -> None:
        screen = self.screen
        if not isinstance(screen, StepScreen) or self.step >= 5:
            return
        screen.save_state()
        problem = screen.leave_problem()
        if problem:
            screen.set_status(problem, "error")
            return
        self.goto(self.step + 1)

    def action_prev_step(self) -> None:
        screen = self.screen
        if not isinstance(screen, StepScreen) or self.step <= 0:
            return
        screen.save_state()
        self.goto(self.step - 1)

    # ---- the equivalent command ------------------------------------------------------

    def _step_config(self, refused: str):
        """The setup as a RunConfig, from a step screen's current values; None (and the reason in
        the step's status line, after `refused`) where there is no step or the setup is invalid."""
        screen = self.screen
        if not isinstance(screen, StepScreen):
            return None
        screen.save_state()
        try:
            return self.config()
        except UserError as exc:
            screen.set_status(f"{refused}: {exc}", "error")
            return None

    def action_show_command(self) -> None:
        from tui.command import train_command
        from tui.screens.modals import CommandScreen

        cfg = self._step_config("no command yet")
        if cfg is None:
            return
        line, note = train_command(cfg.to_dict(), self.preset_name)
        self.push_screen(CommandScreen(line, note))

    # ---- presets ----------------------------------------------------------------------

    def action_save_preset(self) -> None:
        from tui.screens.modals import PromptScreen

        cfg = self._step_config("cannot save yet")
        if cfg is None:
            return
        suggested = self.preset_name or ""
        if suggested in self._preset_names("builtin"):
            suggested += "-mine"  # a built-in's own name would be refused
        self.push_screen(
            PromptScreen("Save this setup as a preset", "preset name (letters, digits, - _)",
                         value=suggested),
            lambda name: self._save_preset(cfg, name) if name else None,
        )

    def _save_preset(self, cfg: RunConfig, name: str, overwrite: bool = False) -> None:
        from core import presets
        from tui.screens.modals import ConfirmScreen

        screen = self.screen
        if name in self._preset_names("builtin"):
            # refused, not asked: `snugtune --preset demo` must keep meaning the shipped demo
            screen.set_status(f"{name!r} is a built-in preset's name and stays as shipped; "
                              f"save under another name (e.g. {name}-mine) with ctrl+s", "error")
            return
        if not overwrite and name in self._preset_names("user"):
            self.push_screen(
                ConfirmScreen(f"A preset named {name!r} exists. Overwrite it?"),
                lambda yes: self._save_preset(cfg, name, overwrite=True) if yes else screen.set_status("not saved", "warning"),
            )
            return
        try:
            path = presets.save_preset(saved_description(cfg), name, overwrite=overwrite)
        except UserError as exc:
            screen.set_status(str(exc), "error")
            return
        self.preset_name = name
        screen.set_status(f"saved preset {name!r} ({path}); open it with: snugtune --preset {name}", "ok")

    def _preset_names(self, source: str) -> set[str]:
        from core import presets

        return {attr(p, "name") for p in presets.list_presets() if attr(p, "source", default="user") == source}

    # ---- every run: open one, delete one (issue 14: only the CLI could delete) ------------

    def action_runs(self) -> None:
        from tui.screens.modals import RunListScreen

        self.push_screen(RunListScreen(), self._run_picked)

    def _run_picked(self, run_dir: Path | None) -> None:
        from core.runs import CONFIG_FILE

        if self.run_dir is not None and not (self.run_dir / CONFIG_FILE).is_file():
            # the run on the Train or Done step was deleted: those steps start afresh
            self.run_dir, self.run_result, self.run_state = None, None, None
            if run_dir is None and self.step >= 4:
                self.goto(4)
        if run_dir is not None:
            self._attach(run_dir)

    # ---- runs still going -------------------------------------------------------------

    def offer_running_runs(self) -> None:
        from core import runs
        from tui.screens.modals import RunsScreen

        try:
            going = [r for r in runs.list_runs() if _is_running(r)]
        except UserError:
            return
        if going:
            self.push_screen(RunsScreen(going), self._attach)

    def _attach(self, run_dir: Path | None) -> None:
        if run_dir is None:
            return
        from core.config import RunConfig

        self.run_dir = Path(run_dir)
        try:
            cfg = RunConfig.from_toml(self.run_dir / "config.toml")
            self.cfg_data = cfg.to_dict()
        except UserError:
            pass
        self.goto(4)


def _is_running(run: Any) -> bool:
    status = attr(run, "status", "state", default="")
    return str(status).lower() in {"running", "starting", "training"}


def saved_description(cfg: RunConfig) -> RunConfig:
    """The setup as the user saves it, described by what it is. The description came along from
    the preset it started from, so a preset saved from the demo with the user's own data and
    model was listed by `snugtune presets` as "Offline demo: a tiny local model learns ..."."""
    from core.presets import list_presets

    shipped = {getattr(p, "description", None) for p in list_presets() if getattr(p, "source", "") == "builtin"}
    if cfg.description and cfg.description not in shipped:
        return cfg  # the user's own words (a preset of theirs, saved again)
    d, m = cfg.data, cfg.model
    text = (f"{m.name_or_path} on {Path(d.path).name if d.path else '?'}: LoRA r={cfg.lora.r}, "
            f"{d.max_seq_len:,} tokens (saved from the wizard)")
    return cfg.with_overrides([f"description={json.dumps(text)}"])


def run_wizard(preset: str | None = None) -> int:
    """Open the wizard (`snugtune`, `snugtune --preset NAME`); returns the exit code.
    A preset that cannot be loaded raises UserError before the screen opens."""
    cfg = None
    if preset:
        from core.presets import load_preset

        cfg = load_preset(preset)
    app = SnugtuneApp(cfg, preset_name=Path(preset).stem if preset else None)
    app.run()
    print_still_running(app)
    return app.return_code or 0


def interrupt_note(app) -> str:
    """What Ctrl-C says: how to quit, and that a run goes on training after it."""
    running = getattr(app, "run_dir", None) is not None and getattr(app, "run_state", None) in ("starting", "running")
    return ("ctrl+q quits (ctrl+c copies a selected text)" +
            ("; the run keeps training: ctrl+x stops it" if running else ""))


def still_running_note(app: SnugtuneApp) -> str | None:
    """What to tell a user who quits while the run trains on, or an export is being written:
    where it is and how to reach it (the wizard's screen is gone, and work that goes on unseen
    reads as lost)."""
    notes = []
    job = getattr(app, "export_job", None)
    if job is not None and job[0].poll() is None:
        notes.append(f"an export to {job[1]} is still being written; it finishes on its own (log: {job[2]})")
    run_dir = getattr(app, "run_dir", None)
    if run_dir is not None and getattr(app, "run_state", None) in ("starting", "running"):
        try:
            from core.runs import run_status

            running = run_status(Path(run_dir)).get("status") == "running"
        except Exception:  # noqa: BLE001 - an unreadable run directory: say nothing rather than fail on exit
            running = False
        if running:
            name = Path(run_dir).name
            notes.insert(0, f"{name} keeps training in the background ({run_dir}).\n"
                         f"  watch it:  snugtune attach {name}\n  stop it:   snugtune stop {name}")
    return "\n".join(notes) or None


def print_still_running(app: SnugtuneApp) -> None:
    note = still_running_note(app)
    if note:
        print(note, file=sys.stderr)


def run_attach(run_dir: str | Path) -> int:
    """Open the live panel on a run (`snugtune attach RUN`); returns the exit code."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.toml)", hint="see `snugtune runs` for the runs there are")
    from core.config import RunConfig

    cfg = RunConfig.from_toml(run_dir / "config.toml")
    app = SnugtuneApp(cfg, attach=run_dir)
    app.run()
    print_still_running(app)
    return app.return_code or 0
