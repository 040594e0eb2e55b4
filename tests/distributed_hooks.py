"""TrainerCallbacks that tests/test_distributed.py plugs into engine ranks through $SNUGTUNE_CALLBACKS.

The ranks are processes of their own (torchrun's), so the test cannot hand them callbacks; the
engine imports `module:factory` names from the environment (core.train._env_callbacks). What a
hook does is read from $SNUGTUNE_TEST_HOOK, "what:rank:step", so that each launch of a run can
carry its own (or none). Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

WAIT_S = 600  # a ceiling for the test's `snugtune stop` to arrive on a loaded machine (not a timing assertion)


class Hook(TrainerCallback):
    def __init__(self):
        what, rank, step = (os.environ.get("SNUGTUNE_TEST_HOOK") or "none:0:0").split(":")
        self.what, self.rank, self.step = what, int(rank), int(step)
        self.mine = int(os.environ.get("RANK", "0")) == self.rank
        self.relaunch = int(os.environ.get("SNUGTUNE_OOM_ATTEMPT", "0"))

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.mine or state.global_step + 1 != self.step:
            return
        run_dir = Path(args.output_dir).parent
        if self.what == "sigterm":
            # A stop only this rank knows of: no stop file, a signal to this process alone. Without the
            # ranks' agreement the others would train the next step alone and wait in its all-reduce.
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.what == "pause":
            # Hold the run (the peers wait in this step's all-reduce) until `snugtune stop` has reached
            # the supervisor, which writes the stop file: the stop cannot come after the last step.
            (run_dir / "paused").write_text("1\n")
            deadline = time.monotonic() + WAIT_S
            while not (run_dir / "stop").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        elif self.what == "fail":
            raise RuntimeError("injected failure on one rank")
        elif self.what == "oom" and self.relaunch == 0:
            import torch

            # what CUDA raises when memory runs out, on one rank only, in the first launch only
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
