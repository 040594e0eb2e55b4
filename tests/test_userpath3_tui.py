"""The wizard, round 3: what a third walk in tmux at 80x24 found. Each test failed before its fix."""
from __future__ import annotations

from textual.widgets import Input

from test_tui_helpers import QA_ROWS, demo_app, status_text, wait_for, wizard_env, write_jsonl  # noqa: F401


async def test_ctrl_c_in_a_text_box_says_how_to_quit_and_still_copies_a_selection(wizard_env, tiny_tokenizer):
    # before: the focused box took Ctrl-C as "copy" (of nothing, or of the value it selects when it
    # gets the focus) and the screen said nothing at all
    from core.config import DataConfig
    from core.data import inspect
    from tui.screens.data import DataScreen

    data = write_jsonl(wizard_env["tmp"] / "qa.jsonl", QA_ROWS)
    app = demo_app("rtx-3060-12gb", [f"data.path='{data}'"])
    app.data_report = inspect(DataConfig(path=str(data)), tiny_tokenizer)  # read already: nothing pending
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+b")  # the data step: nothing else writes its status line meanwhile
        await wait_for(pilot, lambda: isinstance(app.screen, DataScreen) and isinstance(app.focused, Input),
                       what="the data step's path box")
        box = app.focused
        box.selection = type(box.selection).cursor(0)  # nothing selected
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: "ctrl+q quits" in status_text(app), what="the note")
        assert app.is_running  # Ctrl-C does not quit (a run may be training): it says how
        assert "copied" not in status_text(app)
        # with text selected (a field selects its value when it gets the focus), it copies, and says both
        box.selection = type(box.selection)(0, len(box.value))
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: app.clipboard == box.value, what="the copy")
        assert "copied the selected text" in status_text(app) and "ctrl+q quits" in status_text(app)


async def test_a_run_stopped_while_it_set_up_is_said_as_nothing_lost(wizard_env):
    # before: "stopped at step 0 (checkpoint: none) · ctrl+r resumes", which read as work lost
    from core.presets import load_preset
    from test_tui_helpers import write_events
    from tui.app import SnugtuneApp

    run_dir = wizard_env["runs"] / "setup-stop"
    run_dir.mkdir()
    cfg = load_preset("demo").with_overrides(["gpu.profile='gtx-1650'"])
    cfg.write_toml(run_dir / "config.toml")
    write_events(run_dir, [{"event": "setup_progress", "message": "loading the model"},
                           {"event": "run_stopped", "step": 0, "checkpoint": None}])
    (run_dir / "pid").write_text("999999999\n")  # no such process: the run is over
    app = SnugtuneApp(cfg, attach=run_dir, gpus=[], check_runs=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "stopped before training started" in status_text(app), what="the stop")
        assert "nothing lost" in status_text(app) and "checkpoint: none" not in status_text(app)
