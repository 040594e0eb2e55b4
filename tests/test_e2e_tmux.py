"""The wizard in a real terminal: tmux at 80x24 runs `python -m tui.cli --preset demo`, and
keys sent to it walk to a finished demo run with an adapter on disk.

Bounded waits: the pane is polled, and each wait gives up after its limit (the whole demo run,
shortened to a few steps in the settings, takes well under the 180 s allowed here).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]

ROOT = Path(__file__).resolve().parent.parent
CHAT_LIMIT_S = 120  # loading the model in a subprocess and answering; export likewise
RUN_LIMIT_S = 180  # a 2-step demo run is ~20-40 s on 2 busy cores; generous for slow CI
ENGINE_START_S = 120  # importing torch and building the demo model on a cold cache


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=False).stdout


def screen(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session)


def wait_screen(session: str, text: str, limit: float) -> str:
    deadline = time.monotonic() + limit
    shown = ""
    while time.monotonic() < deadline:
        shown = screen(session)
        if text in shown:
            return shown
        time.sleep(0.3)
    raise AssertionError(f"{text!r} did not appear within {limit:.0f}s; the screen shows:\n{shown}")


def keys(session: str, *ks: str) -> None:
    for k in ks:
        tmux("send-keys", "-t", session, k)
        time.sleep(0.15)  # one key a frame: a burst can land before the screen it is meant for


def test_wizard_walks_the_demo_to_an_adapter(tmp_path):
    session = f"snugtune-e2e-{uuid.uuid4().hex[:8]}"
    runs, config = tmp_path / "runs", tmp_path / "config"
    env = {
        "SNUGTUNE_RUNS_DIR": str(runs),
        "SNUGTUNE_CONFIG_DIR": str(config),
        "SNUGTUNE_CACHE": os.environ.get("SNUGTUNE_CACHE", str(tmp_path / "cache")),
        "HF_HUB_OFFLINE": "1",
        "TERM": "xterm-256color",
    }
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    # the app's exit status lands in a file, so the test can tell a clean exit from a crash
    status = tmp_path / "exit-status"
    cmd = f"cd {ROOT} && env {exports} {sys.executable} -m tui.cli --preset demo; echo $? > {status}"
    tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd)
    try:
        shown = wait_screen(session, "Peak memory", 30)
        assert "4 Settings" in shown and "LoRA rank" in shown
        # the focus starts on LoRA rank; eight tabs reach "Max steps": make the run 2 steps long
        keys(session, *["Tab"] * 8, "End", "C-u", "2")
        time.sleep(0.6)  # the estimate's debounce
        keys(session, "C-n")
        wait_screen(session, "ctrl+t starts the run", 15)
        keys(session, "C-t")
        wait_screen(session, "running", ENGINE_START_S)
        shown = wait_screen(session, "finished", RUN_LIMIT_S)
        assert "step 2/2" in shown
        keys(session, "C-n")
        shown = wait_screen(session, "Adapter saved in", 15)
        adapters = list(runs.glob("*/adapter/adapter_model.safetensors"))
        assert len(adapters) == 1, f"no adapter under {runs}: {sorted(p.name for p in runs.iterdir())}"
        assert adapters[0].stat().st_size > 0
        assert adapters[0].parent.parent.name in shown.replace("\n", "")
        # a quick chat: the fine-tuned answer and the base model's arrive in their panes
        tmux("send-keys", "-t", session, "-l", "What does len do?")
        keys(session, "Enter")
        # "answered" is set only when a reply came back (an error shows "chat: ..." instead)
        shown = wait_screen(session, "answered", CHAT_LIMIT_S)
        assert "fine-tuned" in shown and "base model" in shown and "chat:" not in shown
        # export: merged 16-bit weights (the last choice), in a new directory under the run
        keys(session, "C-e")
        wait_screen(session, "Export the fine-tuned model as", 10)
        keys(session, "End")
        keys(session, "Enter")
        wait_screen(session, "Write the merged", 10)
        keys(session, "Enter")
        wait_screen(session, "exported:", CHAT_LIMIT_S)
        assert (adapters[0].parent.parent / "merged" / "config.json").is_file()
        keys(session, "C-q")
        deadline = time.monotonic() + 15
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status.read_text().strip() == "0"
    finally:
        tmux("kill-session", "-t", session)
