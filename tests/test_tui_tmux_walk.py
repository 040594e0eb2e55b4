"""The whole wizard in tmux at 80x24, started without a preset, each step's keys sent as ONE
`send-keys` burst (a fast typist over a slow SSH link, a paste): GPU, model, data, settings,
a 2-step run, a trained adapter on disk, a chat answer (issue 14's done-when).

Between steps the test waits for the screen to say the step is ready (a bounded poll of the
pane, tests/test_e2e_tmux.py's helpers), never for a fixed time; inside a burst nothing waits:
keys must be neither lost nor reordered, however loaded the machine (tui/keyorder.py). The
data-to-settings burst also crosses a screen change: its first key, ctrl+n, opens the settings
step and the keys behind it must land on that step's fields.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest

from test_e2e_tmux import (CHAT_LIMIT_S, ENGINE_LIMIT_S, ROOT, SCREEN_LIMIT_S, screen, tmux, wait_for,
                           wait_screen)

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


def burst(session: str, *keys: str) -> None:
    """All the keys in one send-keys call: tmux writes them to the terminal together. A word
    that is not a key name (builtin:tiny) goes as its characters."""
    tmux("send-keys", "-t", session, *keys)


# Settings, from the first field (LoRA rank, focused on arrival): four Tabs reach the sequence
# length (1024 -> 256), two more gradient accumulation (8 -> 1), two more Max steps (2).
SETTINGS_KEYS = ("Tab", "Tab", "Tab", "Tab", "End", "BSpace", "BSpace", "BSpace", "BSpace", "2", "5", "6",
                 "Tab", "Tab", "End", "BSpace", "1", "Tab", "Tab", "2")


def test_walk_from_gpu_to_a_trained_adapter_with_each_step_in_one_burst(tmp_path):
    from core import gpu

    if gpu.detect_gpus():
        pytest.skip("the walk takes the CPU as the first choice; a machine with a GPU lists it first")
    session = "walk"
    runs, config = tmp_path / "runs", tmp_path / "config"
    env = {"SNUGTUNE_RUNS_DIR": str(runs), "SNUGTUNE_CONFIG_DIR": str(config),
           "SNUGTUNE_CACHE": os.environ.get("SNUGTUNE_CACHE", str(tmp_path / "cache")),
           "SNUGTUNE_CHAT_MAX_NEW_TOKENS": "8", "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    status = tmp_path / "exit-status"
    tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "24",
         f"cd {ROOT} && env {exports} {sys.executable} -m tui.cli; echo $? > {status}")
    try:
        wait_screen(session, "Which GPU will train")
        wait_screen(session, "train on the CPU")  # the list is filled once detection has answered
        # 1 GPU: the CPU is the first choice on a machine without a GPU; Enter takes it
        burst(session, "Enter")
        wait_screen(session, "Which model?")
        # 2 Model: filter by the builtin: prefix, Enter takes the one row left
        burst(session, "builtin:tiny", "Enter")
        wait_screen(session, "Training data:")
        # 3 Data: the demo data set, previewed
        burst(session, "builtin:python-docs-qa", "Enter")
        wait_screen(session, "ctrl+n: settings")
        # 4 Settings: opened by the burst's first key; every field key behind it, then Next
        burst(session, "C-n", *SETTINGS_KEYS, "C-n")
        shown = wait_screen(session, "Ready to train")
        assert "1 x 1 accum, seq 256" in shown and "length     2 steps" in shown, shown
        # 5 Train
        burst(session, "C-t")
        shown = wait_screen(session, "finished", ENGINE_LIMIT_S)
        assert "step 2/2" in shown
        burst(session, "C-n")
        wait_screen(session, "Adapter saved in")
        adapters = list(runs.glob("*/adapter/adapter_model.safetensors"))
        assert len(adapters) == 1, f"no adapter under {runs}"
        # 6 Done: one question and Enter in one burst, answered by the adapter
        burst(session, "What does len do?", "Enter")
        shown = wait_screen(session, "answered", CHAT_LIMIT_S)
        assert "chat:" not in shown and "What does len do?" in shown.replace("\n", " ")
        burst(session, "C-q")
        wait_for("the wizard's exit", status.exists, session, SCREEN_LIMIT_S)
        assert status.read_text().strip() == "0"
    finally:
        tmux("kill-server")
