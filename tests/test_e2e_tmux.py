"""The wizard in a real terminal: tmux at 80x24 runs `python -m tui.cli --preset demo`, and
keys sent to it walk to a finished demo run with an adapter on disk, a chat and an export.

Deterministic by construction: no key is sent before the screen shows that the previous one
arrived. Focus is read from the terminal's cursor (Textual puts the hardware cursor in the
focused input) and the label on its row; every typed character is waited for in the field
before the next one is sent. Every wait polls the pane for a condition and gives up only after
a generous deadline (minutes: a loaded 2-core CI machine is slow, and a passing run does not
wait for the deadline). The chat answers at most 8 tokens (SNUGTUNE_CHAT_MAX_NEW_TOKENS).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]

ROOT = Path(__file__).resolve().parent.parent
# Deadlines, not durations: on the development machine (2 cores shared with 5 other test
# suites, load average 5-6) the wizard paints in ~1 s, the engine starts in ~20 s, a 2-step run
# with its final evaluation takes ~15 s, chat and export ~20 s each. The limits are 10-50x that.
KEY_LIMIT_S = 60  # one keystroke's effect on screen
SCREEN_LIMIT_S = 120  # a screen change (the wizard's first frame, the next step)
ENGINE_LIMIT_S = 600  # importing torch, building the demo model on a cold cache, training 2 steps
CHAT_LIMIT_S = 600  # the chat process loading the model and answering; export likewise
POLL_S = 0.1


# A tmux server of the test's own (-L): nothing another test or user does to the default
# server (a kill-server, a session of the same name) reaches this one.
SOCKET = f"snugtune-e2e-{uuid.uuid4().hex[:8]}"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True, check=False).stdout


def screen(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session)


def cursor(session: str) -> tuple[int, int]:
    x, _, y = tmux("display", "-p", "-t", session, "#{cursor_x},#{cursor_y}").strip().partition(",")
    return (int(x), int(y)) if x.isdigit() and y.isdigit() else (-1, -1)


def wait_for(what: str, check: Callable[[], object], session: str, limit: float):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(POLL_S)
    raise AssertionError(f"{what} did not happen within {limit:.0f}s; the screen shows:\n{screen(session)}")


def wait_screen(session: str, text: str, limit: float = SCREEN_LIMIT_S) -> str:
    wait_for(f"{text!r} on screen", lambda: text in screen(session), session, limit)
    return screen(session)


def send(session: str, key: str, literal: bool = False) -> None:
    tmux("send-keys", "-t", session, *(["-l"] if literal else []), key)


# The settings step's inputs from the top, in focus order (labels as painted).
SETTINGS_FIELDS = ("LoRA rank", "LoRA alpha", "LoRA dropout", "LoRA targets", "Sequence len", "Micro-batch",
                   "Grad accum", "Epochs", "Max steps", "Learning rate")


def _focused_now(session: str) -> Optional[tuple[str, str]]:
    """(label, value) of the focused settings input, read where the terminal cursor is.

    Textual puts the terminal cursor in the focused input, right after its text. While focus
    moves, the cursor and the scrolled form are briefly out of step (the cursor on the footer,
    or on a row that scrolls away), so a reading counts only when the cursor sits exactly where
    an input on its row would put it: at the end of the value after the label (or at its start
    when the input is empty and shows a placeholder). Only the fields above "Max steps" are
    ever crossed, all of them inputs (a focused select or checkbox leaves the cursor behind)."""
    x, y = cursor(session)
    rows = screen(session).split("\n")
    if not 0 <= y < len(rows):
        return None
    row = rows[y].split("│")[0]
    for label in SETTINGS_FIELDS:
        if row[1:].startswith(label + " "):
            rest = row[1 + len(label):]
            col = 1 + len(label) + (len(rest) - len(rest.lstrip()))
            value = rest.strip().split("  ")[0]
            # Textual 8 reports the cursor one column after the text's end; 0 allows for a change
            if x - (col + len(value)) in (0, 1):
                return label, value
            if x - col in (0, 1):
                return label, ""  # empty: the placeholder is painted after the cursor
    return None


def settled(session: str) -> tuple[str, tuple[int, int]]:
    """The screen and cursor, once two readings a poll apart agree."""
    def same_twice():
        first = (screen(session), cursor(session))
        time.sleep(POLL_S)
        return first if (screen(session), cursor(session)) == first else None

    return wait_for("the screen to settle", same_twice, session, KEY_LIMIT_S)


def focused(session: str) -> Optional[tuple[str, str]]:
    settled(session)
    return _focused_now(session)


def press(session: str, key: str) -> None:
    """Send one key and wait until the screen or the cursor shows that it was taken."""
    before = (screen(session), cursor(session))
    send(session, key)
    wait_for(f"the effect of {key}", lambda: (screen(session), cursor(session)) != before, session, KEY_LIMIT_S)


def focus_field(session: str, label: str) -> None:
    """Move the focus to the input `label` with Tab / Shift-Tab, one key per observed effect.

    A reading that cannot be taken (the cursor left behind by a scroll) continues in the same
    direction; a reading past the field turns back, so a missed reading never loses the way."""
    target = SETTINGS_FIELDS.index(label)
    key = "Tab"
    for _ in range(4 * len(SETTINGS_FIELDS)):
        now = focused(session)
        if now is not None:
            if now[0] == label:
                return
            key = "Tab" if SETTINGS_FIELDS.index(now[0]) < target else "BTab"
        press(session, key)
    raise AssertionError(f"Tab did not reach {label!r}; the screen shows:\n{screen(session)}")


def type_text(session: str, text: str, shown: Callable[[], str]) -> None:
    """Type `text` one character at a time; each waits until `shown()` is what was typed so far."""
    for i, ch in enumerate(text):
        typed = text[: i + 1]
        send(session, ch, literal=True)
        wait_for(f"{typed!r} typed", lambda: shown() == typed.rstrip(), session, KEY_LIMIT_S)


def set_field(session: str, label: str, value: str) -> None:
    focus_field(session, label)
    # focused() reads a field only with the cursor at the end of its text: C-u (delete to the
    # start of the line) then clears it whole
    if focused(session) != (label, ""):
        press(session, "C-u")
        wait_for(f"{label} cleared", lambda: focused(session) == (label, ""), session, KEY_LIMIT_S)

    def value_shown() -> str:
        now = focused(session)
        assert now is not None and now[0] == label, f"focus left {label!r} while typing: {now}"
        return now[1]

    type_text(session, value, value_shown)


def chat_input(session: str) -> Optional[str]:
    """What the done step's chat input shows (the row the cursor is in), '' for the placeholder."""
    _, y = cursor(session)
    rows = screen(session).split("\n")
    if not 0 <= y < len(rows):
        return None
    return "" if "Ask the fine-tuned" in rows[y] else rows[y].strip()


