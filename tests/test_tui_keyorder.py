"""Keys in a burst wait for the focus move and the screen change the keys before them caused
(tui/keyorder.py's settle): the cause of the tmux walk's "6" for "256" under load (issue 14).

Textual delivers a widget's Focus event through that widget's own queue; an Input's handler
selects the whole value (select_on_focus). Under load the keys behind a Tab were handled before
it: the selection then landed on what they had typed, and the next key replaced it. Here the
field's queue is kept busy on purpose (callbacks that each yield once to the event loop), so
without the wait the Focus event lands after the burst every time, with no timing involved.
"""
from __future__ import annotations

import asyncio

from textual import events
from textual.widgets import Input

from test_tui_helpers import demo_app, wait_for, wizard_env  # noqa: F401

SIZE = (80, 24)


def burst(app, *keys: str) -> None:
    """All the keys queued before any is handled, as a terminal delivers a burst."""
    for k in keys:
        app.post_message(events.Key(k, k if len(k) == 1 else None))


async def test_keys_after_a_tab_wait_for_the_field_to_take_the_focus(wizard_env):
    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        alpha = app.screen.query_one("#lora-alpha", Input)
        assert alpha.value == "32" and app.focused is not alpha

        async def busy() -> None:
            await asyncio.sleep(0)

        for _ in range(2000):
            alpha.call_later(busy)
        burst(app, "tab", "end", "backspace", "backspace", "1", "2", "8")
        await wait_for(pilot, lambda: alpha.value == "128" and alpha.message_queue_size == 0, timeout=120,
                       what="128 in the alpha field, its queue empty")
        # the field's Focus handler ran before End, not over the typed text: nothing selected,
        # so the next key is added, not typed over "128"
        assert alpha.selection.is_empty
        burst(app, "4")
        await wait_for(pilot, lambda: alpha.value == "1284", timeout=120, what="1284 in the alpha field")


async def test_keys_behind_the_key_that_opens_a_dialog_land_in_the_dialog(wizard_env, monkeypatch):
    """A guard more than a fix: Textual awaits a pushed screen's mount before the App reads its
    next message, so this held before settle too; settle must not break it."""
    from core import presets

    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        # a loaded machine, made certain: an Input now takes many turns of the event loop to
        # mount, so the dialog opened by ctrl+s has no focused field yet when the keys behind
        # ctrl+s are read
        mount = Input._on_mount

        async def slow_mount(self, event) -> None:
            for _ in range(2000):
                await asyncio.sleep(0)
            mount(self, event)

        monkeypatch.setattr(Input, "_on_mount", slow_mount)
        # ctrl+s opens the name prompt (filled with "demo-mine", selected); the name typed behind
        # it in the same burst replaces that, and Enter saves
        burst(app, "ctrl+s", "m", "i", "n", "e", "enter")
        await wait_for(pilot, lambda: "mine" in {p.name for p in presets.list_presets()}, timeout=120,
                       what="a preset named 'mine'")
    assert (wizard_env["config"] / "presets" / "mine.toml").is_file()
