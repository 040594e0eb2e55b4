"""`snugtune train | runs | attach | stop | resume | presets | chat | export`: headless runs.

No torch at module level (the wizard and `snugtune --help` import this): training runs in the
engine process (`python -m core.train RUN_DIR`); chat and export import the engine inside the
function that runs them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from core.errors import UserError

# ---- formatting -------------------------------------------------------------------------------


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _bar(done: int, total: Optional[int], width: int = 20) -> str:
    if not total:
        return "[" + "?" * width + "]"
    filled = min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def progress_line(ev: dict) -> str:
    """One line for a step_logged event: step/total, bar, loss, tokens/s, VRAM, ETA."""
    step, total = ev.get("step", 0), ev.get("total_steps")
    loss, tps = ev.get("loss"), ev.get("tokens_per_s")
    alloc, reserved = ev.get("mem_allocated_gib"), ev.get("mem_reserved_gib")
    parts = [
        f"step {step}/{total or '?'} {_bar(step, total)}",
        f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "loss -",
        f"{tps:,.0f} tok/s" if isinstance(tps, (int, float)) else "- tok/s",
        f"VRAM {alloc:.2f}/{reserved:.2f} GiB" if alloc is not None and reserved is not None else "VRAM - (CPU)",
        f"ETA {_duration(ev.get('eta_s'))}",
    ]
    return " | ".join(parts)


class Printer:
    """Renders events to the terminal: a live progress line on a TTY, plain lines otherwise."""

    def __init__(self, stream=None, run: Optional[str] = None, run_dir: Optional[Path] = None):
        self.stream = stream or sys.stdout
        self.run = run  # the run's name, for lines to paste
        # where the run is now: a run folder renamed or moved since keeps the old paths in its events
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tty = self.stream.isatty()
        self._live = False

    def _line(self, text: str) -> None:
        if self._live:
            self.stream.write("\n")
            self._live = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def _progress(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self._live = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def event(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "setup_progress":
            self._line(f"  {ev.get('message')} ...")
        elif kind == "run_started":
            dev = ev.get("device") or {}
            model = (ev.get("config") or {}).get("model", {}).get("name_or_path")
            resumed = f", resuming from {Path(ev['resumed_from']).name}" if ev.get("resumed_from") else ""
            procs = f" x {ev['world_size']} processes" if (ev.get("world_size") or 1) > 1 else ""
            self._line(f"  training {model} on {dev.get('type')} ({dev.get('name')}){procs}, "
                       f"{ev.get('total_steps')} steps{resumed}")
        elif kind == "data_prepared":
            self._line(f"  data: {ev.get('train_samples')} train / {ev.get('eval_samples')} eval samples, "
                       f"format {ev.get('format')}")
            cut = (ev.get("info") or {}).get("dropped_and_cut")  # core.data: everything dropped or cut
            if cut:
                self._line("  data dropped or cut: " + "; ".join(cut))
            if ev.get("few_steps"):  # core.plan.few_steps_note
                self._line(f"  note: {ev['few_steps']}")
        elif kind == "step_logged":
            self._progress(progress_line(ev))
        elif kind == "eval_logged":
            loss = ev.get("eval_loss")
            shown = f"{loss:.4f}" if isinstance(loss, (int, float)) else "- (not a number)"
            self._line(f"  eval at step {ev.get('step')}: loss {shown}")
        elif kind == "checkpoint_skipped":
            self._line(f"  {Path(str(ev.get('path'))).name} is damaged ({ev.get('reason')}): not resumed from; "
                       f"kept as {Path(str(ev.get('moved_to'))).name}")
        elif kind == "log_line_skipped":
            self._line(f"  (events.jsonl line {ev.get('line')} skipped: {ev.get('reason')})")
        elif kind == "checkpoint_saved":
            self._line(f"  checkpoint saved at step {ev.get('step')}")
        elif kind == "oom_recovered":
            self._line(f"  out of memory at step {ev.get('step')}: retrying with micro-batch {ev.get('micro_batch')} "
                       f"x grad-accum {ev.get('grad_accum')}")
        elif kind == "run_finished":
            loss = ev.get("final_loss")
            self._line(f"finished: {ev.get('steps')} steps, final loss {loss:.4f}" if loss is not None
                       else f"finished: {ev.get('steps')} steps")
            adapter = ev.get("adapter_path")
            if self.run_dir is not None and adapter and Path(str(adapter)).name == "adapter":
                adapter = self.run_dir / "adapter"
            self._line(f"adapter: {adapter}")
        elif kind == "run_stopped":
            ckpt = Path(str(ev["checkpoint"])) if ev.get("checkpoint") else None
            # the run's name, so the line can be pasted as it is: the one followed (a renamed run folder
            # keeps its old name in the event's path), else the checkpoint's RUN/checkpoints/checkpoint-N
            run = f" {self.run}" if self.run else f" {ckpt.parent.parent.name}" if ckpt is not None and \
                ckpt.parent.name == "checkpoints" else " RUN"
            if ckpt is not None and self.run_dir is not None and ckpt.parent.name == "checkpoints":
                ckpt = self.run_dir / "checkpoints" / ckpt.name
            if ckpt is None and not ev.get("step"):
                # stopped during setup (a Ctrl-C while the model loads): nothing trained, nothing lost
                self._line(f"stopped before training started: nothing was trained, no checkpoint "
                           f"(`snugtune resume{run}` starts it)")
            else:
                self._line(f"stopped at step {ev.get('step')}; checkpoint {ckpt} "
                           f"(resume with `snugtune resume{run}`)")
        elif kind == "run_failed":
            self._line(f"failed ({ev.get('kind')}): {ev.get('error')}")


def _exit_code(ev: Optional[dict]) -> int:
    if ev is None:
        return 1
    kind = ev.get("event")
    if kind in ("run_finished", "run_stopped"):
        return 0
    if kind == "run_failed":
        return {"user": 2, "oom": 3, "disk": 4}.get(ev.get("kind"), 1)
    return 1


def _follow_and_print(run_dir: Path, alive: Optional[Callable[[], bool]], printer: Printer,
                      on_interrupt: Callable[[], bool], start: Optional[int] = None) -> Optional[dict]:
    """Print the current attempt's events until its terminal one; Ctrl-C calls on_interrupt
    (True: keep following). `start`: the log's size when the caller launched this attempt."""
    from core.events import TERMINAL_EVENTS, current_attempt, follow

    if start is None:
        start = current_attempt(run_dir)
    from core.runs import deleted_run, read_pid

    position = {"offset": start}
    pid = read_pid(run_dir)
    while True:
        try:
            for ev in follow(run_dir, alive=alive, from_offset=position["offset"], after_offset=start,
                             position=position):
                pid = pid or read_pid(run_dir)
                ev = deleted_run(ev, run_dir, pid)
                printer.event(ev)
                if ev.get("event") in TERMINAL_EVENTS:
                    return ev
            return None
        except KeyboardInterrupt:
            if not on_interrupt():
                return None
            # follow on from the last line read: nothing is printed twice


