"""A run of too few optimizer steps to learn anything is said before it trains (core.plan.few_steps_note):
by the engine's data_prepared event (printed by `snugtune train`) and the wizard's Settings step."""
from __future__ import annotations

import io

from core import runs
from core.config import RunConfig
from core.events import read_events
from core.plan import FEW_STEPS, few_steps_note
from core.train import Engine
from test_tui_helpers import wizard_env  # noqa: F401 (the wizard test's fixture)


def test_the_rule_names_the_count_and_the_setting_that_fixes_it():
    note = few_steps_note(3, 3, None)
    assert note.startswith("only 3 optimizer steps in all (3 an epoch)")
    assert "train.epochs=20 gives 60" in note and "train.grad_accum" in note
    assert few_steps_note(1, 1, None).startswith("only 1 optimizer step in all")
    # an explicit max_steps is what the user asked for; enough steps say nothing
    assert few_steps_note(3, 3, 3) is None
    assert few_steps_note(FEW_STEPS, 10, None) is None
    assert few_steps_note(FEW_STEPS - 1, 10, None) is not None


def test_train_prints_the_note_from_the_engine_s_event(tiny_model_dir, tiny_instruction_jsonl, tmp_path):
    # epochs-based (no max_steps), accumulation 8: the tiny set makes a step or two
    cfg = RunConfig.from_dict({
        "gpu": {"profile": "cpu"}, "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"path": str(tiny_instruction_jsonl), "max_seq_len": 64, "eval_fraction": 0.0},
        "lora": {"r": 8, "alpha": 16},
        "train": {"micro_batch": 4, "grad_accum": 8, "epochs": 1, "save_steps": 1000, "logging_steps": 1},
        "output": {"runs_dir": str(tmp_path / "runs")},
    })
    run_dir = runs.create_run_dir(cfg)
    assert Engine(run_dir).run() == 0
    events = read_events(run_dir)
    prepared = next(e for e in events if e["event"] == "data_prepared")
    steps = next(e for e in events if e["event"] == "run_started")["total_steps"]
    assert steps < FEW_STEPS and prepared["few_steps"] == few_steps_note(steps, steps, None)

    from tui.cmd_runs import Printer

    out = io.StringIO()
    Printer(out).event(prepared)
    assert f"note: only {steps} optimizer step" in out.getvalue()


def test_enough_steps_or_max_steps_print_nothing():
    from tui.cmd_runs import Printer

    out = io.StringIO()
    Printer(out).event({"event": "data_prepared", "train_samples": 500, "eval_samples": 0, "format": "chat",
                        "few_steps": None})
    assert "note:" not in out.getvalue()


async def test_the_wizard_settings_step_warns_and_still_trains_as_set(wizard_env):
    from test_tui_helpers import QA_ROWS, demo_app, status_text, wait_for, write_jsonl  # noqa: PLC0415

    data = write_jsonl(wizard_env["tmp"] / "qa.jsonl", QA_ROWS)
    app = demo_app("cpu", [f"data.path='{data}'"])
    app.cfg_data["train"].pop("max_steps", None)  # epochs-based: a handful of rows make one step an epoch
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "optimizer step" in status_text(app), timeout=90, what="the few-steps note")
        text = " ".join(status_text(app).split())
        assert "only 1 optimizer step in all (1 an epoch)" in text and "Epochs 60 gives 60" in text
        assert "ctrl+n trains as set" in text
