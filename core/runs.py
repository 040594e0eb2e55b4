"""Run directories: create (never reuse), launch the engine as its own process, list, stop.

A run directory holds config.toml (frozen at launch), events.jsonl, engine.log, pid, and the
engine's checkpoints/ and adapter/ (docs/ARCHITECTURE.md). No torch here: the wizard imports it.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Optional, Union

from core.config import RunConfig
from core.errors import UserError
from core.events import TERMINAL_EVENTS, attempt_index, pid_alive, read_log, read_pid

CONFIG_FILE = "config.toml"
EVENTS_FILE = "events.jsonl"
STOP_FILE = "stop"
PID_FILE = "pid"
LOG_FILE = "engine.log"
STAMP_FILE = "stamp.json"  # the data files and the settings a run started with
# What chat shows for an empty answer (the model's first token was its end of turn), in the
# terminal and the wizard alike: a blank line after the prompt read as the program hanging.
EMPTY_REPLY = ("(no answer: the model ended its reply at once; a short run or an undertrained adapter "
               "does this, more steps or data usually help)")
# Files up to this size (all of a run's data files together) are fingerprinted by their SHA-256
# (about 2 s a GiB on this project's 2-core machine, and the wizard launches on its UI thread);
# beyond it, by size and modification time.
STAMP_HASH_LIMIT = 256 * 2**20


def default_runs_dir() -> Path:
    env = os.environ.get("SNUGTUNE_RUNS_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("snugtune")) / "runs"


def runs_dir(cfg: Optional[RunConfig] = None) -> Path:
    """Where runs go: output.runs_dir, else $SNUGTUNE_RUNS_DIR, else the platform's data dir."""
    if cfg is not None and cfg.output.runs_dir:
        return Path(cfg.output.runs_dir).expanduser()
    return default_runs_dir()


def _slug(text: str) -> str:
    text = text.split(":")[-1].rstrip("/").split("/")[-1]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return (slug or "run")[:60]


def run_name(cfg: RunConfig, preset: Optional[str] = None) -> str:
    """The name a new run directory starts with (the timestamp follows it).

    output.name if set; else the preset the run came from (a name, or a TOML file's stem);
    else the data (a file's stem, a Hub dataset's name); else the model. Not the model first:
    every run of one model would share a name, and `snugtune attach NAME` could not tell them
    apart by anything but the timestamp."""
    if cfg.output.name:
        return cfg.output.name
    if preset:
        stem = Path(preset).stem if preset.endswith(".toml") or os.sep in preset else preset
        return _slug(stem)
    data = cfg.data.path
    if data and not data.startswith("REPLACE"):
        stem = data.split(":")[-1].rstrip("/").split("/")[-1]
        for suffix in (".gz", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt"):  # my.jsonl.gz -> my
            if stem.lower().endswith(suffix) and len(stem) > len(suffix):
                stem = stem[: -len(suffix)]
        return _slug(stem)
    return _slug(cfg.model.name_or_path)


def freeze_paths(cfg: RunConfig, cwd: Optional[Path] = None) -> RunConfig:
    """Relative local paths (data.path, model.name_or_path) made absolute.

    The engine runs in the run directory, and a run may be resumed from anywhere: a path that
    meant something in the launcher's working directory must keep meaning it. Names that are
    not existing local paths (Hub ids, builtin: names) are left as they are.
    """
    cwd = cwd or Path.cwd()
    changes = []
    for key, value in (("data.path", cfg.data.path), ("model.name_or_path", cfg.model.name_or_path)):
        if ":" in value.split("/")[0] or Path(value).expanduser().is_absolute():
            continue
        candidate = cwd / value
        if candidate.exists():
            changes.append(f"{key}={json.dumps(str(candidate.resolve()))}")
    return cfg.with_overrides(changes) if changes else cfg


def create_run_dir(cfg: RunConfig, header: Optional[str] = None, preset: Optional[str] = None) -> Path:
    """A new run directory (name-YYYYmmdd-HHMMSS, a suffix if taken) holding config.toml;
    the name is run_name(cfg, preset)."""
    cfg = freeze_paths(cfg)
    base = runs_dir(cfg)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the runs directory {base} ({exc.strerror})",
            hint="choose a writable place with --set output.runs_dir=/path or SNUGTUNE_RUNS_DIR",
        ) from None
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(
            f"the runs directory {base} is not writable",
            hint="choose a writable place with --set output.runs_dir=/path or SNUGTUNE_RUNS_DIR",
        )
    stem = f"{run_name(cfg, preset)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for i in range(1, 10_000):
        path = base / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir()  # atomic: two launches in the same second get different directories
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot create the run directory {path} ({exc.strerror})") from None
        try:
            cfg.write_toml(path / CONFIG_FILE, header=header or "The configuration of this run, frozen at launch.")
            stamp_data(path, cfg)
        except OSError as exc:
            # a full disk (or a quota) between mkdir and the first files: no half-made run directory
            # stays behind (it held only the cut-short temporary config and was listed nowhere)
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
            raise UserError(f"cannot write the run directory {path} ({exc.strerror}); nothing was made",
                            hint="free some disk space, or choose another place for the runs "
                                 "(output.runs_dir, SNUGTUNE_RUNS_DIR)" if full else
                                 "choose a writable place for the runs (output.runs_dir, SNUGTUNE_RUNS_DIR)") from None
        return path
    raise UserError(f"too many runs named {stem} in {base}")


