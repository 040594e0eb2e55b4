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

That alone still lost keys in a real terminal under load (tmux, one `send-keys` burst per step,
two busy CPU cores): Tab moves the focus at once, but the Input's own Focus handler, which
selects the whole value (`select_on_focus`), waits in that Input's message queue. Keys handled
here before it ran (End, Backspace x4, "2", "5") were then selected over, and "6" replaced them:
the sequence length read "6" instead of "256". A new screen is the same: its mount and its
first focus wait in its own queue while the keys behind the ctrl+n that opened it are read.

So before each key, `settle` waits until the screen on show and the focused widget have
handled everything already queued for them (a callback posted behind their messages runs last
in their FIFO queues), and again while that moved the focus or changed the screen. A key is
then handled exactly as if it had been typed after the screen had caught up, however fast keys
come and however slow the machine is. Focus set by the screens themselves goes through
`focus_now` (the screen's own set_focus, at once), not Widget.focus(), which queues the move
on the App: behind keys already waiting there.
"""
from __future__ import annotations

import asyncio

from textual import events
from textual.app import App
from textual.message_pump import MessagePump
from textual.widget import Widget

# How long one queue may take to reach the callback before the key goes ahead anyway. Not a
# pace: a queue answers in micro- to milliseconds even on a loaded machine; this only keeps a
# widget that never processes its queue (removed before it started) from holding keys forever.
STALL_S = 5.0
ROUNDS = 8  # a focus move that triggers another, and so on: more than any screen here needs


class Key(events.Key, bubble=False):
    """A key the App walks up the focus chain itself (handler name stays `on_key`)."""


def focus_now(widget: Widget) -> None:
    """Focus `widget` on its screen now (Widget.focus() would queue it behind waiting keys)."""
    widget.screen.set_focus(widget)

    # An Input's Focus handler puts the terminal cursor in it from its place on screen, which a
    # screen still mounting has not got yet (the cursor stayed in the corner, where a screen
    # reader or tmux looks for the field): once the screen is laid out, put it there again.
    def place_cursor() -> None:
        if widget.has_focus and hasattr(widget, "cursor_screen_offset"):
            widget.app.cursor_position = widget.cursor_screen_offset
            widget.refresh()

    widget.call_after_refresh(place_cursor)


async def _caught_up(pump: MessagePump) -> bool:
    """Wait until `pump` has handled everything queued for it; True if something was queued."""
    if pump._closing or pump._closed:
        return False
    queued = pump.message_queue_size > 0
    done = asyncio.Event()
    if not pump.call_later(done.set):
        return False
    try:
        await asyncio.wait_for(done.wait(), STALL_S)
    except asyncio.TimeoutError:
        pass
    return queued


async def _refreshed(screen) -> bool:
    done = asyncio.Event()
    if not screen.call_after_refresh(done.set):
        return False
    try:
        await asyncio.wait_for(done.wait(), STALL_S)
    except asyncio.TimeoutError:
        pass
    return True


async def settle(app: App) -> None:
    """Wait until the screen on show and the focus chain have handled what is queued for them.

    The focused widget first, then each parent up to the screen: a message a widget posts
    while it catches up (Input.Changed) bubbles up that way, so it is caught in the same round.
    Another round follows while a queue had work in it or the focus or the screen changed."""
    for _ in range(ROUNDS):
        try:
            screen = app.screen
        except Exception:  # noqa: BLE001 - no screen yet (start-up): nothing to wait for
            return
        focused = screen.focused
        chain: list[MessagePump] = []
        node = focused
        while node is not None and node is not screen and node is not app:
            chain.append(node)
            node = node._parent
        chain.append(screen)
        busy = False
        for pump in chain:
            busy = await _caught_up(pump) or busy
        if getattr(screen, "_layout_required", False) and screen.is_current:
            # Tab follows the laid-out order (Screen.focus_chain sorts by region): a screen
            # mounted or changed but not yet laid out would send it by the order of the tree
            busy = await _refreshed(screen) or busy
        if not busy and app.screen is screen and screen.focused is focused:
            return


async def handle_in_order(app: App, event: events.Key) -> None:
    """Deliver a key from the terminal to the focus chain and the bindings, completely."""
    await settle(app)
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
