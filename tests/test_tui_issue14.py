"""Issue 14: the wizard as a new user walks it. One test (or a few) per item, Pilot at 80x24
unless the item is about another size."""
from __future__ import annotations

import pytest
from textual import events
from textual.widgets import DataTable, Input, Label, Static

from test_tui_helpers import (QA_ROWS, demo_app, finished_run, status_text, wait_for, wizard_env,  # noqa: F401
                              write_jsonl)
from tui.app import SnugtuneApp

SIZE = (80, 24)


def burst(app, *keys: str) -> None:
    """Post keys the way a terminal delivers a burst: all queued before any is handled
    (Pilot.press waits for each key, which hides reordering)."""
    for k in keys:
        char = k if len(k) == 1 else None
        app.post_message(events.Key(k, char))


# ---- item 4: keys typed in a burst are applied in order ---------------------------------------

async def test_burst_of_keys_in_a_settings_field_is_applied_in_order(wizard_env):
    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        field = app.screen.query_one("#lora-r", Input)
        assert app.focused is field and field.value == "16"
        burst(app, "end", "backspace", "backspace", "6", "4")
        await wait_for(pilot, lambda: app.screen.query_one("#lora-r", Input).value == "64", timeout=10,
                       what="64 in the field")
        # and moving on with Tab in the same burst types into the next field
        burst(app, "tab", "end", "backspace", "backspace", "1", "2", "8")
        await wait_for(pilot, lambda: app.screen.query_one("#lora-alpha", Input).value == "128", timeout=10,
                       what="128 in the alpha field")
        assert field.value == "64"


# ---- item 1: a built-in preset's name is refused --------------------------------------------

async def test_saving_under_a_builtin_name_is_refused_and_names_it(wizard_env):
    from core import presets
    from tui.screens.modals import PromptScreen

    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, PromptScreen)
        app.screen.query_one("#prompt", Input).value = "demo"
        await pilot.press("enter")
        assert "'demo' is a built-in preset" in status_text(app)
        assert not (wizard_env["config"] / "presets" / "demo.toml").exists()
    assert [p.source for p in presets.list_presets() if p.name == "demo"] == ["builtin"]


# ---- item 3: a huge plain-recipe figure does not blank the bar ------------------------------

async def test_memory_bar_keeps_its_scale_beside_a_huge_plain_total(wizard_env):
    from test_tui_helpers import fixed_estimate, pin_estimate

    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await pin_estimate(pilot, app)
        est, plain = fixed_estimate("fits", 2.6)
        plain.total_gib = 48462.0
        app.screen.render_estimate(est, plain, 0.8, app.estimate_config())
        await pilot.pause()
        first = str(app.screen.query_one("#vram").render()).splitlines()[0]
        filled = sum(first.count(c) for c in "█▓▒░▞▚■▪▄▀")
        assert filled > len(first) // 2  # 2.6 of 3.82 GiB: most of the bar, not blank
        assert "48,462 GiB" in str(app.screen.query_one("#totals").render())
        # a run's own total far past the budget is drawn cut, and says so in words
        est.total_gib = 500.0
        app.screen.render_estimate(est, plain, 0.8, app.estimate_config())
        await pilot.pause()
        bar = str(app.screen.query_one("#vram").render())
        assert "bar cut at 3x the budget: 500 GiB" in bar and "┃" in bar.splitlines()[0]


# ---- item 5 (and the gated badge): the model table uses the width it has --------------------

def table_lines(table) -> list[str]:
    return [table.render_line(y).text for y in range(table.size.height)]


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_model_table_shows_whole_badges_and_uses_the_width(wizard_env, size):
    from tui.screens.model import ModelScreen

    app = SnugtuneApp(gpus=[], check_runs=False)
    async with app.run_test(size=size) as pilot:
        choices = app.screen.query_one("#choices")
        ids = [choices.get_option_at_index(i).id for i in range(choices.option_count)]
        choices.highlighted = ids.index("profile:gtx-1650")  # 4 GB: some models are too big
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, ModelScreen)
        table = app.screen.query_one("#models", DataTable)
        await pilot.pause()
        await pilot.pause()
        lines = table_lines(table)
        assert lines[0].split() == ["model", "params", "fit", "access"]
        rows = [ln for ln in lines[1:] if ln.strip()]
        assert any("too big" in ln for ln in rows), lines
        assert all(ln.rstrip().endswith(("fits", "tight", "too big", "gated", "?")) for ln in rows)
        assert any("gated" in ln and "meta-llama/Llama-3.2-1B" in ln for ln in rows)
        cells = {str(table.get_row_at(i)[0]): table.get_row_at(i) for i in range(table.row_count)}
        assert cells["builtin:tiny-llama"][1] == "3.5M" and cells["google/gemma-3-1b-pt"][1] == "1.0B"
        if size[0] >= 120:
            # room for the longest catalog id, whole
            await pilot.press("end")
            everything = "\n".join(table_lines(table))
            assert "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T" in everything


# ---- item 6: the filter matches `builtin:` (and owner/ prefixes) ---------------------------

async def test_catalog_filter_matches_builtin_prefix_and_enter_takes_the_row(wizard_env):
    app = SnugtuneApp(gpus=[], check_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        await pilot.press(*"builtin:")
        table = app.screen.query_one("#models", DataTable)
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == ["builtin:tiny-llama"]
        assert "matching 'builtin:'" in status_text(app)
        await pilot.press("ctrl+u", *"meta-llama/")
        assert table.row_count == 4
        await pilot.press("down", "enter")
        assert app.get_value("model.name_or_path") == "meta-llama/Llama-3.2-1B-Instruct"