# ---- train / resume -----------------------------------------------------------------------------


def _run_engine(run_dir: Path, detach: bool, as_json: bool) -> int:
    from core import runs

    if detach:
        pid = runs.launch(run_dir, detach=True)
        if as_json:
            print(json.dumps({"run_dir": str(run_dir), "pid": pid}))
        else:
            print(f"run directory: {run_dir}")
            print(f"engine pid {pid}; follow it with `snugtune attach {run_dir.name}`, stop it with "
                  f"`snugtune stop {run_dir.name}`")
        return 0
    # This attempt's events start where the log ends now: earlier attempts (a stopped or failed
    # run being resumed) are neither printed again nor taken for this attempt's end.
    start = runs.log_size(run_dir)
    proc = runs.spawn(run_dir)
    print(f"run directory: {run_dir}", flush=True)
    stopping = {"asked": False}

    def on_interrupt() -> bool:
        if not stopping["asked"]:
            stopping["asked"] = True
            runs.request_stop(run_dir)
            said = runs.STOP_IN_SETUP if runs.setting_up(run_dir) else "stopping: the engine saves a checkpoint first"
            print(f"\n{said} (Ctrl-C again to leave it running in the background)", file=sys.stderr, flush=True)
            return True
        print(f"\nleft running in the background; `snugtune attach {run_dir.name}` or "
              f"`snugtune stop {run_dir.name}`", file=sys.stderr)
        return False

    last = _follow_and_print(run_dir, lambda: proc.poll() is None, Printer(run=run_dir.name, run_dir=run_dir), on_interrupt,
                              start=start)
    if last is None and stopping["asked"]:
        return 130
    if last is not None and last.get("event") == "run_failed" and last.get("kind") not in ("user", "deleted"):
        print(f"snugtune: the run failed; details in {run_dir / 'engine.log'}", file=sys.stderr)
    try:
        proc.wait(timeout=60)  # the engine exits right after its last event
    except Exception:  # noqa: BLE001 - a slow exit is not the user's problem
        pass
    print(f"run directory: {run_dir}")
    if last is not None and last.get("event") == "run_finished":
        print(f"try it: snugtune chat {run_dir.name} --compare")
    return _exit_code(last)


