"""Keys handled in the order they were typed, however fast they come.

Why this exists: Textual hands a key to the focused widget's message queue and, when the widget
does not consume it, lets it bubble up through each parent's queue to the App, where the
bindings (End, Backspace, Tab, ...) finally run. A printable key is consumed at once by an
Input; a bound key takes that detour. Keys arriving together (typed over a slow SSH link,
pasted by tmux, sent by a script) are therefore applied out of order: `End BSpace BSpace 6 4`
on "16" inserts 6 and 4 over the selected text first, then runs End, Backspace, Backspace,
and leaves the field empty (issue 14, item 4; Textual 8.2).

The fix walks the focus chain for each key inside the App's own handler, one key after the
other: the focused widget, its parents, the screen, then the App's bindings, exactly the
stations and checks of Textual's own bubbling, but finished before the next key is looked at.
"""
from __future__ import annotations

from textual import events
from textual.app import App


class Key(events.Key, bubble=False):
    """A key the App walks up the focus chain itself (handler name stays `on_key`)."""


async def handle_in_order(app: App, event: events.Key) -> None:
    """Deliver a key from the terminal to the focus chain and the bindings, completely."""
    if not app.app_focus:
        app.app_focus = True
    screen = app.screen
    if screen.maximized is not None and event.key == "escape" and app.escape_to_minimize:
        screen.minimize()
        return
    if app.focused is not None:
        try:
            screen._clear_tooltip()
        except Exception:  # noqa: BLE001 - no screen yet: nothing to clear
            pass
    # priority bindings first, from the App down (ctrl+q, ctrl+n, ...), as Textual does
    if await app._check_bindings(event.key, priority=True):
        return
    key = Key(event.key, event.character)
    key._set_forwarded()
    node = app.focused or screen
    while node is not None and node is not app:
        if node.is_attached and node.check_message_enabled(key):
            key._no_default_action = False  # as Message._bubble_to does at each station
            with node._context():
                await node._dispatch_message(key)
            if key._stop_propagation:
                return
        node = node._parent
    # nobody stopped it: the bindings of the focus chain and the App's key_ methods
    await app._dispatch_message(key)
