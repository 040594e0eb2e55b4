"""Deleting a run from the wizard (issue 14: only `snugtune runs rm` could): ctrl+l on the Train
or Done step lists every run; d asks before it deletes, and a running run is refused."""
from __future__ import annotations

import os

from textual.widgets import OptionList

from test_tui_helpers import demo_app, finished_run, wait_for, wizard_env  # noqa: F401

SIZE = (80, 24)


def running_run(base, name: str = "going"):
    """A run whose engine is alive: its pid file names this test's own process."""
    from core.presets import load_preset

    run_dir = base / name
    run_dir.mkdir(parents=True)
    load_preset("demo").write_toml(run_dir / "config.toml")
    (run_dir / "pid").write_text(f"{os.getpid()}\n")
    return run_dir


def said(app) -> str:
    return str(app.screen.query_one("#runlist-said").render())


def listed(app) -> list[str]:
    listing = app.screen.query_one("#runlist", OptionList)
    return [str(listing.get_option_at_index(i).prompt) for i in range(listing.option_count)]


async def open_list(pilot, app) -> None:
    from tui.screens.modals import RunListScreen
    from tui.screens.train import TrainScreen

    await pilot.press("ctrl+n")
    await wait_for(pilot, lambda: isinstance(app.screen, TrainScreen), what="the Train step")
    await pilot.press("ctrl+l")
    await wait_for(pilot, lambda: isinstance(app.screen, RunListScreen), what="the run list")


async def test_delete_asks_first_and_no_keeps_the_run(wizard_env):
    from tui.screens.modals import ConfirmScreen, RunListScreen

    old = finished_run(wizard_env["runs"], "older-run")
    new = finished_run(wizard_env["runs"], "newer-run")
    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_list(pilot, app)
        # newest first; these two started at the same second, so by name, the later name first
        assert [line.split()[0] for line in listed(app)] == ["older-run", "newer-run"]
        assert "finished  step 8/8" in listed(app)[0]
        first = "older-run"
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the question")
        assert f"Delete run {first} (finished, step 8/8)" in str(app.screen.query_one(".dialog-title").render())
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, RunListScreen), what="back on the list")
        assert old.is_dir() and new.is_dir() and "nothing removed" in said(app)
        # yes deletes that run, and only that one
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the question")
        await pilot.press("y")
        await wait_for(pilot, lambda: "removed" in said(app), what="the deletion said")
        assert not (wizard_env["runs"] / first).exists()
        assert [line.split()[0] for line in listed(app)] == ["newer-run"]
        assert sorted(p.name for p in wizard_env["runs"].iterdir()) == ["newer-run"]


async def test_a_running_run_is_refused_without_asking(wizard_env):
    from tui.screens.modals import RunListScreen

    going = running_run(wizard_env["runs"])
    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_list(pilot, app)
        assert listed(app)[0].startswith("going  running")
        await pilot.press("d")
        await wait_for(pilot, lambda: "is running" in said(app), what="the refusal")
        assert isinstance(app.screen, RunListScreen)  # no question asked
        assert "nothing removed" in said(app) and "snugtune stop going --wait" in said(app)
        assert (going / "config.toml").is_file()


async def test_deleting_the_run_on_show_leaves_the_train_step_fresh(wizard_env):
    from tui.screens.train import TrainScreen

    run = finished_run(wizard_env["runs"], "shown-run")
    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_list(pilot, app)
        await pilot.press("enter")  # open it in the live panel
        await wait_for(pilot, lambda: isinstance(app.screen, TrainScreen) and app.run_dir == run
                       and "finished" in str(app.screen.query_one("#run-title").render()), what="the run's panel")
        await pilot.press("ctrl+l", "d", "y")
        await wait_for(pilot, lambda: not run.exists(), what="the run deleted")
        await pilot.press("escape")
        # (the demo here plans for a gtx-1650, which this machine has not: "Planned for a card...")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainScreen) and app.screen.state == "ready"
                       and "Planned for a card" in str(app.screen.query_one("#run-title").render()),
                       what="a fresh Train step")
        assert app.run_dir is None and "shown-run" not in str(app.screen.query_one("#stats").render())
