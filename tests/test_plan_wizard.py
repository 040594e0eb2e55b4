"""The plan's budget rule in the wizard: a budget above the card's memory stays on the GPU step
with the one message the CLI prints (tests/test_plan.py has the CLI and the engine)."""
from __future__ import annotations

from textual.widgets import Input

from test_tui_helpers import status_text, wizard_env  # noqa: F401
from tui.app import SnugtuneApp
from tui.screens.gpu import GpuScreen


async def test_budget_above_the_card_stays_with_the_reason(wizard_env):
    app = SnugtuneApp(gpus=[], check_runs=False)
    async with app.run_test(size=(80, 24)) as pilot:
        app.set_value("gpu.profile", "gtx-1650")
        box = app.screen.query_one("#budget", Input)
        box.focus()
        box.value = "500"
        await pilot.pause()
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, GpuScreen)
        assert "more than" in status_text(app) and "3.82 GiB" in status_text(app)
        box = app.screen.query_one("#budget", Input)
        box.value = "3.5"
        await pilot.pause()
        await pilot.press("ctrl+n")
        assert not isinstance(app.screen, GpuScreen)