def test_wizard_walks_the_demo_to_an_adapter(tmp_path):
    session = "wizard"
    runs, config = tmp_path / "runs", tmp_path / "config"
    env = {
        "SNUGTUNE_RUNS_DIR": str(runs),
        "SNUGTUNE_CONFIG_DIR": str(config),
        "SNUGTUNE_CACHE": os.environ.get("SNUGTUNE_CACHE", str(tmp_path / "cache")),
        "SNUGTUNE_CHAT_MAX_NEW_TOKENS": "8",  # a quick reply: the test checks that one comes, not its length
        "HF_HUB_OFFLINE": "1",
        "TERM": "xterm-256color",
    }
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    # the app's exit status lands in a file, so the test can tell a clean exit from a crash
    status = tmp_path / "exit-status"
    cmd = f"cd {ROOT} && env {exports} {sys.executable} -m tui.cli --preset demo; echo $? > {status}"
    tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd)
    try:
        shown = wait_screen(session, "Peak memory")
        assert "4 Settings" in shown and "LoRA rank" in shown
        # the estimate is painted after the first frame; after it only the keys sent change the screen
        wait_for("the estimate", lambda: re.search(r"max_steps \d+:|per epoch", screen(session)), session,
                 SCREEN_LIMIT_S)
        # make the run 2 steps long; the estimate beside it confirms the value was taken
        set_field(session, "Max steps", "2")
        wait_screen(session, "max_steps 2:", KEY_LIMIT_S)
        send(session, "C-n")
        wait_screen(session, "ctrl+t starts the run")
        send(session, "C-t")
        wait_screen(session, "running", ENGINE_LIMIT_S)
        shown = wait_screen(session, "finished", ENGINE_LIMIT_S)
        assert "step 2/2" in shown
        send(session, "C-n")
        shown = wait_screen(session, "Adapter saved in")
        adapters = list(runs.glob("*/adapter/adapter_model.safetensors"))
        assert len(adapters) == 1, f"no adapter under {runs}: {sorted(p.name for p in runs.iterdir())}"
        assert adapters[0].stat().st_size > 0
        assert adapters[0].parent.parent.name in shown.replace("\n", "")
        # a quick chat: the fine-tuned model's answer arrives (comparing with the base is off by default)
        prompt = "What does len do?"
        wait_for("the chat input focused", lambda: chat_input(session) == "", session, KEY_LIMIT_S)
        type_text(session, prompt, lambda: chat_input(session))
        send(session, "Enter")
        # "answered" is set only when a reply came back (an error shows "chat: ..." instead)
        shown = wait_screen(session, "answered", CHAT_LIMIT_S)
        assert "fine-tuned" in shown and "chat:" not in shown
        # export: merged 16-bit weights (the last choice), in a new directory under the run
        send(session, "C-e")
        wait_screen(session, "Export the fine-tuned model as")
        send(session, "End")
        send(session, "Enter")
        wait_screen(session, "Write the merged")
        send(session, "Enter")
        wait_screen(session, "exported:", CHAT_LIMIT_S)
        assert (adapters[0].parent.parent / "merged" / "config.json").is_file()
        send(session, "C-q")
        wait_for("the wizard's exit", status.exists, session, SCREEN_LIMIT_S)
        assert status.read_text().strip() == "0"
    finally:
        tmux("kill-server")
