"""Each step pinned at 80x24 with pytest-textual-snapshot. Deterministic: a fixed GPU profile
(never the detected card), no detection (`gpus=[]`), a run directory with a fixed name and a
synthetic event log, tiny local data. Update with `pytest --snapshot-update` after a deliberate
change, and look at the report it writes."""
from __future__ import annotations

from textual.widgets import Input, Static

from test_tui_helpers import (QA_ROWS, demo_app, finished_run, pin_estimate, steady, wait_for,  # noqa: F401
                              wizard_env, write_jsonl)
from tui.app import SnugtuneApp

SIZE = (80, 24)


def test_gpu_step(snap_compare, wizard_env):
    assert snap_compare(SnugtuneApp(gpus=[], check_runs=False), terminal_size=SIZE)


def test_model_step(snap_compare, wizard_env):
    app = demo_app("rtx-3060-12gb")

    async def run_before(pilot):
        await pilot.press("ctrl+b", "ctrl+b")  # settings -> data -> model
        await wait_for(pilot, lambda: app.spec is not None, what="the demo model")
        await pilot.press("down", "down")  # a catalog row's details
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_data_step(snap_compare, wizard_env):
    data = write_jsonl(wizard_env["tmp"] / "qa.jsonl", QA_ROWS)
    app = demo_app("rtx-3060-12gb", [f"data.path='{data}'"])

    async def run_before(pilot):
        await pilot.press("ctrl+b")
        await wait_for(pilot, lambda: "Paris" in str(app.screen.query_one("#samples", Static).render()),
                       what="the preview")
        # the path is a tmp dir that changes per run: show a fixed one
        app.screen.query_one("#path", Input).value = "qa.jsonl"
        app.screen.set_status("qa.jsonl: instruction format, 4 samples", "ok")
        app.set_focus(None)
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_settings_step(snap_compare, wizard_env):
    app = demo_app("gtx-1650", ["model.name_or_path='Qwen/Qwen2.5-0.5B'", "data.max_seq_len=2048"])

    async def run_before(pilot):
        await wait_for(pilot, lambda: "fits" in str(app.screen.query_one("#totals").render()), what="the estimate")
        await pin_estimate(pilot, app)
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_settings_step_with_errors(snap_compare, wizard_env):
    app = demo_app("gtx-1650", ["model.name_or_path='Qwen/Qwen2.5-1.5B'", "data.max_seq_len=16384",
                                "train.micro_batch=8"])

    async def run_before(pilot):
        app.screen.query_one("#lora-r", Input).value = "0"
        await pilot.pause(0.5)
        await wait_for(pilot, lambda: app.screen.query_one("#lora-r-error").display, what="the field error")
        await pin_estimate(pilot, app, "does not fit", 9.4)
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_train_ready(snap_compare, wizard_env):
    app = demo_app("gtx-1650")

    async def run_before(pilot):
        await wait_for(pilot, lambda: app.last_estimate is not None, what="the estimate")
        await pin_estimate(pilot, app)
        await pilot.press("ctrl+n")
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_train_live_panel(snap_compare, wizard_env):
    run_dir = finished_run(wizard_env["runs"], "demo-run")
    app = SnugtuneApp(demo_app("gtx-1650").config(), attach=run_dir, gpus=[])

    async def run_before(pilot):
        await wait_for(pilot, lambda: app.screen.state == "finished", what="the replayed run")
        await pilot.pause(0.7)  # the plot redraws on a timer
        app.screen.set_status("finished · ctrl+n: chat, export, save")
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_done_step(snap_compare, wizard_env):
    run_dir = finished_run(wizard_env["runs"], "demo-run")
    app = SnugtuneApp(demo_app("gtx-1650").config(), attach=run_dir, gpus=[])

    async def run_before(pilot):
        await wait_for(pilot, lambda: app.screen.state == "finished", what="the replayed run")
        await pilot.press("ctrl+n")
        info = app.screen.query_one("#adapter-info", Static)
        # the tmp path differs per run; the text around it is what is pinned
        info.update(str(info.render()).replace(str(wizard_env["runs"]), "RUNS"))
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_save_preset_prompt(snap_compare, wizard_env):
    app = demo_app("gtx-1650")

    async def run_before(pilot):
        await wait_for(pilot, lambda: app.last_estimate is not None, what="the estimate")
        await pin_estimate(pilot, app)
        await pilot.press("ctrl+s")
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_settings_step_no_color(snap_compare, wizard_env, monkeypatch):
    # NO_COLOR: the bar's parts, the verdicts and the errors must still read (characters, words)
    monkeypatch.setenv("NO_COLOR", "1")
    app = demo_app("gtx-1650", ["model.name_or_path='Qwen/Qwen2.5-1.5B'", "data.max_seq_len=4096"])

    async def run_before(pilot):
        await wait_for(pilot, lambda: app.last_estimate is not None, what="the estimate")
        await pin_estimate(pilot, app, "does not fit", 5.2)
        await steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_gpu_step_with_a_detected_card(snap_compare, wizard_env):
    from core.gpu import GpuInfo

    card = GpuInfo(index=0, name="NVIDIA GeForce RTX 3060", total_gib=11.76, used_gib=0.9, free_gib=10.86,
                   compute_capability=(8, 6), bf16=True, driver="550.54",
                   processes=[(1234, "Xorg", 0.6), (2345, "firefox", 0.3)])
    assert snap_compare(SnugtuneApp(gpus=[card], check_runs=False), terminal_size=SIZE)
