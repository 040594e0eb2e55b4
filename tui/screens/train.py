"""Step 5: launch the engine as its own process and watch it: the live panel.

The run lives in its own directory and its own process session: closing the wizard, or the
SSH session, does not stop it; the wizard (or `snugtune attach`) can follow it again later.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar, Static
from textual.worker import get_current_worker

from core.config import ConfigError
from core.errors import UserError
from tui.messages import GpuStats, RunEvent
from tui.screens.base import StepScreen, attr, fmt_duration, plural
from tui.widgets.lossplot import LossPlot

# NVML readings every this many seconds: often enough to see memory climb, cheap for the driver.
GPU_POLL_S = 2.0
# The loss plot redraws at most this often: plotext redraws cost milliseconds each, and a
# tiny model on a fast GPU logs many steps a second.
PLOT_REDRAW_S = 0.5
# How often the event log is read: a quarter second feels live and costs nothing.
FOLLOW_POLL_S = 0.25
# A just-launched engine writes its pid file at once; give a slow disk a few seconds.
PID_GRACE_S = 10.0
# Lines of engine.log shown when the engine dies without saying why.
LOG_TAIL_LINES = 12


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = (run_dir / "engine.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(_without_warnings(text.rstrip().splitlines())[-lines:])


# a progress bar's line ("Loading weights:  82%|████████▏ | 31/38 [00:01<00:00, 18.72it/s]"):
# what a killed engine printed last, and no reason for anything
_PROGRESS_LINE = re.compile(r"^[^|]*\d+%\|.*\|")


def _without_warnings(lines: list[str]) -> list[str]:
    """engine.log's lines less Python's warnings (`file.py:12: FutureWarning: ...` and the source
    line under it): a killed engine's log ends in whatever warned last, which read as the cause."""
    out, skip_source = [], False
    for line in lines:
        if _PROGRESS_LINE.search(line):
            continue
        if re.search(r"^\S.*:\d+: \w*Warning: ", line):
            skip_source = True
            continue
        if skip_source and line.startswith((" ", "\t")):
            continue
        skip_source = False
        out.append(line)
    return out