def cmd_train(args) -> int:
    from core import runs
    from core.presets import load_preset

    if args.resume:
        return _resume(args.resume, args.detach, args.json)
    if not args.preset:
        raise UserError("give a preset name or a TOML file (see `snugtune presets`), or --resume RUN")
    cfg = load_preset(args.preset)
    # named after the preset, unless it is a starting point that needs your data: then the data
    needs_data = cfg.data.path.startswith("REPLACE")
    if args.set:
        cfg = cfg.with_overrides(args.set)
    # several GPUs (core.distributed): frozen in the run's config, so a resume keeps it; 0 or less
    # reaches the config's check (gpu.nproc >= 1): one message, exit 2, no run directory
    if args.nproc is not None:
        cfg = cfg.with_overrides([f"gpu.nproc={args.nproc}"], source="--nproc")
    from core.distributed import check_nproc

    check_nproc(cfg)
    # Data, model, tokenizer, GPU profile and disk space checked before the run directory exists:
    # a mistake is one message and exit 2 (also with --detach), and leaves no failed run behind.
    if not args.no_preflight:
        print("checking the data and the model ...", file=sys.stderr, flush=True)
        for warning in runs.preflight(cfg, in_process=True).get("warnings") or []:
            print(f"snugtune: warning: {warning}", file=sys.stderr, flush=True)
    run_dir = runs.create_run_dir(cfg, header=f"Started with: snugtune train {args.preset}"
                                  + "".join(f" --set {s}" for s in args.set or [])
                                  + (f" --nproc {args.nproc}" if args.nproc else ""),
                                  preset=None if needs_data else args.preset)
    return _run_engine(run_dir, args.detach, args.json)


def _resume(run: str, detach: bool, as_json: bool) -> int:
    from core import runs

    run_dir = runs.resolve_run(run)
    status = runs.run_status(run_dir)
    if status["status"] == "running":
        raise UserError(f"run {run_dir.name} is still running", hint=f"`snugtune attach {run_dir.name}` follows it")
    if status["status"] == "finished":
        raise UserError(f"run {run_dir.name} already finished; its adapter is in {run_dir / 'adapter'}",
                        hint="start a new run with `snugtune train`")
    runs.check_resumable(run_dir)
    return _run_engine(run_dir, detach, as_json)


def cmd_resume(args) -> int:
    return _resume(args.run, args.detach, args.json)


# ---- runs / attach / stop ------------------------------------------------------------------------