def _data_files(data_path: str) -> list[Path]:
    """The local files a run's data.path names (a file, or a folder's files), or [] for a Hub or
    builtin dataset."""
    if not data_path or ":" in data_path.split("/")[0]:
        return []
    p = Path(data_path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
    return []


def _fingerprint(files: list[Path]) -> list[dict]:
    import hashlib

    total = sum(f.stat().st_size for f in files)
    out = []
    for f in files:
        st = f.stat()
        entry = {"file": str(f), "size": st.st_size}
        if total <= STAMP_HASH_LIMIT:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            entry["sha256"] = h.hexdigest()
        else:
            entry["mtime_ns"] = st.st_mtime_ns
        out.append(entry)
    return out


def stamp_data(run_dir: Path, cfg: RunConfig) -> None:
    """Record what the run's data files and settings are at launch (stamp.json), so that a resume
    can tell a file or config.toml changed under it: the checkpoint's data order indexes the rows
    the run started with, and its adapter has the shapes of the LoRA settings it was made with.
    Best effort: a file that cannot be read is the preflight's and the engine's to report."""
    stamp: dict = {"config": cfg.to_dict()}
    try:
        files = _data_files(cfg.data.path)
        if files:
            stamp.update(path=cfg.data.path, files=_fingerprint(files))
    except OSError:
        pass
    try:
        (run_dir / STAMP_FILE).write_text(json.dumps(stamp, default=str))
    except OSError:
        pass


# Settings a checkpoint depends on: the model and the adapter's shapes (a resume with another
# lora.r fails deep inside peft's loader with a page of size mismatches), and the data (its order).
# The rest (max_steps, save and eval steps, the GPU budget ...) may change between attempts.
RESUME_FIXED = ("model.", "lora.", "data.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_change(run_dir: Union[str, Path]) -> Optional[str]:
    """The settings a checkpoint depends on that config.toml no longer has as at launch, or None."""
    try:
        before = json.loads((Path(run_dir) / STAMP_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    now = RunConfig.from_toml(Path(run_dir) / CONFIG_FILE).to_dict()  # a broken edit is its own message
    a, b = _flat(before), _flat(json.loads(json.dumps(now, default=str)))  # as stored: lists, not tuples
    changed = [k for k in sorted(set(a) | set(b)) if k.startswith(RESUME_FIXED) and a.get(k) != b.get(k)]
    if not changed:
        return None
    shown = ", ".join(f"{k}: {json.dumps(a.get(k))} then, {json.dumps(b.get(k))} now" for k in changed[:3])
    return shown + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")


def data_change(run_dir: Union[str, Path]) -> Optional[str]:
    """What changed in the run's data files since it started (one phrase), or None: unchanged, or
    no stamp (a Hub dataset, a run made before stamps)."""
    try:
        stamp = json.loads((Path(run_dir) / STAMP_FILE).read_text())
        before = {e["file"]: e for e in stamp["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = stamp.get("path", "")
    files = _data_files(path)
    if not files:
        return f"{path} is gone"
    try:
        now = {e["file"]: e for e in _fingerprint(files)}
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    added, removed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
    if added or removed:
        parts = ([f"{len(added)} file(s) added ({Path(added[0]).name}{', ...' if len(added) > 1 else ''})"] if added else []) + \
                ([f"{len(removed)} removed ({Path(removed[0]).name}{', ...' if len(removed) > 1 else ''})"] if removed else [])
        return f"{path}: " + ", ".join(parts)
    for f, e in now.items():
        b = before[f]
        if e != b and (b.get("sha256") is None or e.get("sha256") != b.get("sha256") or e["size"] != b["size"]):
            return f"{f} changed ({b['size']:,} bytes then, {e['size']:,} now)" if e["size"] != b["size"] \
                else f"{f} changed (same size, {'other contents' if 'sha256' in b else 'modified since'})"
    return None


def check_resumable(run_dir: Union[str, Path]) -> None:
    """Refuse to resume a run whose data changed since it started: the checkpoint carries on the
    data order of the rows it was planned on (and the step count, the schedule), so on other rows
    it would silently train a mix the user never asked for."""
    run_dir = Path(run_dir)
    change = config_change(run_dir)
    if change:
        raise UserError(f"cannot resume {run_dir.name}: {CONFIG_FILE} changed since it started ({change}); "
                        "a checkpoint continues only with the model, LoRA and data settings it was made with",
                        hint=f"put those settings back to resume, or train them as a new run: "
                        f"snugtune train {run_dir / CONFIG_FILE}")
    change = data_change(run_dir)
    if change:
        raise UserError(f"cannot resume {run_dir.name}: its data changed since it started ({change})",
                        hint=f"put the data back as it was to resume, or train the new data as a new run: "
                        f"snugtune train {run_dir / CONFIG_FILE}")


def log_size(run_dir: Union[str, Path]) -> int:
    """The size of a run's events.jsonl now (0 if none): where the next attempt's events begin."""
    try:
        return (Path(run_dir) / EVENTS_FILE).stat().st_size
    except OSError:
        return 0


def _unwritable(run_dir: Path, exc: OSError) -> UserError:
    return UserError(
        f"cannot write to the run directory {run_dir} ({exc.strerror or exc})",
        hint="make it writable again (e.g. `chmod -R u+w` on it, or free disk space), then resume",
    )


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def engine_command(run_dir: Path) -> list[str]:
    """The engine, or with gpu.nproc > 1 the supervisor that starts N of it under torchrun (core.distributed)."""
    try:
        nproc = RunConfig.from_toml(Path(run_dir) / CONFIG_FILE).gpu.nproc or 1
    except Exception:  # noqa: BLE001 - a config the engine cannot read either: it says why in its log
        nproc = 1
    return [sys.executable, "-m", "core.distributed" if nproc > 1 else "core.train", str(run_dir)]


def quiet_env(env: dict) -> dict:
    """`env` with progress bars off, for the engine and the wizard's pre-run check: their output is
    read as text (engine.log: the wizard's error tail, `snugtune attach`'s died message; the check's
    last line when it crashes), where bars redrawn with carriage returns (model loading's "Loading
    weights", Hub downloads) are noise; setup says what it does through setup_progress events. A
    user's own setting of either variable stands."""
    env = dict(env)
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # huggingface_hub's and transformers' bars
    env.setdefault("TQDM_DISABLE", "1")  # tqdm's default for every bar (the GGUF loader's own)
    return env


def spawn(run_dir: Union[str, Path], extra_env: Optional[dict] = None) -> subprocess.Popen:
    """Start `python -m core.train RUN_DIR` in its own session, output to engine.log.

    Its own session: closing the terminal (SIGHUP) or Ctrl-C in it does not reach the engine;
    viewers ask it to stop through the `stop` file or SIGTERM (request_stop).
    """
    run_dir = Path(run_dir).resolve()
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    env = dict(os.environ)
    # Fewer fragmentation OOMs on small cards; harmless on the CPU.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env["PYTHONPATH"] = _package_root() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env = quiet_env(env)
    if extra_env:
        env.update(extra_env)
    try:
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        # the engine writes here; a directory it cannot write is said now, not as its traceback
        for name in (EVENTS_FILE, LOG_FILE):
            with open(run_dir / name, "ab"):
                pass
        log = open(run_dir / LOG_FILE, "ab")
    except OSError as exc:
        raise _unwritable(run_dir, exc) from None
    with log:
        proc = subprocess.Popen(
            engine_command(run_dir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(run_dir),
            start_new_session=True,
        )
    try:
        (run_dir / PID_FILE).write_text(f"{proc.pid}\n")
    except OSError as exc:
        proc.kill()
        proc.wait()
        raise _unwritable(run_dir, exc) from None
    return proc


def _reap(proc: subprocess.Popen) -> None:
    # A long-lived launcher (the wizard) must wait for its children or they linger as zombies.
    threading.Thread(target=proc.wait, daemon=True, name=f"reap-{proc.pid}").start()


def launch(target: Union[RunConfig, str, Path], detach: bool = True) -> int:
    """Start the engine on a run directory (or on a new one made from a RunConfig); returns its pid.

    The engine always runs as its own process in its own session, so it survives the terminal
    or wizard that started it. `detach=False` is for callers that will follow it at once.
    """
    run_dir = create_run_dir(target) if isinstance(target, RunConfig) else Path(target)
    proc = spawn(run_dir)
    _reap(proc)
    return proc.pid


def resolve_run(name_or_dir: Union[str, Path], base: Optional[Path] = None) -> Path:
    """A run directory from its path, its name, or a unique prefix of its name."""
    path = Path(name_or_dir).expanduser()
    if (path / CONFIG_FILE).is_file():
        return path.resolve()
    base = base or default_runs_dir()
    name = str(name_or_dir)
    if (base / name / CONFIG_FILE).is_file():
        return (base / name).resolve()
    matches = sorted(p for p in base.glob(f"{glob_escape(name)}*") if (p / CONFIG_FILE).is_file()) if base.is_dir() else []
    if len(matches) == 1:
        return matches[0].resolve()
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches[:8]) + (" ..." if len(matches) > 8 else "")
        raise UserError(f"{name!r} matches several runs: {names}",
                        hint=f"give the full name (the newest is {matches[-1].name}) or the directory")
    raise UserError(f"no run named {name!r} in {base}", hint="`snugtune runs` lists the runs; or give a run directory")


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


# The ETA's window: the time of the most recent steps, not of all since the start. Under load (other
# jobs on the machine, a laptop that throttles) the step time moves; an average since the start
# lagged it by the whole run (100 steps at 1 s, then 3 s each: the start's average said 200 steps
# left were 200 s more for hundreds of steps). 32 logged steps: long enough that one slow step (a
# checkpoint save, an eval) moves the estimate by a few percent, short enough to follow a change.
ETA_WINDOW_STEPS = 32


class StepRate:
    """The seconds a step from the recent steps, for the engine's ETA (`step_logged`'s eta_s).

    add(step, time) at the start of training and at each logged step. The first step after a
    (re)start is left out once later ones exist: it holds the warm-up (allocator growth, CUDA-graph
    capture, compilation), which the steps after it do not repeat."""

    def __init__(self, window: int = ETA_WINDOW_STEPS):
        self.window = window
        self.points: list[tuple[int, float]] = []

    def add(self, step: int, t: float) -> None:
        if self.points and step <= self.points[-1][0]:
            return  # the same step logged twice (a log after an eval): nothing new about its time
        self.points.append((int(step), float(t)))
        if len(self.points) > 2 * self.window + 2:
            self.points = self.points[:2] + self.points[-self.window - 1:]

    def seconds_per_step(self) -> Optional[float]:
        pts = self.points[1:] if len(self.points) > 2 else self.points  # without the warm-up step
        if len(pts) < 2:
            return None
        last_step, last_t = pts[-1]
        first = next(((s, t) for s, t in pts if last_step - s <= self.window), pts[0])
        if first[0] == last_step:  # one step logged a window apart: the two latest points
            first = pts[-2]
        return max(last_t - first[1], 0.0) / (last_step - first[0])

    def eta(self, remaining_steps: int) -> Optional[float]:
        per = self.seconds_per_step()
        return None if per is None else per * max(remaining_steps, 0)


STATUS_OF = {"run_finished": "finished", "run_failed": "failed", "run_stopped": "stopped"}


def run_status(run_dir: Union[str, Path]) -> dict:
    """A summary of one run: name, dir, status, step/total, last loss, started, error.

    Never raises for a damaged run: a log that cannot be read gives status "unreadable" with
    the reason in `error`; lines of it that are not events are skipped and counted in
    `log_skipped` (`log_note` says which). The status is the current attempt's (a resumed run
    is "running" from its launch on, though its log still ends with the earlier `run_stopped`).
    """
    run_dir = Path(run_dir)
    log = read_log(run_dir)
    events = log.events
    summary: dict = {
        "name": run_dir.name,
        "dir": str(run_dir),
        "status": "created",
        "step": 0,
        "total_steps": None,
        "loss": None,
        "eval_loss": None,
        "started": None,
        "ended": None,
        "model": None,
        "error": None,
        "adapter": None,
        "pid": read_pid(run_dir),
        "log_skipped": len(log.skipped),
        "log_note": log.skipped_note(),
    }
    for e in events:
        kind = e.get("event")
        if kind == "run_started":
            summary["started"] = summary["started"] or e.get("time")
            summary["total_steps"] = e.get("total_steps")
            summary["model"] = ((e.get("config") or {}).get("model") or {}).get("name_or_path")
        elif kind == "step_logged":
            summary["step"] = e.get("step", summary["step"])
            summary["total_steps"] = e.get("total_steps") or summary["total_steps"]
            summary["loss"] = e.get("loss", summary["loss"])
        elif kind == "eval_logged":
            summary["eval_loss"] = e.get("eval_loss")
    current = attempt_index(log, run_dir)
    if current < len(events):
        summary["attempt_started"] = events[current].get("time")
    else:
        try:
            summary["attempt_started"] = (run_dir / PID_FILE).stat().st_mtime
        except OSError:
            summary["attempt_started"] = None
    terminal = next((e for e in reversed(events[current:]) if e.get("event") in TERMINAL_EVENTS), None)
    if summary["started"] is None:
        try:
            summary["started"] = (run_dir / CONFIG_FILE).stat().st_mtime
        except OSError:
            pass
    alive = summary["pid"] is not None and pid_alive(summary["pid"])
    if log.error is not None:
        summary["status"] = "running" if alive else "unreadable"
        summary["error"] = log.error
    elif terminal is not None:
        summary["ended"] = terminal.get("time")
        summary["status"] = STATUS_OF[terminal["event"]]
        if terminal["event"] == "run_failed":
            summary["error"] = terminal.get("error")
            summary["failure_kind"] = terminal.get("kind")
        if terminal["event"] == "run_finished":
            summary["adapter"] = terminal.get("adapter_path")
            summary["step"] = terminal.get("steps", summary["step"])
            summary["loss"] = terminal.get("final_loss", summary["loss"])
        if terminal["event"] == "run_stopped":
            summary["step"] = terminal.get("step", summary["step"])
    elif alive:
        summary["status"] = "running"
    elif summary["pid"] is not None:
        summary["status"] = "died"
    return summary


def list_runs(base: Optional[Path] = None) -> list[dict]:
    """Summaries of every run under the runs directory, oldest first."""
    base = base or default_runs_dir()
    if not base.is_dir():
        return []
    try:
        entries = list(base.iterdir())
    except OSError as exc:
        raise UserError(f"cannot list the runs directory {base} ({exc.strerror or exc})",
                        hint="check its permissions, or point SNUGTUNE_RUNS_DIR elsewhere") from None
    # a name starting with "." is a run being removed (remove_run renames it first)
    runs = [run_status(p) for p in entries if not p.name.startswith(".") and (p / CONFIG_FILE).is_file()]
    return sorted(runs, key=lambda r: (r["started"] or 0, r["name"]))


def request_stop(run_dir: Union[str, Path]) -> bool:
    """Ask a run's engine to save a checkpoint and stop; returns whether it was running."""
    run_dir = Path(run_dir)
    if run_status(run_dir)["status"] not in ("running", "created"):
        return False  # finished, failed, stopped or died: nothing to stop (its process may be exiting)
    try:
        (run_dir / STOP_FILE).write_text(f"{time.time()}\n")
    except OSError as exc:
        raise UserError(f"cannot write {run_dir / STOP_FILE} ({exc.strerror})") from None
    pid = read_pid(run_dir)
    if pid is None or not pid_alive(pid):
        return False
    if not _attempt_has_events(run_dir):
        # The engine has not written a line of this attempt yet: it is still importing torch, before
        # its signal handlers exist, and a SIGTERM would kill it without a word (a Ctrl-C in the first
        # seconds of `snugtune train` showed as "died"). The stop file alone is enough: the engine
        # reads it between its setup stages and stops there with run_stopped, checkpoints intact.
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def deleted_run(event: dict, run_dir: Union[str, Path], pid: Optional[int]) -> dict:
    """A follower's synthetic "died" event, told apart from a real death when the run directory
    itself is gone (deleted from another terminal, `snugtune runs rm` racing, a cleaned /tmp): the
    pid file went with it, so the engine looked dead while it may still be training into a folder
    that no longer exists, where it can save nothing. Any other event is returned as it is."""
    run_dir = Path(run_dir)
    if not event.get("synthetic") or run_dir.exists():
        return event
    error = f"the run directory {run_dir} was deleted while the run was followed"
    if pid is not None and pid_alive(pid):
        error += f"; its engine (pid {pid}) still runs and can save nothing there: end it with `kill {pid}`"
    return {**event, "kind": "deleted", "error": error}


def _attempt_has_events(run_dir: Path) -> bool:
    from core.events import current_attempt

    return log_size(run_dir) > current_attempt(run_dir)


def still_starting(run_dir: Union[str, Path]) -> bool:
    """Whether the run's engine has not written a line of its current attempt yet (importing torch)."""
    return not _attempt_has_events(Path(run_dir))


def setting_up(run_dir: Union[str, Path]) -> bool:
    """Whether the run's current attempt has not started training yet (no run_started: importing
    torch, resolving the model, reading the data, loading the weights): a stop then saves nothing."""
    from core.events import current_attempt

    start = current_attempt(Path(run_dir))
    log = read_log(run_dir)
    return not any(e.get("event") == "run_started" for e, end in zip(log.events, log.ends) if end > start)


STOP_IN_SETUP = "stopping: the run is still setting up and stops once the stage it is in ends (nothing trained yet, nothing to save)"


def remove_run(run_dir: Union[str, Path]) -> None:
    """Delete a run directory and everything in it; refuses a running run (stop it first)."""
    import shutil

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); nothing removed")
    status = run_status(run_dir)
    if status["status"] == "running":
        raise UserError(f"run {run_dir.name} is running (pid {status['pid']}); nothing removed",
                        hint=f"stop it first: `snugtune stop {run_dir.name} --wait`")
    # Renamed first, then deleted: an interrupted delete leaves no half run that `runs` would list.
    doomed = run_dir.with_name(f".{run_dir.name}.removing")
    try:
        run_dir.rename(doomed)
        shutil.rmtree(doomed)
    except OSError as exc:
        raise UserError(f"cannot remove {run_dir} ({exc.strerror or exc})",
                        hint="check the permissions of the runs directory") from None


def last_checkpoint(run_dir: Union[str, Path]) -> Optional[Path]:
    """The newest checkpoints/checkpoint-N directory, if any (no torch needed)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    best: tuple[int, Optional[Path]] = (-1, None)
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", p.name)
            if m and p.is_dir() and int(m.group(1)) > best[0]:
                best = (int(m.group(1)), p)
    return best[1]


# ---- checkpoints: complete or absent, verified before a resume trusts them ----------------------

CHECKPOINTS_DIR = "checkpoints"
# The engine writes each checkpoint under this directory and renames it into checkpoints/ when
# every file is written: a checkpoint-N that exists is complete (the Trainer's own names never
# match it, so neither its resume nor its rotation sees a half-written one).
STAGING_DIR = ".partial"
# What a resume reads: the adapter, the optimizer and scheduler, the Trainer's counters, the RNG.
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json",
                    "optimizer.pt", "scheduler.pt", "rng_state.pth")


def checkpoints(run_dir: Union[str, Path]) -> list[tuple[int, Path]]:
    """(step, path) of each checkpoints/checkpoint-N directory, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    for p in entries:
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _check_safetensors(path: Path) -> Optional[str]:
    # The format: an 8-byte little-endian header length, a JSON header giving each tensor's byte
    # range, then the data. A truncated file is shorter than the largest range's end.
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "truncated (no header)"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return "truncated (header cut off)"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return "damaged header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if not ends or 8 + n + max(ends) != size:
        return f"truncated ({size} bytes, the header describes {8 + n + max(ends, default=0)})"
    return None


def _check_torch_zip(path: Path) -> Optional[str]:
    # torch.save writes a zip archive with a CRC for every record: a truncated or overwritten
    # file fails to open or fails its CRC, without unpickling anything.
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"not a complete torch file ({type(exc).__name__}: {exc})" if str(exc) else "not a complete torch file"
    return f"damaged record {bad}" if bad else None


def verify_checkpoint(path: Union[str, Path]) -> Optional[str]:
    """None if the checkpoint's files are all there and whole; else what is wrong, naming the file."""
    path = Path(path)
    names = list(CHECKPOINT_FILES)
    if not (path / "rng_state.pth").is_file():
        # a run on several processes (core.distributed): the Trainer writes one RNG state a rank
        ranked = sorted(p.name for p in path.glob("rng_state_*.pth"))
        if ranked:
            names = [n for n in names if n != "rng_state.pth"] + ranked
    for name in names:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        try:
            if name.endswith(".json"):
                data = json.loads(f.read_text(encoding="utf-8"))
                if name == "trainer_state.json" and not isinstance(data.get("global_step"), int):
                    return f"{name} has no global_step"
                problem = None
            elif name.endswith(".safetensors"):
                problem = _check_safetensors(f)
            else:
                problem = _check_torch_zip(f)
        except (OSError, ValueError, UnicodeDecodeError, AttributeError) as exc:
            problem = f"unreadable ({type(exc).__name__}: {exc})"
        if problem:
            return f"{name}: {problem}"
    return None


def set_aside_checkpoint(path: Path) -> Path:
    """Rename a damaged checkpoint to damaged-checkpoint-N (kept for a look, out of every resume's way)."""
    for i in range(1, 1000):
        target = path.with_name(f"damaged-{path.name}" + ("" if i == 1 else f"-{i}"))
        if not target.exists():
            path.rename(target)
            return target
    raise UserError(f"too many damaged copies of {path.name} in {path.parent}")


def dir_bytes(path: Union[str, Path]) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# ---- disk space ------------------------------------------------------------------------------------

MB = 1_000_000  # decimal megabytes, as df -H and file managers count them


class DiskSpaceError(UserError):
    """Not enough free disk space where the run writes: the figures and where."""

    exit_code = 4

    def __init__(self, path: Union[str, Path], free: int, needed: int, what: str, hint: Optional[str] = None):
        self.path, self.free_mb, self.needed_mb = str(path), round(free / MB, 1), round(needed / MB, 1)
        super().__init__(
            f"not enough disk space in {path}: {self.free_mb:,.1f} MB free, {what} needs about "
            f"{self.needed_mb:,.1f} MB",
            hint=hint or "free some space, or put the runs elsewhere (output.runs_dir or SNUGTUNE_RUNS_DIR); "
            "train.save_total_limit = 1 keeps a single checkpoint",
        )


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as this process's umask lets a new file have it."""
    old = os.umask(0)
    os.umask(old)
    return mode & ~old


def share_modes(path: Union[str, Path]) -> None:
    """Give a saved directory (or file) the umask's modes: safetensors writes its files 0600 whatever
    the umask, and an adapter, checkpoint or exported model is meant to be shared like any file."""
    path = Path(path)
    fmode, dmode = umask_mode(0o666), umask_mode(0o777)
    for p in [path, *path.rglob("*")]:
        os.chmod(p, dmode if p.is_dir() else fmode)


def file_size_limit() -> Optional[int]:
    """This process's largest writable file in bytes (`ulimit -f`), None when unlimited."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def free_bytes(path: Union[str, Path]) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding `path` (or its nearest parent)."""
    import shutil

    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


# Bytes a checkpoint holds besides adapter, optimizer and tokenizer: trainer_state.json,
# scheduler.pt, rng_state.pth, training_args.bin, README.md, adapter_config.json (measured on the
# tiny test model: 22 kB; generous for long runs, whose trainer_state.json grows with the log).
CHECKPOINT_EXTRA_BYTES = 1 * MB
# Optimizer state bytes per trainable parameter: AdamW keeps two fp32 moments; bitsandbytes' 8-bit
# AdamW two 8-bit moments plus one fp32 scale per 256-value block (core.estimate.BYTES_ADAM8).
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "adamw_8bit": 2 + 8 / 256,
                         "paged_adamw_8bit": 2 + 8 / 256, "paged_adamw_32bit": 8}
# Logs, events and a margin for the filesystem's own rounding.
DISK_MARGIN_BYTES = 8 * MB


def disk_needed(cfg: RunConfig, lora_params: int, tokenizer_bytes: int, optimizer: str, total_steps: int,
                existing_checkpoints: int = 0) -> tuple[int, int, str]:
    """(bytes the rest of the run will write at its peak, bytes of one checkpoint, what they are).

    LoRA weights are saved in fp32 (4 bytes each). The engine keeps the newest
    `train.save_total_limit` checkpoints; a new one is complete before the oldest goes, so the
    peak is one more than the limit, then the final adapter with its tokenizer."""
    adapter = lora_params * 4
    opt = int(lora_params * OPTIMIZER_STATE_BYTES.get(optimizer, 8))
    ckpt = adapter + opt + tokenizer_bytes + CHECKPOINT_EXTRA_BYTES
    saves = max(math.ceil(total_steps / max(cfg.train.save_steps, 1)), 1)
    limit = cfg.train.save_total_limit
    peak = (min(limit, saves) + 1) if limit else saves
    new = max(peak - existing_checkpoints, 1)
    final = adapter + tokenizer_bytes
    need = new * ckpt + final + DISK_MARGIN_BYTES
    what = (f"this run ({new} checkpoint{'s' if new > 1 else ''} of {ckpt / MB:,.1f} MB: adapter "
            f"{adapter / MB:,.1f}, optimizer states {opt / MB:,.1f}, tokenizer {tokenizer_bytes / MB:,.1f}; "
            f"then the final adapter)")
    return need, ckpt, what


def check_disk_space(path: Union[str, Path], need: int, what: str) -> None:
    free = free_bytes(path)
    if free < need:
        raise DiskSpaceError(path, free, need, what)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model", "sentencepiece.bpe.model")
# A Hub tokenizer not in the cache yet: the largest common one, Gemma's tokenizer.json, is 33 MB.
UNKNOWN_TOKENIZER_BYTES = 35 * MB


def tokenizer_bytes(source: Union[str, Path, None]) -> int:
    """What saving the model's tokenizer writes, from the files of a local source directory."""
    if source is None or not Path(str(source)).is_dir():
        return UNKNOWN_TOKENIZER_BYTES
    total = 0
    for name in TOKENIZER_FILES:
        try:
            total += (Path(str(source)) / name).stat().st_size
        except OSError:
            pass
    return total or UNKNOWN_TOKENIZER_BYTES


# ---- preflight: a run's mistakes said before its run directory exists ------------------------------

# The check imports transformers and reads the data: seconds, on a cold disk a minute; a Hub model's
# config.json and tokenizer may be fetched. A preflight that takes longer than this is not waited for.
PREFLIGHT_TIMEOUT_S = 600


def preflight(cfg: RunConfig, in_process: bool = False, hint_syntax: str = "train") -> dict:
    """Check the data, model, tokenizer, GPU profile and disk space of a run before it is created
    (core.preflight); raises the UserError the engine would have failed with.

    Torch-free for the caller: by default the check runs in a subprocess
    (`python -m core.preflight`), so the wizard can call this from a worker thread. The CLI,
    which imports the engine anyway, passes in_process=True. `hint_syntax`: 'wizard' words the
    hints with the wizard's fields and keys (core.data.hint_syntax)."""
    if in_process:
        from core.preflight import check

        return check(freeze_paths(cfg))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="snugtune-preflight-") as tmp:
        path = freeze_paths(cfg).write_toml(Path(tmp) / CONFIG_FILE, overwrite=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = _package_root() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env = quiet_env(env)
        try:
            proc = subprocess.run([sys.executable, "-m", "core.preflight", str(path), "--hint-syntax", hint_syntax],
                                  capture_output=True,
                                  text=True, env=env, timeout=PREFLIGHT_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise UserError(f"checking the data and the model took over {PREFLIGHT_TIMEOUT_S} s",
                            hint="a slow disk or network: try again, or start the run with `snugtune train`") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the pre-run check crashed ({tail})", hint="start the run anyway with `snugtune train`; "
                        "its engine.log will have the details") from None
    if answer.get("ok"):
        return answer
    err = UserError(answer.get("error") or "the pre-run check failed", hint=answer.get("hint"))
    err.exit_code = int(answer.get("exit_code") or 2)
    raise err