class TrainScreen(StepScreen):
    STEP = 4
    BINDINGS = StepScreen.BINDINGS + [
        Binding("ctrl+t", "start", "Start", priority=True),
        Binding("ctrl+x", "stop", "Stop", priority=True),
        Binding("ctrl+r", "resume", "Resume", priority=True),
        # (not in the footer: at 80 columns they would push Resume off; the settings step shows
        # ctrl+y, the status line and the Done step's footer ctrl+l)
        Binding("ctrl+l", "app.runs", "Runs", priority=True, show=False),
        Binding("ctrl+y", "app.show_command", "Command", priority=True, show=False),
    ]

    def compose_body(self):
        yield Label("", id="run-title", classes="title")
        with Horizontal(id="progress-row"):
            yield ProgressBar(total=None, show_eta=False, id="progress")
            yield Label("", id="eta")
        with Horizontal(id="train-body"):
            yield LossPlot(id="loss")
            yield Static("", id="stats")
        yield Static("", id="engine-error", markup=False)

    def on_mount(self) -> None:
        self.reset_panel()
        self.gpu = self.app.gpu_target()
        self._plot_dirty = False
        self.set_interval(PLOT_REDRAW_S, self._redraw_plot)
        if self.gpu is not None and not attr(self.gpu, "is_cpu", default=False) and attr(self.gpu, "detected", default=False):
            self.set_interval(GPU_POLL_S, self.poll_gpu)
        previous = getattr(self.app, "run_state", None)
        if self.app.run_dir is not None and previous == "failed":
            # back here after a failed run (to change a setting): a fresh start, not the old panel
            # with its error and a bar that moves without a run
            name = self.app.run_dir.name
            self.app.run_dir = None
            self.app.run_state = None
            self.show_ready()
            self.set_status(f"the last run, {name}, failed; ctrl+t starts a new one with these settings", "warning")
        elif self.app.run_dir is not None:
            self.follow(self.app.run_dir)
        else:
            self.show_ready()

    def reset_panel(self) -> None:
        self.state = "ready"
        self.last: dict[str, Any] = {}
        self.eval: tuple[int, float] | None = None
        self.checkpoint: Any = None
        self.total_steps: int | None = None
        self.device: dict = {}
        self.gpu_stats: dict = {}
        self.failure: dict | None = None
        self.skipped_note = ""  # a damaged checkpoint the engine set aside, said with the next start
        self.setup_message = ""
        self.started_at: float | None = None  # the run_started event's time (this session of the run)
        self.last_time: float | None = None
        plot = self.query_one("#loss", LossPlot)
        plot.train.clear()
        plot.evals.clear()
        self.query_one("#engine-error", Static).display = False

    # ---- before launch ------------------------------------------------------------------

    def show_ready(self) -> None:
        try:
            cfg = self.app.config()
        except ConfigError as exc:
            self.query_one("#run-title", Label).update(Text(f"Not ready: {exc}", style="bold red"))
            return
        problem = self.cannot_train_here()
        if problem:
            self.query_one("#run-title", Label).update(Text("Planned for a card this machine does not have.",
                                                            style="bold red"))
        else:
            self.query_one("#run-title", Label).update(Text("Ready to train. ctrl+t starts the run.", style="bold"))
        est = self.app.last_estimate
        n = cfg.gpu.nproc or 1  # several cards (core.distributed): one process each, the plan per card
        gpu = attr(self.gpu, 'label', 'name', default=cfg.gpu.profile)
        lines = [
            f"model      {cfg.model.name_or_path}",
            f"data       {cfg.data.path}",
            f"gpu        {gpu}" + (f" x {n}: GPUs 0-{n - 1}, one process each" if n > 1 else ""),
            f"LoRA       r={cfg.lora.r} alpha={cfg.lora.alpha:g} targets={cfg.lora.target_modules}",
            f"batch      {cfg.train.micro_batch} x {cfg.train.grad_accum} accum"
            + (f" x {n} GPUs = {cfg.train.micro_batch * cfg.train.grad_accum * n} rows a step" if n > 1 else "")
            + f", seq {cfg.data.max_seq_len}",
            "length     " + (plural(cfg.train.max_steps, "step") if cfg.train.max_steps else plural(cfg.train.epochs, "epoch")),
        ]
        if est is not None:
            lines.append(f"est. peak  {float(attr(est, 'total_gib', default=0)):.2f} GiB" + (" per GPU" if n > 1 else ""))
        lines += ["", "The run keeps going if you close the wizard; reopen it or `snugtune attach` to watch."]
        self.query_one("#stats", Static).update("\n".join(lines))
        self.add_class("ready")
        if problem:
            self.set_status(problem, "error")
        else:
            self.set_status("ctrl+t: start training · ctrl+l: every run (open, delete)")

    def cannot_train_here(self) -> str | None:
        """Why this setup cannot train on this machine (a card profile planned for, no GPU here),
        in the wizard's words: the engine's own error would arrive later with command-line hints."""
        target = self.gpu
        if target is None or attr(target, "is_cpu", default=False) or attr(target, "detected", default=False):
            return None
        gpus = self.app.detected_gpus
        if gpus is None:
            from core import gpu as core_gpu

            try:
                gpus = list(core_gpu.detect_gpus())
            except Exception:  # noqa: BLE001 - no driver: no GPU
                gpus = []
        if gpus:
            return None
        label = attr(target, "label", "name", default="chosen card")
        return (f"planned for the {label}, but this machine has no NVIDIA GPU: it cannot train here. "
                "Train here: step 1 (ctrl+b ×4), choose the CPU. On that card: save (ctrl+s) and open it "
                "in the wizard there.")

    def action_start(self) -> None:
        if self.state in ("starting", "running", "checking"):
            self.set_status("a run is already going; ctrl+x stops it" if self.state != "checking"
                            else "checking the data and the model already", "warning")
            return
        problem = self.cannot_train_here()
        if problem:
            self.set_status(problem, "error")
            return
        try:
            cfg = self.app.config()
        except UserError as exc:
            self.set_status(f"could not start the engine: {exc}", "error")
            return
        # The CLI's pre-run check (data, model, tokenizer, GPU profile, disk) before any run
        # directory exists: a mistake is said here, not as a failed run seconds later.
        self.state = "checking"
        self.set_status("checking the data and the model before the run starts ...")
        self.preflight_then_launch(cfg)

    @work(thread=True, exit_on_error=False, name="pre-run check", exclusive=True, group="preflight")
    def preflight_then_launch(self, cfg) -> None:
        from core import runs

        try:
            info = runs.preflight(cfg, hint_syntax="wizard")
        except UserError as exc:
            self.app.call_from_thread(self._not_started, f"cannot start: {exc}")
            return
        self.app.call_from_thread(self._launch, cfg, info.get("warnings") or [])

    def _not_started(self, message: str) -> None:
        self.state = "ready"
        self.set_status(message, "error")

    def _launch(self, cfg, warnings: list[str] | None = None) -> None:
        from core import runs

        try:
            run_dir = runs.create_run_dir(cfg, preset=getattr(self.app, "preset_name", None))  # named like the CLI's
            runs.launch(run_dir, detach=True)
        except (UserError, OSError) as exc:
            self._not_started(f"could not start the engine: {exc}")
            return
        self.app.run_dir = Path(run_dir)
        self.app.run_result = None
        self.remove_class("ready")
        self.reset_panel()
        self.update_panel()
        self.follow(self.app.run_dir)
        if warnings:
            # the pre-run check's warnings (host RAM that is tight): said now and again with "training"
            self.skipped_note = " · ".join(warnings)
            self.set_status(self.skipped_note, "warning")

    # ---- following the run ------------------------------------------------------------

    def follow(self, run_dir: Path, resume_offset: int | None = None) -> None:
        self.state = "starting"
        self.query_one("#run-title", Label).update(Text(f"Run {run_dir.name} · starting…", style="bold"))
        self.set_status(f"run directory: {run_dir}")
        self.remove_class("ready")
        self.follow_events(run_dir, resume_offset)

    @work(thread=True, exit_on_error=False, name="run follower", exclusive=True, group="follow")
    def follow_events(self, run_dir: Path, resume_offset: int | None = None) -> None:
        """Post every event of the log, then new ones, until a terminal event written after
        `resume_offset` (a resumed run's log holds the earlier session's run_stopped first;
        None: the run's current attempt, core.events.current_attempt)."""
        from core import events, runs

        worker = get_current_worker()
        pid = runs.read_pid(run_dir)
        for event in events.follow(run_dir, poll_s=FOLLOW_POLL_S, start_grace_s=PID_GRACE_S,
                                   after_offset=resume_offset, cancelled=lambda: worker.is_cancelled,
                                   wait=worker.cancelled_event.wait):
            pid = pid or runs.read_pid(run_dir)
            event = runs.deleted_run(event, run_dir, pid)
            if event.get("synthetic") and event.get("kind") == "died":
                event = {**event, "log_tail": log_tail(run_dir)}
            self.post_message(RunEvent(event))

    @on(RunEvent)
    def _event(self, msg: RunEvent) -> None:
        e = msg.event
        kind = e.get("event")
        if isinstance(e.get("time"), (int, float)):
            self.last_time = float(e["time"])
        if kind == "run_started":
            self.started_at = self.last_time
            self.state = "running"
            self.failure = None
            self.query_one("#engine-error", Static).display = False
            self.total_steps = e.get("total_steps") or self.total_steps
            self.device = e.get("device") or {}
            resumed = e.get("resumed_from")
            skipped, self.skipped_note = self.skipped_note, ""
            self.set_status(f"training{' (resumed from ' + Path(str(resumed)).name + ')' if resumed else ''} · "
                            + (f"{skipped} · " if skipped else "") + "ctrl+x stops and saves a checkpoint",
                            "warning" if skipped else "info")
        elif kind == "checkpoint_skipped":
            # the engine set a damaged checkpoint aside and resumes from an older one: say so, or
            # "resumed from checkpoint-6" after "ctrl+r resumes from checkpoint-8" reads as a bug
            name = Path(str(e.get("path"))).name
            self.skipped_note = f"{name} was damaged ({e.get('reason')}), set aside"
            self.set_status(self.skipped_note, "warning")
        elif kind == "setup_progress":
            self.setup_message = str(e.get("message") or "")
        elif kind == "data_prepared":
            self.last["samples"] = e.get("train_samples")
        elif kind == "step_logged":
            self.state = "running"
            self.last.update(e)
            self.total_steps = e.get("total_steps") or self.total_steps
            loss = e.get("loss")
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                self.query_one("#loss", LossPlot).add(int(e.get("step", 0)), float(loss))
                self._plot_dirty = True
        elif kind == "eval_logged":
            self.eval = (e.get("step"), e.get("eval_loss"))
            if isinstance(e.get("eval_loss"), (int, float)):
                self.query_one("#loss", LossPlot).add(int(e.get("step", 0)), float(e["eval_loss"]), "eval")
                self._plot_dirty = True
        elif kind == "checkpoint_saved":
            self.checkpoint = e.get("step")
        elif kind == "oom_recovered":
            self.set_status(f"out of memory at step {e.get('step')}: retrying with micro-batch "
                            f"{e.get('micro_batch')} x {e.get('grad_accum')} accum", "warning")
        elif kind == "run_finished":
            self.state = "finished"
            self.app.run_result = e
            adapter = self.app.run_dir / "adapter" if self.app.run_dir is not None else e.get("adapter_path")
            self.set_status(f"finished: adapter in {adapter} · ctrl+n: chat, export, save", "ok")
        elif kind == "run_stopped":
            self.state = "stopped"
            ckpt = Path(str(e.get("checkpoint"))).name if e.get("checkpoint") else "none"
            if not e.get("checkpoint") and not e.get("step"):
                # stopped while it set up: said as the CLI says it ("step 0, checkpoint: none" read as lost work)
                self.set_status("stopped before training started: nothing was trained, nothing lost · "
                                "ctrl+r starts it", "warning")
            else:
                self.set_status(f"stopped at step {e.get('step')} (checkpoint: {ckpt}) · ctrl+r resumes", "warning")
        elif kind == "run_failed":
            self.state = "failed"
            self.failure = e
            self.show_failure(e)
        self.update_panel()

    def show_failure(self, e: dict) -> None:
        box = self.query_one("#engine-error", Static)
        text = Text()
        kind = e.get("kind")
        died = kind == "died"
        if kind == "deleted":  # the folder went, not (necessarily) the engine
            text.append("The run directory is gone:\n", style="bold red")
        elif died:  # killed (kill -9, out of host memory, a power cut): no error of its own to show
            text.append("The engine process is gone without a word (killed, out of host memory, or a hard "
                        "crash):\n", style="bold red")
        else:
            text.append("The engine stopped with an error" + (f" ({kind})" if kind else "") + ":\n", style="bold red")
        text.append(str(e.get("error") or "no message"))
        tail = e.get("log_tail")
        if tail:
            text.append("\n— end of engine.log —\n", style="dim")
            text.append(tail, style="dim")
        box.update(text)
        box.display = True
        if kind == "deleted":
            self.set_status("the run directory was deleted: nothing is left to resume; "
                            "ctrl+t starts a new run", "error")
            return
        ckpt = f"checkpoint-{self.checkpoint}" if isinstance(self.checkpoint, int) else "the last checkpoint"
        resumable = self.checkpoint is not None
        self.set_status(("the engine died; " if died else "the run failed; ")
                        + (f"ctrl+r resumes from {ckpt}, " if resumable else "")
                        + "ctrl+b to change the settings, ctrl+t to start again", "error")

    def _redraw_plot(self) -> None:
        if self.state in ("starting", "running") and self.started_at is not None:
            self.query_one("#stats", Static).update(self.stats_text())  # the elapsed time ticks
            self.query_one("#eta", Label).update(self.eta_text())  # and the ETA counts down
        if self._plot_dirty:
            self._plot_dirty = False
            self.query_one("#loss", LossPlot).redraw()

    def update_panel(self) -> None:
        run_dir = self.app.run_dir
        step = int(self.last.get("step") or 0)
        total = self.total_steps
        title = Text(f"Run {run_dir.name if run_dir else '?'} · ", style="bold")
        # a killed engine is `died`, as `snugtune runs` says, not `failed` (it reported no error)
        gone = (self.failure or {}).get("kind") if self.state == "failed" else None
        shown = gone if gone in ("died", "deleted") else self.state
        title.append(shown, style="bold reverse" if self.state in ("failed", "finished") else "bold")
        if self.state in ("starting", "running") and not self.last.get("step") and self.setup_message:
            title.append(f" · {self.setup_message}", style="dim")
        if total:
            title.append(f" · step {step}/{total}")
        if self.last.get("epoch") is not None:
            title.append(f" · epoch {float(self.last['epoch']):.2f}")
        self.query_one("#run-title", Label).update(title)
        self.app.run_state = self.state
        bar = self.query_one("#progress", ProgressBar)
        over = self.state in ("stopped", "failed")
        if total:
            bar.update(total=total, progress=step if self.state != "finished" else total)
        elif over:
            bar.update(total=1, progress=0)  # no run going: the bar stands still
        self.query_one("#eta", Label).update(self.eta_text())
        self.query_one("#stats", Static).update(self.stats_text())

    def eta_text(self, now: float | None = None) -> str:
        """The engine's ETA (from its recent steps' time), counted down since the step that said it:
        a slow step under load no longer leaves the last figure standing still for minutes."""
        if self.state == "finished":
            return "done"
        if self.state in ("stopped", "failed"):
            return self.state  # no time left to show
        eta, said_at = self.last.get("eta_s"), self.last.get("time")
        if not isinstance(eta, (int, float)):
            return "ETA …"
        if isinstance(said_at, (int, float)) and self.state == "running":
            eta = max(0.0, eta - max(0.0, (time.time() if now is None else now) - said_at))
        return f"ETA {fmt_duration(eta)}"

    def stats_text(self) -> Text:
        last = self.last
        out = Text()

        def row(label: str, value: str, style: str = "") -> None:
            out.append(f"{label:<10}", style="dim")
            out.append(value + "\n", style=style)

        loss = last.get("loss")
        row("loss", f"{loss:.4f}" if isinstance(loss, (int, float)) else "…", "bold")
        lr = last.get("learning_rate")
        row("lr", f"{lr:.2e}" if isinstance(lr, (int, float)) else "…")
        tps = last.get("tokens_per_s")
        row("tokens/s", f"{tps:,.0f}" if isinstance(tps, (int, float)) else "…")
        seen = last.get("tokens_seen")
        if isinstance(seen, (int, float)):
            row("tokens", f"{int(seen):,} seen")
        if self.started_at is not None:
            live = self.state in ("starting", "running")
            end = time.time() if live else (self.last_time or self.started_at)
            row("elapsed", fmt_duration(max(0.0, end - self.started_at)))
        est = self.app.last_estimate
        est_total = attr(est, "total_gib") if est is not None else None
        used = self.gpu_stats.get("used_gib")
        mem = (last.get("mem_peak_gib") or last.get("mem_reserved_gib")) if used is None else used
        if mem is not None:
            row("memory", f"{float(mem):.2f} GiB" + (f" / est {float(est_total):.2f}" if est_total else ""))
        elif est_total:
            # the CPU reports no GPU memory: "…" there read as a reading still to come, forever
            on_cpu = self.device.get("type") == "cpu"
            row("memory", f"{'n/a (CPU)' if on_cpu else '…'} / est {float(est_total):.2f} GiB")
        temp, power = self.gpu_stats.get("temp_c"), self.gpu_stats.get("power_w")
        if temp is not None or power is not None:
            row("GPU", " ".join(x for x in (f"{temp:.0f}°C" if temp is not None else "",
                                            f"{power:.0f} W" if power is not None else "") if x))
        if self.eval is not None and isinstance(self.eval[1], (int, float)):
            row("eval", f"{self.eval[1]:.4f} @ {self.eval[0]}")
        if self.checkpoint is not None:
            row("ckpt", f"step {self.checkpoint}")
        device = self.device.get("name") or self.device.get("type")
        if device:
            row("device", str(device))
        return out

    # ---- GPU readings ---------------------------------------------------------------------

    def poll_gpu(self) -> None:
        if self.state in ("starting", "running"):
            self.read_gpu()

    @work(thread=True, exit_on_error=False, name="GPU readings", exclusive=True, group="nvml")
    def read_gpu(self) -> None:
        from core import gpu

        self.post_message(GpuStats(gpu.live_stats(int(self.app.get_value("gpu.device_index", 0) or 0))))

    @on(GpuStats)
    def _gpu(self, msg: GpuStats) -> None:
        self.gpu_stats = dict(msg.stats or {})
        self.query_one("#stats", Static).update(self.stats_text())

    # ---- stop and resume ------------------------------------------------------------------

    def action_stop(self) -> None:
        from core import runs

        if self.app.run_dir is None or self.state not in ("starting", "running"):
            self.set_status("no run is going", "warning")
            return
        try:
            runs.request_stop(self.app.run_dir)
        except UserError as exc:
            self.set_status(str(exc), "error")
            return
        self.set_status(runs.STOP_IN_SETUP if runs.setting_up(self.app.run_dir) else
                        "stopping: the engine saves a checkpoint first…", "warning")

    def action_resume(self) -> None:
        from core import runs

        if self.app.run_dir is None or self.state not in ("stopped", "failed"):
            self.set_status("only a stopped or failed run can be resumed", "warning")
            return
        log = self.app.run_dir / "events.jsonl"
        offset = log.stat().st_size if log.exists() else 0
        try:
            runs.check_resumable(self.app.run_dir)
            runs.launch(self.app.run_dir, detach=True)
        except UserError as exc:
            self.set_status(f"could not resume: {exc}", "error")
            return
        self.reset_panel()
        self.follow(self.app.run_dir, resume_offset=offset)

    # ---- leaving ---------------------------------------------------------------------

    def leave_problem(self) -> str | None:
        if self.state != "finished":
            return {"ready": "start the run first (ctrl+t)",
                    "starting": "the run is starting; Done opens when it has finished",
                    "running": "the run is still going; Done opens when it has finished"}.get(
                self.state, "this run did not finish: ctrl+r resumes it, ctrl+t starts a new one")
        return None
