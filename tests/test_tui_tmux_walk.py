"""The whole wizard in tmux at 80x24, started without a preset, every step's keys sent as one
burst (tmux `send-keys` with all of them at once, as a fast typist over a slow SSH link sends
them): GPU, model, data, settings, a 2-step run, a trained adapter on disk, a chat answer.

Between steps the test waits for the screen to say the step is ready (a bounded poll of the
pane), never for a fixed time; inside a step nothing waits: keys must not be lost or reordered
(issue 14, item 4).
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

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]

ROOT = Path(__file__).resolve().parent.parent
STEP_S = 60  # a screen's own work: the data preview subprocess builds the demo tokenizer
RUN_S = 480  # importing torch, building the demo model, 2 steps: 4 min seen at load average 19 on 2 cores
CHAT_S = 180  # the chat process imports torch and loads the adapter


class Pane:
    def __init__(self, socket: str):
        self.socket, self.session = socket, "walk"

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              check=False).stdout

    def text(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def send(self, *keys: str) -> None:
        """All the keys in one send-keys call: they reach the app as one burst."""
        self.tmux("send-keys", "-t", self.session, *keys)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", self.session, "-l", text)

    def wait(self, text: str, limit: float) -> str:
        deadline = time.monotonic() + limit
        shown = ""
        while time.monotonic() < deadline:
            shown = self.text()
            if text in shown:
                return shown
            time.sleep(0.2)
        raise AssertionError(f"{text!r} did not appear within {limit:.0f}s; the screen shows:\n{shown}")


def test_walk_from_gpu_to_a_trained_adapter_with_keys_in_bursts(tmp_path):
    from core import gpu

    if gpu.detect_gpus():
        pytest.skip("the walk picks the CPU as the first choice; a machine with a GPU lists it first")
    runs, config = tmp_path / "runs", tmp_path / "config"
    env = {"SNUGTUNE_RUNS_DIR": str(runs), "SNUGTUNE_CONFIG_DIR": str(config),
           "SNUGTUNE_CACHE": os.environ.get("SNUGTUNE_CACHE", str(tmp_path / "cache")),
           "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    status = tmp_path / "exit-status"
    pane = Pane(f"snugtune-walk-{uuid.uuid4().hex[:8]}")
    pane.tmux("new-session", "-d", "-s", pane.session, "-x", "80", "-y", "24",
              f"cd {ROOT} && env {exports} {sys.executable} -m tui.cli; echo $? > {status}")
    try:
        pane.wait("Which GPU will train", STEP_S)
        pane.wait("train on the CPU", STEP_S)  # the list is filled once detection has answered
        # 1 GPU: the CPU is the first choice on a machine without a GPU; Enter takes it
        pane.send("Enter")
        pane.wait("Which model?", STEP_S)
        # 2 Model: filter by the builtin: prefix, Enter takes the one row
        pane.type("builtin:tiny")
        pane.send("Enter")
        pane.wait("Training data:", STEP_S)
        # 3 Data: the demo data set, previewed
        pane.type("builtin:python-docs-qa")
        pane.send("Enter")
        pane.wait("ctrl+n: settings", STEP_S)
        pane.send("C-n")
        pane.wait("Peak memory", STEP_S)
        # 4 Settings: four tabs reach the sequence length (1024 -> 256), two more gradient
        # accumulation (8 -> 1), two more Max steps (2), then Next: one burst, Next included
        pane.send("Tab", "Tab", "Tab", "Tab", "End", "BSpace", "BSpace", "BSpace", "BSpace", "2", "5", "6",
                  "Tab", "Tab", "End", "BSpace", "1", "Tab", "Tab", "2", "C-n")
        shown = pane.wait("Ready to train", STEP_S)
        assert "1 x 1 accum, seq 256" in shown and "length     2 steps" in shown
        # 5 Train
        pane.send("C-t")
        shown = pane.wait("finished", RUN_S)
        assert "step 2/2" in shown
        pane.send("C-n")
        shown = pane.wait("Adapter saved in", STEP_S)
        adapters = list(runs.glob("*/adapter/adapter_model.safetensors"))
        assert len(adapters) == 1
        # 6 Done: one question, answered by the adapter alone (compare is off by default)
        pane.type("What does len do?")
        pane.send("Enter")
        shown = pane.wait("answered", CHAT_S)
        assert "thinking" not in shown and "loading the model" not in shown
        pane.send("C-q")
        deadline = time.monotonic() + STEP_S
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status.read_text().strip() == "0"
    finally:
        pane.tmux("kill-server")
