"""The CLI's words after a stop: a line that can be pasted as it is."""
from __future__ import annotations

import io


def test_a_stopped_run_says_the_resume_command_with_its_name():
    from tui.cmd_runs import Printer

    out = io.StringIO()
    Printer(out).event({"event": "run_stopped", "step": 2,
                        "checkpoint": "/runs/demo-20261201-163448/checkpoints/checkpoint-2"})
    # before: "(resume with `snugtune resume`)", which is a usage error as written
    assert "(resume with `snugtune resume demo-20261201-163448`)" in out.getvalue()
    out = io.StringIO()
    Printer(out).event({"event": "run_stopped", "step": 0, "checkpoint": None})
    assert "stopped before training started" in out.getvalue() and "`snugtune resume RUN`" in out.getvalue()
