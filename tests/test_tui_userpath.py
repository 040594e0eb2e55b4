"""What a user saw walking the wizard in tmux (session 5), one test per defect: text that Rich
read as markup and dropped, a directory of data shards refused by the data step."""
from __future__ import annotations

from test_tui_helpers import (  # noqa: F401
    QA_ROWS,
    finished_run,
    status_text,
    wait_for,
    wizard_env,
    write_jsonl,
)

SIZE = (80, 24)


async def test_the_export_dialog_says_the_whole_pip_command(wizard_env):
    # "[gguf]" was taken for a markup tag and dropped: the dialog said "pip install 'snugtune'",
    # which installs nothing new
    from test_tui_helpers import demo_app
    from textual.widgets import Static

    from tui.app import SnugtuneApp
    from tui.screens.done import DoneScreen, ExportChoiceScreen

    run_dir = finished_run(wizard_env["runs"])
    app = SnugtuneApp(demo_app().config(), attach=run_dir, gpus=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.screen.state == "finished", what="the replayed run")
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: isinstance(app.screen, DoneScreen), what="the done step")
        await pilot.press("ctrl+e")
        await wait_for(pilot, lambda: isinstance(app.screen, ExportChoiceScreen), what="the export choice")
        hint = str(app.screen.query_one(".hint", Static).render())
        assert "pip install 'snugtune[gguf]'" in hint, hint


async def test_a_question_with_brackets_is_shown_as_written(wizard_env):
    from test_tui_helpers import demo_app
    from textual.widgets import Static

    from tui.app import SnugtuneApp
    from tui.screens.modals import ConfirmScreen

    app: SnugtuneApp = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(ConfirmScreen("Delete run [old]/demo-1 and [/tmp]?"))
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen.query(".dialog-title"),
                       what="the question")
        shown = str(app.screen.query_one(".dialog-title", Static).render())
        assert "[old]/demo-1 and [/tmp]" in shown, shown


async def test_the_data_step_reads_a_directory_of_shards(wizard_env):
    from test_tui_helpers import demo_app

    from tui.screens.data import DataScreen

    shards = wizard_env["tmp"] / "shards"
    shards.mkdir()
    write_jsonl(shards / "train-00000-of-00002.jsonl", QA_ROWS)
    write_jsonl(shards / "train-00001-of-00002.jsonl", QA_ROWS)
    app = demo_app("gtx-1650", [f"data.path='{shards}'"])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+b")
        assert isinstance(app.screen, DataScreen)
        # before: "is a directory; give a .jsonl ... file in it", and no preview
        await wait_for(pilot, lambda: "8 samples" in status_text(app), timeout=300, what="the preview")
        assert "instruction format" in status_text(app)
        assert ".tsv" in str(app.screen.query_one(".title").render())  # the step names every type it reads


def died_run(base, name="demo-killed"):
    """A run whose engine was killed (kill -9) after step 3 and checkpoint 2: no terminal event,
    its pid file names a dead process, engine.log ends in a warning it printed earlier."""
    from test_tui_helpers import write_events

    from core.presets import load_preset

    run_dir = base / name
    run_dir.mkdir(parents=True)
    cfg = load_preset("demo").with_overrides(["gpu.profile='gtx-1650'"])
    cfg.write_toml(run_dir / "config.toml")
    t0 = 1_700_000_000.0
    events = [{"event": "run_started", "time": t0, "config": cfg.to_dict(), "versions": {}, "total_steps": 10,
               "device": {"type": "cpu", "name": "cpu"}, "resumed_from": None}]
    for s in (1, 2, 3):
        events.append({"event": "step_logged", "time": t0 + s, "step": s, "total_steps": 10, "epoch": s / 10,
                       "loss": 8.0 - s / 10, "learning_rate": 1e-3, "grad_norm": 1.0, "tokens_per_s": 900.0,
                       "mem_allocated_gib": None, "mem_reserved_gib": None, "eta_s": 7.0})
        if s == 2:
            events.append({"event": "checkpoint_saved", "step": 2, "path": str(run_dir / "checkpoints/checkpoint-2")})
    write_events(run_dir, events)
    (run_dir / "engine.log").write_text(
        "loading the model\n"
        "/venv/lib/python3.11/site-packages/transformers/modeling_utils.py:3312: FutureWarning: "
        "`is_gradient_checkpointing` is deprecated\n  warnings.warn(\n"
        "Loading weights:  97%|█████████▋| 37/38 [00:01<00:00, 21.07it/s]\n", encoding="utf-8")
    (run_dir / "pid").write_text("999999999\n")
    return run_dir


async def test_a_killed_engine_reads_died_not_an_error_and_names_the_checkpoint(wizard_env):
    from test_tui_helpers import demo_app
    from textual.widgets import Label, Static

    from tui.app import SnugtuneApp

    run_dir = died_run(wizard_env["runs"])
    app = SnugtuneApp(demo_app().config(), attach=run_dir, gpus=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.screen.state == "failed", what="the died run")
        title = str(app.screen.query_one("#run-title", Label).render())
        assert "· died ·" in title, title  # as `snugtune runs` says; it was "failed"
        box = str(app.screen.query_one("#engine-error", Static).render())
        assert "killed" in box and "loading the model" in box
        assert "FutureWarning" not in box and "warnings.warn" not in box, box  # read as the cause
        assert "Loading weights" not in box, box  # a progress bar is no reason either
        assert "the engine died; ctrl+r resumes from checkpoint-2" in status_text(app), status_text(app)


