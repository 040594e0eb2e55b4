"""The wizard's data step at 80x24 (round 3, items 2 and 3). Before: a sample line wider than the
preview box was wrapped by Rich with no gutter on its continued lines, so under NO_COLOR (no dim)
the rest of a masked prompt line read like trained text; and the Columns box shared a row with
Format, 26 cells at 80 columns, so a detected mapping (instruction=instruction, input=input,
output=output) was cut after its first field. Now every visual line starts with its `·` / `▌`
gutter, wrapped at the box's width (again on resize), and Columns has a row of its own."""
from __future__ import annotations

import pytest
from rich.cells import cell_len
from textual.widgets import Input

from test_tui_helpers import demo_app, wait_for, wizard_env, write_jsonl  # noqa: F401

LONG_Q = ("Which Python standard-library function or class matches this description, given in the "
          "module's own words: decode the Ascii85 encoded bytes-like object or ASCII string b?")
LONG_A = "It is base64.a85decode, which decodes Ascii85 data; b85decode is the one for base85 " * 2
ROWS = [{"instruction": LONG_Q, "input": "a note", "output": LONG_A.strip()},
        {"instruction": "Short?", "input": "", "output": "Yes."}]


def _lines(view) -> list[str]:
    return str(view.render()).split("\n")


def _check_gutters(view) -> None:
    width = view.content_region.width
    body = [ln for ln in _lines(view) if ln.strip() and not ln.startswith(("── sample", "  ["))]
    assert body, _lines(view)
    for line in body:
        assert line.startswith(("· ", "▌ ")), (line, _lines(view))
        assert cell_len(line) <= width, (line, width)


@pytest.mark.parametrize("no_color", [True, False])
async def test_every_wrapped_line_keeps_its_gutter_and_columns_is_whole(wizard_env, tiny_tokenizer, monkeypatch,
                                                                        no_color):
    from core.config import DataConfig
    from core.data import inspect
    from tui.screens.data import DataScreen, SamplesView

    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    data = write_jsonl(wizard_env["tmp"] / "long.jsonl", ROWS)
    report = inspect(DataConfig(path=str(data)), tiny_tokenizer)
    app = demo_app("rtx-3060-12gb", [f"data.path='{data}'"])
    app.data_report = report  # the preview as `data inspect --json` gives it, read already
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+b")
        await wait_for(pilot, lambda: isinstance(app.screen, DataScreen), what="the data step")
        view = app.screen.query_one("#samples", SamplesView)
        await wait_for(pilot, lambda: "── sample 1" in str(view.render()) and view.content_region.width > 0,
                       what="the samples")
        _check_gutters(view)
        lines = _lines(view)
        # the long question is a masked line wrapped over several visual lines, each marked masked
        q = [ln for ln in lines if ln.startswith("· ") and any(w in ln for w in ("Which", "module's", "Ascii85"))]
        assert len(q) >= 3, lines
        a = [ln for ln in lines if ln.startswith("▌ ")]
        assert len(a) >= 3, lines  # the long answer: every visual line marked trained
        # the Columns box holds the detected mapping whole, on its own row
        columns = app.screen.query_one("#columns", Input)
        assert columns.placeholder == "instruction=instruction, input=input, output=output"
        assert columns.content_region.width >= cell_len(columns.placeholder)
        assert columns.region.y != app.screen.query_one("#format").region.y
        # a wider terminal wraps again at the new width
        before = len(lines)
        await pilot.resize_terminal(140, 30)
        await wait_for(pilot, lambda: len(_lines(view)) < before, what="the samples rewrapped")
        _check_gutters(view)