def cmd_runs_rm(args) -> int:
    from core import runs

    run_dir = runs.resolve_run(args.run)
    status = runs.run_status(run_dir)
    if status["status"] == "running":  # said before asking (remove_run refuses it too)
        raise UserError(f"run {run_dir.name} is running (pid {status['pid']}); nothing removed",
                        hint=f"stop it first: `snugtune stop {run_dir.name} --wait`")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError(f"not removing run {run_dir.name} without a confirmation",
                            hint=f"add --yes: `snugtune runs rm {run_dir.name} --yes`")
        answer = input(f"remove run {run_dir.name} ({status['status']}, step {status['step']}/"
                       f"{status['total_steps'] or '?'}) and everything in {run_dir}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    runs.remove_run(run_dir)
    print(f"removed {run_dir}")
    return 0


def cmd_runs(args) -> int:
    from core import runs

    if getattr(args, "runs_action", None) == "rm":
        return cmd_runs_rm(args)
    items = runs.list_runs()
    if args.json:
        print(json.dumps(items, indent=1))
        return 0
    if not items:
        print(f"no runs yet in {runs.default_runs_dir()}; start one with `snugtune train demo`")
        return 0
    width = max(len(r["name"]) for r in items)
    print(f"{'NAME':<{width}}  {'STATUS':<10}  {'STEP':>11}  {'LOSS':>8}  STARTED")
    for r in items:
        step = f"{r['step']}/{r['total_steps'] or '?'}"
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "-"
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"])) if r["started"] else "-"
        print(f"{r['name']:<{width}}  {r['status']:<10}  {step:>11}  {loss:>8}  {started}")
    for r in items:
        if r["status"] == "unreadable":
            print(f"note: {r['name']}: {r['error']}")
        elif r.get("log_note"):
            print(f"note: {r['name']}: {r['log_note']}")
    print(f"({runs.default_runs_dir()})")
    return 0


def _attach_target(run: Optional[str]) -> Path:
    """The run to attach to: the one named, else the newest running run."""
    from core import runs

    if run:
        return runs.resolve_run(run)
    items = runs.list_runs()
    going = [r for r in items if r["status"] == "running"]
    if not going:
        newest = f"; the newest is {items[-1]['name']} ({items[-1]['status']}): `snugtune attach {items[-1]['name']}`" \
            if items else ""
        raise UserError(f"no run is running in {runs.default_runs_dir()}{newest}",
                        hint="name a run (`snugtune runs` lists them), or start one with `snugtune train`")
    newest = max(going, key=lambda r: (r.get("attempt_started") or r["started"] or 0, r["name"]))
    if len(going) > 1:
        others = ", ".join(r["name"] for r in going if r is not newest)
        print(f"attaching to the newest running run, {newest['name']} (also running: {others})", file=sys.stderr)
    return Path(newest["dir"])


def cmd_attach(args) -> int:
    from core.events import current_attempt

    run_dir = _attach_target(args.run)
    if not args.json and not args.text and sys.stdin.isatty() and sys.stdout.isatty():
        # In a terminal, the wizard's live panel (the same one the Train step shows);
        # piped or with --text, one progress line, so scripts and `ssh host snugtune attach` work.
        from tui.app import run_attach

        return run_attach(run_dir)
    print(f"run directory: {run_dir}", flush=True)
    # The current attempt only: after a resume, the earlier attempts' lines and their end
    # (`run_stopped`, a disk-full `run_failed`) are history, not this run's outcome.
    start = current_attempt(run_dir)
    if args.json:
        from core.events import TERMINAL_EVENTS, follow

        last = None
        try:
            for ev in follow(run_dir, from_offset=start, after_offset=start):
                print(json.dumps(ev), flush=True)
                if ev.get("event") in TERMINAL_EVENTS:
                    last = ev
        except KeyboardInterrupt:
            return 130
        return _exit_code(last)

    def on_interrupt() -> bool:
        print(f"\ndetached; the run continues (`snugtune stop {run_dir.name}` stops it)", file=sys.stderr)
        return False

    last = _follow_and_print(run_dir, None, Printer(run=run_dir.name, run_dir=run_dir), on_interrupt,
                              start=start)
    return 130 if last is None else _exit_code(last)


# `stop --wait` gives up after this long by default: a step plus a checkpoint of a large model on a
# slow disk takes a minute or two; an engine still loading its model stops when setup is done.
STOP_WAIT_S = 600.0


def cmd_stop(args) -> int:
    from core import runs
    from core.events import TERMINAL_EVENTS, current_attempt, follow

    run_dir = runs.resolve_run(args.run)
    start = current_attempt(run_dir)
    if not runs.request_stop(run_dir):
        status = runs.run_status(run_dir)["status"]
        print(f"run {run_dir.name} is not running ({status})")
        return 0
    if runs.setting_up(run_dir):
        print(f"asked run {run_dir.name} to stop; it is still setting up and stops at the end of the stage "
              "it is in (at once while it loads the model), before training a step", flush=True)
    else:
        print(f"asked run {run_dir.name} to save a checkpoint and stop", flush=True)
    if not args.wait:
        return 0
    timeout = args.timeout if args.timeout is not None else STOP_WAIT_S
    deadline = time.monotonic() + timeout
    last = None
    for ev in follow(run_dir, from_offset=start, after_offset=start, cancelled=lambda: time.monotonic() > deadline):
        if ev.get("event") in TERMINAL_EVENTS:
            last = ev
    if last is None:
        pid = runs.read_pid(run_dir)
        print(f"snugtune: run {run_dir.name} has not stopped within {timeout:g} s; it is still running (pid {pid}). "
              f"It stops at the end of its current step: wait with `snugtune stop {run_dir.name} --wait "
              f"--timeout SECONDS`, or end it with `kill -9 {pid}` (it resumes from its last checkpoint)",
              file=sys.stderr)
        return 1
    kind = last.get("event")
    if kind == "run_stopped":
        ckpt = Path(last["checkpoint"]).name if last.get("checkpoint") else "no checkpoint"
        print(f"run {run_dir.name} stopped at step {last.get('step')} ({ckpt}); "
              f"`snugtune resume {run_dir.name}` continues it")
    elif kind == "run_finished":
        print(f"run {run_dir.name} finished ({last.get('steps')} steps) before it could stop; "
              f"adapter: {last.get('adapter_path')}")
    elif last.get("synthetic"):
        print(f"run {run_dir.name}: the engine ended without saving ({last.get('error')})")
    else:
        print(f"run {run_dir.name} failed ({last.get('kind')}): {last.get('error')}")
    return _exit_code(last)


# ---- presets ---------------------------------------------------------------------------------------


def cmd_presets(args) -> int:
    from core import presets

    if getattr(args, "presets_action", None) == "show":
        if args.json:
            cfg = presets.load_preset(args.name)
            print(json.dumps(cfg.to_dict(), indent=1))
        else:
            path = presets.find_preset(args.name)
            presets.load_preset(args.name)  # validate: say what is wrong rather than print a broken file
            print(f"# {path}")
            print(path.read_text(encoding="utf-8"), end="")
        return 0
    items = presets.list_presets()
    if args.json:
        print(json.dumps([p.to_dict() for p in items], indent=1))
        return 0
    width = max((len(p.name) for p in items), default=4)
    for p in items:
        print(f"{p.name:<{width}}  {p.source:<7}  {p.description}")
    print(f"(user presets: {presets.user_presets_dir()})")
    return 0


# ---- chat / export ----------------------------------------------------------------------------------


def cmd_chat(args) -> int:
    from core import runs

    run_dir = runs.resolve_run(args.run)
    from core.chat import interactive

    return interactive(run_dir, compare=args.compare, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature)


def cmd_export(args) -> int:
    from core import runs

    run_dir = runs.resolve_run(args.run)
    if not (args.merged or args.gguf or args.ollama):
        raise UserError("say what to export", hint="--merged DIR, --gguf FILE.gguf and/or --ollama DIR")
    for out in (args.merged, args.gguf, args.ollama):
        if out and Path(out).expanduser().exists():  # say it before loading anything heavy
            raise UserError(f"{out} already exists; snugtune does not overwrite it", hint="choose a new name")
    from core.export import export

    export(run_dir, merged=args.merged, gguf=args.gguf, ollama=args.ollama, quant=args.quant)
    return 0


# ---- registration -------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train from a preset (name or TOML file)",
                              description="Train from a preset. In the foreground it shows progress; Ctrl-C "
                              "saves a checkpoint and stops. --detach leaves it running on its own.")
    p.add_argument("preset", nargs="?", help="a preset name (see `snugtune presets`) or a TOML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a setting, e.g. --set train.max_steps=4 --set data.path=my.jsonl (repeatable)")
    p.add_argument("--detach", action="store_true", help="start the run in the background and return at once")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train on N GPUs at once (one process each, DDP through torchrun; same as --set gpu.nproc=N); "
                   "the effective batch is micro_batch x grad_accum x N")
    p.add_argument("--resume", metavar="RUN", help="resume a stopped or died run (name or directory) instead")
    p.add_argument("--json", action="store_true", help="with --detach: print {run_dir, pid} as JSON")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the checks of data, model and disk space before the run starts (the engine still makes them)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("resume", help="resume a stopped run from its last checkpoint")
    p.add_argument("run", help="run name or directory")
    p.add_argument("--detach", action="store_true", help="resume in the background and return at once")
    p.add_argument("--json", action="store_true", help="with --detach: print {run_dir, pid} as JSON")
    p.set_defaults(func=cmd_resume)

    p = subparsers.add_parser("runs", help="list runs with status, steps and last loss; `runs rm RUN` deletes one")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    sub = p.add_subparsers(dest="runs_action", metavar="ACTION")
    s = sub.add_parser("rm", help="delete a run directory (asks first; refuses a running run)")
    s.add_argument("run", help="run name (or a unique prefix) or directory")
    s.add_argument("--yes", "-y", action="store_true", help="do not ask for a confirmation")
    p.set_defaults(func=cmd_runs)

    p = subparsers.add_parser("attach", help="follow a run's progress live until it ends")
    p.add_argument("run", nargs="?", help="run name (or a unique prefix) or directory; default: the newest running run")
    p.add_argument("--json", action="store_true", help="print the raw events, one JSON object a line")
    p.add_argument("--text", action="store_true",
                   help="one progress line instead of the live panel (the default when not in a terminal)")
    p.set_defaults(func=cmd_attach)

    p = subparsers.add_parser("stop", help="ask a run to save a checkpoint and stop")
    p.add_argument("run", help="run name or directory")
    p.add_argument("--wait", action="store_true", help="wait until it has stopped (its checkpoint saved)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help=f"with --wait: give up after this long, exit 1 (default {STOP_WAIT_S:g})")
    p.set_defaults(func=cmd_stop)

    p = subparsers.add_parser("presets", help="list presets; `presets show NAME` prints one")
    p.add_argument("--json", action="store_true", help="print as JSON")
    sub = p.add_subparsers(dest="presets_action", metavar="ACTION")
    s = sub.add_parser("show", help="print one preset")
    s.add_argument("name", help="preset name or TOML file")
    s.add_argument("--json", action="store_true", help="print the validated configuration as JSON")
    p.set_defaults(func=cmd_presets)

    p = subparsers.add_parser("chat", help="chat with a run's adapter in the terminal")
    p.add_argument("run", help="run name or directory")
    p.add_argument("--compare", action="store_true", help="also answer with the base model (adapter off)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser("export", help="merged 16-bit weights, a GGUF for llama.cpp / LM Studio, or an Ollama folder",
                              description="Merge a run's adapter into its base model and write it out. Any of "
                              "--merged, --gguf and --ollama, together if you like (one merge serves all). "
                              "GGUF needs the extra: pip install 'snugtune[gguf]'.")
    p.add_argument("run", help="run name or directory (an unfinished run exports its newest checkpoint)")
    p.add_argument("--merged", metavar="OUT_DIR", help="new directory for the merged model (safetensors, 16-bit)")
    p.add_argument("--gguf", metavar="OUT.gguf", help="new GGUF file for llama.cpp and LM Studio")
    p.add_argument("--ollama", metavar="OUT_DIR", help="new directory with a GGUF and an Ollama Modelfile")
    p.add_argument("--quant", default="q4_k_m", choices=["q4_k_m", "q5_k_m", "q8_0", "f16", "bf16"],
                   help="GGUF weight type (default q4_k_m: about 5 bits a weight, the usual choice)")
    p.set_defaults(func=cmd_export)