async def test_quitting_while_the_run_trains_says_where_it_goes_on(wizard_env):
    # ctrl+q on the live panel closed the wizard without a word; the run trained on unseen
    import os

    from test_tui_helpers import demo_app

    from tui.app import SnugtuneApp, still_running_note

    run_dir = died_run(wizard_env["runs"], name="demo-live")
    (run_dir / "pid").write_text(f"{os.getpid()}\n")  # a live process: the run reads as running
    app = SnugtuneApp(demo_app().config(), attach=run_dir, gpus=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.run_state == "running", what="the live panel")
        await pilot.press("ctrl+q")
    note = still_running_note(app)
    assert note is not None and "demo-live keeps training in the background" in note
    assert "snugtune attach demo-live" in note and "snugtune stop demo-live" in note
    (run_dir / "pid").write_text("999999999\n")  # the engine gone: nothing to say
    assert still_running_note(app) is None


def test_a_failed_export_shows_its_hint_without_the_cli_prefix():
    from tui.screens.done import export_error

    lines = ["merging the adapter ...",
             ("snugtune: error: GGUF export needs llama.cpp's Python binding (llama-cpp-python), which is not "
              "installed"),
             "  hint: pip install 'snugtune[gguf]'"]
    # before: "snugtune: error: GGUF export needs ... not installed", the pip command dropped
    assert export_error(lines, 2) == ("GGUF export needs llama.cpp's Python binding (llama-cpp-python), which is "
                                      "not installed · hint: pip install 'snugtune[gguf]'")
    assert export_error(["Traceback (most recent call last):", "RuntimeError: boom"], 1) == "RuntimeError: boom"
    assert export_error([], 1) == "exit code 1"


def test_a_second_export_is_offered_a_free_path(tmp_path):
    from tui.screens.done import free_path

    assert free_path(tmp_path / "merged") == tmp_path / "merged"
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged-2").mkdir()
    assert free_path(tmp_path / "merged") == tmp_path / "merged-3"  # it offered the taken one, then refused it
    (tmp_path / "run-q4_k_m.gguf").write_bytes(b"")
    assert free_path(tmp_path / "run-q4_k_m.gguf") == tmp_path / "run-q4_k_m-2.gguf"


async def test_a_missing_model_folder_is_named_once(wizard_env):
    from test_tui_helpers import demo_app
    from textual.widgets import Input

    from tui.screens.model import ModelScreen

    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        app.goto(1)
        await wait_for(pilot, lambda: isinstance(app.screen, ModelScreen) and app.screen.query("#query"),
                       what="the model step")
        missing = str(wizard_env["tmp"] / "no-model")
        box = app.screen.query_one("#query", Input)
        box.value = missing
        box.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: "no such model directory" in status_text(app), what="the refusal")
        assert status_text(app).count(missing) == 1, status_text(app)  # was "X: X: no such model directory"


async def test_a_damaged_checkpoint_set_aside_on_resume_is_said(wizard_env):
    # the status said "ctrl+r resumes from checkpoint-2", then "resumed from checkpoint-1" unexplained
    import os

    from test_tui_helpers import demo_app, write_events

    from tui.app import SnugtuneApp

    run_dir = died_run(wizard_env["runs"], name="demo-resumed")
    write_events(run_dir, [
        {"event": "checkpoint_skipped", "path": str(run_dir / "checkpoints/checkpoint-2"),
         "reason": "adapter_model.safetensors: truncated (header cut off)",
         "moved_to": str(run_dir / "checkpoints/damaged-checkpoint-2")},
        {"event": "run_started", "config": {}, "versions": {}, "total_steps": 10, "device": {"type": "cpu"},
         "resumed_from": str(run_dir / "checkpoints/checkpoint-1")},
    ])
    (run_dir / "pid").write_text(f"{os.getpid()}\n")
    app = SnugtuneApp(demo_app().config(), attach=run_dir, gpus=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "resumed from checkpoint-1" in status_text(app), what="the resumed attempt")
        assert "checkpoint-2 was damaged (adapter_model.safetensors: truncated" in status_text(app), status_text(app)


def test_an_export_stopped_for_time_removes_its_temporary_file(tmp_path):
    # it was SIGKILLed, which leaves core.export's `.NAME.xxx.tmp` beside the destination
    import subprocess
    import sys
    import time

    from tui.screens.done import stop_export

    tmp = tmp_path / ".merged.abc.tmp"
    ready = tmp_path / "ready"
    # `ready` is written inside the try, after the temporary file: once it exists, SIGINT reaches the
    # handler (polling on the temporary file alone could send it while write_text still ran)
    script = (f"import pathlib, time\np = pathlib.Path({str(tmp)!r})\n"
              f"try:\n    p.write_text('half')\n    pathlib.Path({str(ready)!r}).write_text('1')\n"
              "    time.sleep(600)\nexcept KeyboardInterrupt:\n    p.unlink()\n    raise SystemExit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 120
    while not ready.exists():  # a condition, polled: the child has written and waits in its try
        assert time.monotonic() < deadline, "the child never wrote"
        assert proc.poll() is None
        time.sleep(0.05)
    stop_export(proc, grace_s=120)
    assert proc.returncode == 130 and not tmp.exists()


def test_quitting_during_an_export_says_it_goes_on(tmp_path):
    import subprocess
    import sys
    from types import SimpleNamespace

    from tui.app import still_running_note

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        app = SimpleNamespace(export_job=(proc, tmp_path / "merged", tmp_path / "export.log"), run_dir=None)
        note = still_running_note(app)
        assert note == (f"an export to {tmp_path / 'merged'} is still being written; it finishes on its own "
                        f"(log: {tmp_path / 'export.log'})")
    finally:
        proc.kill()
        proc.wait()
    assert still_running_note(app) is None  # once it is over, nothing to say
