"""Shared helpers of the wizard's tests (no tests here): tmp dirs, tiny data, waiting, run logs."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

# Long enough for a `data inspect` subprocess (tokenizer build) on a busy 2-core machine: a deadline,
# not a duration (importing core.train alone took 24 s at load 5 on the 2-core dev machine; 60 s was
# too close for a loaded CI machine).
WAIT_S = 300.0


async def wait_for(pilot, predicate, timeout: float = WAIT_S, what: str = "condition"):
    """Poll `predicate()` between frames until it is true; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - a widget not mounted yet reads as "not yet"
            pass
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def status_text(app) -> str:
    return str(app.screen.query_one("#status").render())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


QA_ROWS = [
    {"question": "What is 2+2?", "answer": "4"},
    {"question": "Capital of France?", "answer": "Paris"},
    {"question": "Colour of the sky?", "answer": "Blue, mostly."},
    {"question": "Largest planet?", "answer": "Jupiter"},
]


def write_events(run_dir: Path, events: list[dict]) -> None:
    """A run's events.jsonl as the engine writes it (core.events.EventWriter)."""
    from core.events import EventWriter

    with EventWriter(run_dir) as w:
        for e in events:
            e = dict(e)
            w.emit(e.pop("event"), **e)


def finished_run(base: Path, name: str = "demo-run") -> Path:
    """A run directory holding a finished run's log (the engine's pid file names a dead pid)."""
    from core.presets import load_preset

    run_dir = base / name
    run_dir.mkdir(parents=True)
    cfg = load_preset("demo").with_overrides(["gpu.profile='gtx-1650'"])
    cfg.write_toml(run_dir / "config.toml")
    steps = 8
    # fixed event times (the writer keeps a given one), 2 s a step: the panel's elapsed time must
    # not depend on how fast this machine writes the log
    t0 = 1_700_000_000.0
    events = [{"event": "run_started", "time": t0, "config": cfg.to_dict(), "versions": {}, "total_steps": steps,
               "device": {"type": "cpu", "name": "cpu"}, "resumed_from": None}]
    for s in range(1, steps + 1):
        events.append({"event": "step_logged", "time": t0 + 2 * s, "step": s, "total_steps": steps, "epoch": s / steps,
                       "loss": 8.0 - 0.5 * s, "learning_rate": 1e-3, "grad_norm": 1.0, "tokens_per_s": 900.0,
                       "mem_allocated_gib": None, "mem_reserved_gib": None, "eta_s": (steps - s) * 2.0})
        if s == 4:
            events.append({"event": "eval_logged", "step": 4, "eval_loss": 6.5})
            events.append({"event": "checkpoint_saved", "step": 4, "path": str(run_dir / "checkpoints/checkpoint-4")})
    events.append({"event": "run_finished", "time": t0 + 2 * steps, "adapter_path": str(run_dir / "adapter"), "steps": steps,
                   "final_loss": 4.0, "runtime_s": 16.0})
    write_events(run_dir, events)
    (run_dir / "pid").write_text("999999999\n")  # no such process: the run is over
    return run_dir


@pytest.fixture
def wizard_env(tmp_path, monkeypatch):
    """Runs and presets in tmp dirs; the Hub off (these machines cannot reach it)."""
    runs, config = tmp_path / "runs", tmp_path / "config"
    runs.mkdir()
    config.mkdir()
    monkeypatch.setenv("SNUGTUNE_RUNS_DIR", str(runs))
    monkeypatch.setenv("SNUGTUNE_CONFIG_DIR", str(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    return {"runs": runs, "config": config, "tmp": tmp_path}


def demo_app(profile: str = "gtx-1650", overrides: list[str] | None = None, **kwargs):
    """The wizard on the demo preset, planning for a fixed GPU profile (no detection)."""
    from core.presets import load_preset
    from tui.app import SnugtuneApp

    cfg = load_preset("demo").with_overrides([f"gpu.profile='{profile}'"] + (overrides or []))
    return SnugtuneApp(cfg, preset_name="demo", gpus=[], check_runs=kwargs.pop("check_runs", False), **kwargs)


def run_async(coro):
    return asyncio.get_event_loop().run_until_complete(coro)


def fixed_estimate(verdict: str = "fits", total: float = 2.6, budget: float = 3.82):
    """An estimate with fixed numbers, so snapshots of the settings screen pin the screen's
    look and not the estimator's calibration (core.estimate has its own tests)."""
    from types import SimpleNamespace

    parts = {"weights": 0.45, "adapters": 0.03, "gradients": 0.03, "optimizer": 0.02,
             "activations": 0.9, "logits": 0.5, "workspace": 0.2, "cuda_context": 0.35}
    scale = total / sum(parts.values())
    comps = {k: round(v * scale, 2) for k, v in parts.items()}
    est = SimpleNamespace(components=comps, total_gib=total, budget_gib=budget, verdict=verdict)
    plain = SimpleNamespace(components=comps, total_gib=round(total * 2.1, 2), budget_gib=budget,
                            verdict="does not fit" if total * 2.1 > budget else "fits")
    return est, plain


async def pin_estimate(pilot, app, verdict: str = "fits", total: float = 2.6) -> None:
    """Show fixed_estimate() on the settings screen, once the real one (and any debounced
    refresh from the fields' first Changed events) is done, so nothing overwrites it."""
    from tui.screens.settings import DEBOUNCE_S

    # the model lookup runs in a worker and re-estimates when it lands: wait for it first
    await wait_for(pilot, lambda: app.spec is not None and app.last_estimate is not None, what="the estimate")
    # and the data statistics the settings step reads in the background (time per epoch)
    await wait_for(pilot, lambda: not app.screen.data_pending, what="the data statistics")
    await pilot.pause(DEBOUNCE_S + 0.3)
    est, plain = fixed_estimate(verdict, total)
    screen = app.screen
    if screen._timer is not None:
        screen._timer.stop()
    screen.render_estimate(est, plain, 0.8, app.estimate_config())


async def steady(pilot) -> None:
    """Stop the text cursor blinking, so a screenshot does not depend on when it is taken."""
    from textual.widgets import Input

    for screen in pilot.app.screen_stack:
        for widget in screen.query(Input):
            widget.cursor_blink = False
    await pilot.pause()
