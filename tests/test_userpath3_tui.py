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
