"""What a second walk of the wizard as a new user (tmux, 80x24 and 120x40, also NO_COLOR=1)
still found after issue 14's fifteen items were fixed; one test per finding."""
from __future__ import annotations

import pytest
from textual.widgets import DataTable

from test_tui_helpers import wait_for, wizard_env  # noqa: F401
from tui.app import SnugtuneApp


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_model_names_cut_in_the_middle_stay_told_apart(wizard_env, size):
    """At 80 columns the two TinyLlama ids both read "TinyLlama/TinyLlama-1.1B-…": a name too long
    for its column now loses its middle, so each row keeps its owner and its variant."""
    from core import catalog
    from tui.screens.model import ModelScreen, spec_id

    app = SnugtuneApp(gpus=[], check_runs=False)
    async with app.run_test(size=size) as pilot:
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelScreen), what="the model step")
        table = app.screen.query_one("#models", DataTable)
        ids = [spec_id(s) for s in catalog.builtin_catalog()]

        def width_now() -> int:
            return next(c.width for c in table.columns.values() if str(c.key.value) == "model")

        def labels() -> list[str]:
            return [str(table.get_row_at(i)[0]) for i in range(table.row_count)]

        await wait_for(pilot, lambda: len(labels()) == len(ids) and all(
            len(label) <= width_now() for label in labels()), what="the names fitted to their column")
        shown = labels()
        assert len(set(shown)) == len(shown), shown  # no two rows read the same
        for full, label in zip([spec_id(s) for s in app.screen.specs], shown):
            if label != full:
                head, _, tail = label.partition("…")
                assert full.startswith(head) and full.endswith(tail) and len(label) == width_now()
        if size[0] >= 120:
            assert "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T" in shown  # room for it whole
        else:
            assert any("…" in label for label in shown)


async def test_the_off_box_is_drawn_empty_not_ticked(wizard_env):
    """ "▐X▌ ...: off" read as ticked: the X is now drawn only when the box is on."""
    from textual.app import App

    from tui.widgets.onoff import OnOff

    class One(App):
        def compose(self):
            yield OnOff("compare", value=False, id="box")

    app = One()
    async with app.run_test(size=(40, 3)) as pilot:
        box = app.query_one("#box", OnOff)

        def line() -> str:
            return box.render_line(0).text

        await wait_for(pilot, lambda: "compare: off" in line(), what="the box drawn")
        assert "▐ ▌" in line() and "X" not in line()
        await pilot.click("#box")
        await wait_for(pilot, lambda: "compare: on" in line(), what="the box ticked")
        assert "▐X▌" in line()


async def test_a_long_question_wraps_in_its_dialog(wizard_env):
    """At 80 columns "Delete run NAME (finished, step" was all of the question: the rest, with the
    directory that would go, was cut off."""
    from tui.screens.modals import ConfirmScreen

    app = SnugtuneApp(gpus=[], check_runs=False)
    question = ("Delete run python-docs-qa-20261201-140454 (finished, step 2/2) and everything in "
                "/home/someone/.local/share/snugtune/runs/python-docs-qa-20261201-140454?")
    async with app.run_test(size=(80, 24)) as pilot:
        app.push_screen(ConfirmScreen(question))
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen)
                       and app.screen.query_one(".dialog-title").size.height > 0, what="the question laid out")
        title = app.screen.query_one(".dialog-title")
        # inside its dialog (a Label is as wide as its text and the dialog cut it), every word shown
        assert title.region.right <= app.screen.query_one(".dialog").content_region.right
        shown = "".join(title.render_line(y).text.strip() for y in range(title.size.height))
        assert shown.replace(" ", "") == question.replace(" ", "")
