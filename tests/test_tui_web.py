"""`textual serve` runs the wizard under Textual's web driver (the same app, drawn in a browser):
the wizard must start and paint there too, with nothing that needs a real terminal."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAINT_LIMIT_S = 300  # a deadline: the first frame comes in about a second, but a 2-core machine at load 19 is slow


def test_wizard_paints_under_the_web_driver(tmp_path):
    env = {**os.environ, "TEXTUAL_DRIVER": "textual.drivers.web_driver:WebDriver",
           "SNUGTUNE_RUNS_DIR": str(tmp_path / "runs"), "SNUGTUNE_CONFIG_DIR": str(tmp_path / "config"),
           "HF_HUB_OFFLINE": "1"}
    env.pop("SNUGTUNE_EXIT_AFTER_FIRST_FRAME", None)
    err_path = tmp_path / "stderr"
    chunks: list[bytes] = []
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tui.cli", "--preset", "demo"], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(65536), b"")),
                                  daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + PAINT_LIMIT_S
            while b"LoRA rank" not in b"".join(chunks) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
        finally:
            proc.stdin.close()
            proc.terminate()  # the process this test started, by its own handle
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        reader.join(timeout=5)
    out = b"".join(chunks).decode(errors="replace")
    stderr = err_path.read_bytes()
    assert out.startswith("__GANGLION__")  # the web driver's handshake, then framed packets
    assert "snugtune" in out and "Settings" in out and "LoRA rank" in out, out[-500:]
    assert b"Traceback" not in stderr, stderr.decode(errors="replace")[-2000:]
