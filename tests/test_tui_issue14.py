"""Issue 14: the wizard as a new user walks it. One test (or a few) per item, Pilot at 80x24
unless the item is about another size."""
from __future__ import annotations

import pytest
from textual import events
from textual.widgets import DataTable, Input, Label, Static

from test_tui_helpers import (QA_ROWS, demo_app, finished_run, status_text, wait_for, wizard_env,  # noqa: F401
                              write_jsonl)
from tui.app import SnugtuneApp

SIZE = (80, 24)


def burst(app, *keys: str) -> None:
    """Post keys the way a terminal delivers a burst: all queued before any is handled
    (Pilot.press waits for each key, which hides reordering)."""
    for k in keys:
        char = k if len(k) == 1 else None
        app.post_message(events.Key(k, char))


# ---- item 4: keys typed in a burst are applied in order ---------------------------------------

async def test_burst_of_keys_in_a_settings_field_is_applied_in_order(wizard_env):
    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        field = app.screen.query_one("#lora-r", Input)
        assert app.focused is field and field.value == "16"
        burst(app, "end", "backspace", "backspace", "6", "4")
        await wait_for(pilot, lambda: app.screen.query_one("#lora-r", Input).value == "64", timeout=60,
                       what="64 in the field")
        # and moving on with Tab in the same burst types into the next field
        burst(app, "tab", "end", "backspace", "backspace", "1", "2", "8")
        await wait_for(pilot, lambda: app.screen.query_one("#lora-alpha", Input).value == "128", timeout=60,
                       what="128 in the alpha field")
        assert field.value == "64"


# ---- item 1: a built-in preset's name is refused --------------------------------------------

async def test_saving_under_a_builtin_name_is_refused_and_names_it(wizard_env):
    from core import presets
    from tui.screens.modals import PromptScreen

    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, PromptScreen)
        app.screen.query_one("#prompt", Input).value = "demo"
        await pilot.press("enter")
        assert "'demo' is a built-in preset" in status_text(app)
        assert not (wizard_env["config"] / "presets" / "demo.toml").exists()
    assert [p.source for p in presets.list_presets() if p.name == "demo"] == ["builtin"]


# ---- item 3: a huge plain-recipe figure does not blank the bar ------------------------------

async def test_memory_bar_keeps_its_scale_beside_a_huge_plain_total(wizard_env):
    from test_tui_helpers import fixed_estimate, pin_estimate

    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await pin_estimate(pilot, app)
        est, plain = fixed_estimate("fits", 2.6)
        plain.total_gib = 48462.0
        app.screen.render_estimate(est, plain, 0.8, app.estimate_config())
        await pilot.pause()
        first = str(app.screen.query_one("#vram").render()).splitlines()[0]
        filled = sum(first.count(c) for c in "█▓▒░▞▚■▪▄▀")
        assert filled > len(first) // 2  # 2.6 of 3.82 GiB: most of the bar, not blank
        assert "48,462 GiB" in str(app.screen.query_one("#totals").render())
        # a run's own total far past the budget is drawn cut, and says so in words
        est.total_gib = 500.0
        app.screen.render_estimate(est, plain, 0.8, app.estimate_config())
        await pilot.pause()
        bar = str(app.screen.query_one("#vram").render())
        assert "bar cut at 3x the budget: 500 GiB" in bar and "┃" in bar.splitlines()[0]


# ---- item 5 (and the gated badge): the model table uses the width it has --------------------

def table_lines(table) -> list[str]:
    return [table.render_line(y).text for y in range(table.size.height)]


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_model_table_shows_whole_badges_and_uses_the_width(wizard_env, size):
    from tui.screens.model import ModelScreen

    app = SnugtuneApp(gpus=[], check_runs=False)
    async with app.run_test(size=size) as pilot:
        choices = app.screen.query_one("#choices")
        ids = [choices.get_option_at_index(i).id for i in range(choices.option_count)]
        choices.highlighted = ids.index("profile:gtx-1650")  # 4 GB: some models are too big
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, ModelScreen)
        table = app.screen.query_one("#models", DataTable)
        await pilot.pause()
        await pilot.pause()
        lines = table_lines(table)
        assert lines[0].split() == ["model", "params", "fit", "access"]
        rows = [ln for ln in lines[1:] if ln.strip()]
        assert any("too big" in ln for ln in rows), lines
        assert all(ln.rstrip().endswith(("fits", "tight", "too big", "gated", "?")) for ln in rows)
        assert any("gated" in ln and "meta-llama/Llama-3.2-1B" in ln for ln in rows)
        cells = {str(table.get_row_at(i)[0]): table.get_row_at(i) for i in range(table.row_count)}
        assert cells["builtin:tiny-llama"][1] == "3.5M" and cells["google/gemma-3-1b-pt"][1] == "1.0B"
        if size[0] >= 120:
            # room for the longest catalog id, whole
            await pilot.press("end")
            everything = "\n".join(table_lines(table))
            assert "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T" in everything


# ---- item 6: the filter matches `builtin:` (and owner/ prefixes) ---------------------------

async def test_catalog_filter_matches_builtin_prefix_and_enter_takes_the_row(wizard_env):
    app = SnugtuneApp(gpus=[], check_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        await pilot.press(*"builtin:")
        table = app.screen.query_one("#models", DataTable)
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == ["builtin:tiny-llama"]
        assert "matching 'builtin:'" in status_text(app)
        await pilot.press("ctrl+u", *"meta-llama/")
        assert table.row_count == 6  # Llama-3.2 1B, 3B and Llama-3.1 8B, base and Instruct
        await pilot.press("down", "enter")
        assert app.get_value("model.name_or_path") == "meta-llama/Llama-3.2-1B-Instruct"


# ---- item 2: auto-fit is the CLI's, and a length past the model's positions is said ---------

async def test_autofit_is_the_clis_and_a_length_past_the_positions_is_warned(wizard_env, capsys):
    import argparse
    import json

    from tui import cmd_know

    # tiny-llama has 2,048 positions; 4,096 tokens fit the CPU's memory easily
    app = demo_app("rtx-3060-12gb", ["data.max_seq_len=4096", "train.micro_batch=1", "train.grad_accum=8"])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.last_estimate is not None and app.spec is not None, what="the estimate")
        await wait_for(pilot, lambda: "2,048 positions" in status_text(app), what="the position warning")
        assert "4,096 tokens is longer than the model's 2,048 positions" in str(app.screen.query_one("#totals").render())
        await pilot.press("ctrl+f")
        await wait_for(pilot, lambda: "auto-fit" in status_text(app), what="auto-fit")
        wizard = (app.get_value("data.max_seq_len"), app.get_value("train.micro_batch"), app.get_value("train.grad_accum"))
    parser = argparse.ArgumentParser()
    cmd_know.register(parser.add_subparsers())
    args = parser.parse_args(["estimate", "--preset", "demo", "--gpu", "rtx-3060-12gb", "--seq", "4096",
                              "--batch", "1", "--grad-accum", "8", "--autofit", "--json"])
    capsys.readouterr()
    assert args.func(args) == 0
    cli = json.loads(capsys.readouterr().out)["autofit"]
    assert wizard == (cli["max_seq_len"], cli["micro_batch"], cli["grad_accum"])


# ---- missing settings: the advanced group --------------------------------------------------

async def test_advanced_settings_reach_the_configuration(wizard_env):
    from textual.widgets import Checkbox, Select

    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        hints = [str(h.render()) for h in app.screen.query(".hint")]
        assert any("ramping the learning rate" in h for h in hints)  # the config's own field help
        for fid, value in [("#output-name", "bad name!"), ("#train-warmup_ratio", "0.1"),
                           ("#train-weight_decay", "0.01"), ("#data-eval_fraction", "0.2"),
                           ("#train-eval_steps", "10"), ("#train-save_steps", "20")]:
            app.screen.query_one(fid, Input).value = value
        app.screen.query_one("#train-lr_scheduler", Select).value = "linear"
        app.screen.query_one("#data-template", Select).value = "builtin"
        app.screen.query_one("#data-packing", Checkbox).value = False
        await wait_for(pilot, lambda: app.screen.query_one("#output-name-error").display, what="the name's error")
        await pilot.press("ctrl+n")
        assert "output.name" in status_text(app)
        app.screen.query_one("#output-name", Input).value = "my-run"
        await wait_for(pilot, lambda: not app.screen.query_one("#output-name-error").display, what="the error to clear")
        await pilot.press("ctrl+n")
        cfg = app.config()
        assert (cfg.output.name, cfg.train.warmup_ratio, cfg.train.weight_decay, cfg.data.eval_fraction,
                cfg.train.eval_steps, cfg.train.save_steps) == ("my-run", 0.1, 0.01, 0.2, 10, 20)
        assert (cfg.train.lr_scheduler, cfg.data.template, cfg.data.packing) == ("linear", "builtin", False)


# ---- item 14: focus is visible without colour ------------------------------------------------

@pytest.mark.parametrize("no_color", [False, True])
async def test_focus_is_marked_by_reverse_video_also_without_colour(wizard_env, monkeypatch, no_color):
    from textual.widgets import Checkbox

    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        labels = app.screen.query(".field-label").results(Label)
        by_field = {lab.parent.query_one(Input).id: lab for lab in labels if lab.parent.query(Input)}
        await pilot.pause()
        assert by_field["lora-r"].rich_style.reverse and not by_field["lora-alpha"].rich_style.reverse
        await pilot.press("tab")
        await pilot.pause()
        assert by_field["lora-alpha"].rich_style.reverse and not by_field["lora-r"].rich_style.reverse
        box = app.screen.query_one("#train-gradient_checkpointing", Checkbox)
        box.focus()
        await pilot.pause()
        label_style = box.get_component_rich_style("toggle--label")
        assert label_style.reverse


# ---- item 7: offline, a catalog model not in the cache does not block the data step ----------

async def test_offline_catalog_model_previews_with_a_fallback_and_reaches_settings(wizard_env):
    from tui.screens.data import DataScreen
    from tui.screens.settings import SettingsScreen

    data = write_jsonl(wizard_env["tmp"] / "qa.jsonl", QA_ROWS)
    # Qwen2.5-0.5B is in the catalog (its shape is known offline) but not in this machine's cache
    app = demo_app("gtx-1650", ["model.name_or_path='Qwen/Qwen2.5-0.5B'", f"data.path='{data}'"])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+b")
        assert isinstance(app.screen, DataScreen)
        await wait_for(pilot, lambda: "Paris" in str(app.screen.query_one("#samples", Static).render()),
                       timeout=120, what="the fallback preview")
        samples = str(app.screen.query_one("#samples", Static).render())
        assert "Paris" in samples and "token counts are estimates" in samples
        assert "estimated" in status_text(app)
        assert "(estimated)" in str(app.screen.query_one("#lengths", Static).render())
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, SettingsScreen)
        await wait_for(pilot, lambda: "fits" in str(app.screen.query_one("#totals").render()), what="the estimate")


# ---- item 9: stale text ---------------------------------------------------------------------

async def test_data_pane_is_cleared_after_an_error(wizard_env):
    data = write_jsonl(wizard_env["tmp"] / "qa.jsonl", QA_ROWS)
    bad = write_jsonl(wizard_env["tmp"] / "odd.jsonl", [{"q": r["question"], "a": r["answer"]} for r in QA_ROWS])
    app = demo_app("cpu", [f"data.path='{data}'"])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+b")
        await wait_for(pilot, lambda: "Paris" in str(app.screen.query_one("#samples", Static).render()),
                       what="the first preview")
        assert "tokens per sample" in str(app.screen.query_one("#lengths", Static).render())
        app.screen.query_one("#path", Input).value = str(bad)
        app.screen.query_one("#path", Input).focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: "cannot tell the data's format" in status_text(app), what="the format error")
        assert "Paris" not in str(app.screen.query_one("#samples", Static).render())
        assert str(app.screen.query_one("#lengths", Static).render()).strip() == ""


# ---- item 8: a card this machine does not have cannot be started; a budget above the card ---

async def test_a_card_profile_cannot_train_on_a_machine_without_a_gpu(wizard_env):
    from tui.screens.train import TrainScreen

    app = demo_app("gtx-1650")  # gpus=[]: this machine has no GPU
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, TrainScreen)
        assert "no NVIDIA GPU" in status_text(app)
        await pilot.press("ctrl+t")
        said = status_text(app)
        assert "cannot train here" in said and "choose the CPU" in said
        assert "--" not in said and "snugtune " not in said  # wizard words, no command line
        assert app.run_dir is None and not list(wizard_env["runs"].iterdir())


async def test_a_budget_above_the_cards_memory_is_refused(wizard_env):
    from textual.widgets import OptionList

    from tui.screens.gpu import GpuScreen

    app = SnugtuneApp(gpus=[], check_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        choices = app.screen.query_one("#choices", OptionList)
        ids = [choices.get_option_at_index(i).id for i in range(choices.option_count)]
        choices.highlighted = ids.index("profile:gtx-1650")
        app.screen.query_one("#budget", Input).value = "500"
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, GpuScreen)
        assert "500 GiB is more than the" in status_text(app) and "3.82 GiB" in status_text(app)
        app.screen.query_one("#budget", Input).value = "3.5"
        await pilot.press("ctrl+n")
        assert not isinstance(app.screen, GpuScreen)
        assert app.get_value("gpu.vram_budget_gib") == 3.5


def ended_run(base, name: str, last: dict, steps: int = 3):
    """A run directory whose log ends with `last` (run_stopped or run_failed) after a few steps."""
    from core.presets import load_preset
    from test_tui_helpers import write_events

    run_dir = base / name
    run_dir.mkdir(parents=True)
    cfg = load_preset("demo").with_overrides(["gpu.profile='cpu'"])
    cfg.write_toml(run_dir / "config.toml")
    # fixed times (the writer keeps a given one): 10 s a step, the end 5 s after the last step
    t0 = 1_700_000_000.0
    events = [{"event": "run_started", "time": t0, "config": cfg.to_dict(), "versions": {}, "total_steps": 8,
               "device": {"type": "cpu", "name": "cpu"}, "resumed_from": None}]
    for s in range(1, steps + 1):
        events.append({"event": "step_logged", "time": t0 + 10 * s, "step": s, "total_steps": 8, "epoch": s / 8,
                       "loss": 5.0 - s * 0.1, "learning_rate": 1e-3, "tokens_per_s": 500.0, "tokens_seen": 1000 * s,
                       "eta_s": 20.0})
    events.append({"time": t0 + 10 * steps + 5, **last})
    write_events(run_dir, events)
    (run_dir / "pid").write_text("999999999\n")
    return run_dir


async def test_a_stopped_run_shows_no_eta(wizard_env):
    from tui.screens.train import TrainScreen

    run_dir = ended_run(wizard_env["runs"], "stopped-run", {"event": "run_stopped", "step": 3, "checkpoint": None})
    app = SnugtuneApp(demo_app("cpu").config(), attach=run_dir, gpus=[])
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.screen, TrainScreen)
        await wait_for(pilot, lambda: app.screen.state == "stopped", what="the stopped run")
        eta = str(app.screen.query_one("#eta").render())
        assert "ETA" not in eta and "stopped" in eta


async def test_back_to_train_after_a_failed_run_starts_fresh(wizard_env):
    from tui.screens.settings import SettingsScreen
    from tui.screens.train import TrainScreen

    run_dir = ended_run(wizard_env["runs"], "failed-run", {"event": "run_failed", "error": "boom", "kind": "internal"})
    app = SnugtuneApp(demo_app("cpu").config(), attach=run_dir, gpus=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.screen.state == "failed", what="the failed run")
        assert app.screen.query_one("#engine-error").display
        assert "boom" in str(app.screen.query_one("#engine-error").render())  # the engine's own message
        await pilot.press("ctrl+b")
        assert isinstance(app.screen, SettingsScreen)
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, TrainScreen)
        await pilot.pause()
        assert app.screen.state == "ready"
        assert not app.screen.query_one("#engine-error").display
        assert "Ready to train" in str(app.screen.query_one("#run-title").render())
        assert "failed-run, failed" in status_text(app)


# ---- item 10: chat in the wizard is quick by default -----------------------------------------

async def test_chat_compares_with_the_base_only_when_asked_and_caps_the_answer(wizard_env):
    from textual.widgets import Checkbox

    from tui.screens.done import CHAT_MAX_NEW_TOKENS, DoneScreen, chat_request

    run_dir = finished_run(wizard_env["runs"], "demo-run")
    app = SnugtuneApp(demo_app("gtx-1650").config(), attach=run_dir, gpus=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.screen.state == "finished", what="the replayed run")
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, DoneScreen)
        assert app.screen.query_one("#compare", Checkbox).value is False
        assert not app.screen.query_one("#chat-base").display
    assert chat_request("hi", False, 1)["max_new_tokens"] == CHAT_MAX_NEW_TOKENS <= 64


# ---- item 12: wording -------------------------------------------------------------------------

async def test_wording_singulars_and_parameter_counts(wizard_env):
    from tui.screens.train import TrainScreen

    data = write_jsonl(wizard_env["tmp"] / "one.jsonl", QA_ROWS[:1])
    # one sample, one epoch, no max_steps: "1 epoch" and "(1 step)"
    app = demo_app("cpu", [f"data.path='{data}'"])
    app.cfg_data["train"].pop("max_steps", None)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "per epoch" in str(app.screen.query_one("#timing").render()), timeout=90,
                       what="the time per epoch")
        assert "(1 step)" in str(app.screen.query_one("#timing").render())
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, TrainScreen)
        stats = str(app.screen.query_one("#stats").render())
        assert "1 epoch\n" in stats and "epochs" not in stats


def test_cli_estimate_says_durations_and_one_header_order(capsys):
    import argparse

    from tui import cmd_know

    assert cmd_know._duration(1426241.0) == "16d12h" and cmd_know._duration(12.34) == "12.3 s"
    parser = argparse.ArgumentParser()
    cmd_know.register(parser.add_subparsers())
    args = parser.parse_args(["estimate", "--model", "Qwen/Qwen2.5-1.5B", "--gpu", "gtx-1650", "--seq", "2048",
                              "--batch", "1", "--grad-accum", "8"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "2048 tokens x 1, recipe" in out  # the table's header: tokens x micro-batch
    assert "(2048 tokens x 1 x 8 accumulated)" in out  # the time line in the same order


# ---- item 15: the data is read once per version; the browser goes up ------------------------

async def test_data_is_not_read_again_on_each_visit(wizard_env):
    from tui.screens.data import DataScreen
    from tui.screens.settings import SettingsScreen

    data = write_jsonl(wizard_env["tmp"] / "qa.jsonl", QA_ROWS)
    app = demo_app("cpu", [f"data.path='{data}'"])
    async with app.run_test(size=SIZE) as pilot:
        # settings reads the lengths in the background; leaving at once must not restart the read
        await pilot.press("ctrl+b")
        assert isinstance(app.screen, DataScreen)
        await wait_for(pilot, lambda: "Paris" in str(app.screen.query_one("#samples", Static).render()),
                       what="the preview")
        for _ in range(2):
            await pilot.press("ctrl+n")
            assert isinstance(app.screen, SettingsScreen)
            await pilot.press("ctrl+b")
            assert isinstance(app.screen, DataScreen)
            assert "Paris" in str(app.screen.query_one("#samples", Static).render())
        app.screen.query_one("#path", Input).focus()
        await pilot.press("enter")
        assert "Paris" in str(app.screen.query_one("#samples", Static).render())
        assert app.data_reads == 1
        # the file changes on disk: read again
        write_jsonl(data, QA_ROWS + [{"question": "Moon?", "answer": "Luna"}])
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.data_reads == 2 and "5 samples" in status_text(app), what="the re-read")


async def test_file_browser_goes_above_its_first_folder(wizard_env):
    from tui.screens.modals import FilePickerScreen

    folder = wizard_env["tmp"] / "deep" / "er"
    folder.mkdir(parents=True)
    data = write_jsonl(wizard_env["tmp"] / "deep" / "qa.jsonl", QA_ROWS)
    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+b")
        app.screen.query_one("#path", Input).value = str(folder)
        await pilot.press("ctrl+o")
        assert isinstance(app.screen, FilePickerScreen)
        tree = app.screen.query_one("#tree")
        assert tree.path == folder
        await pilot.press("backspace")
        assert tree.path == folder.parent
        await wait_for(pilot, lambda: any(c.data.path == data for c in tree.root.children), what="the parent's files")


# ---- missing: the step panel shows the elapsed time and the tokens seen ----------------------

async def test_panel_shows_elapsed_time_and_tokens_seen(wizard_env):
    run_dir = ended_run(wizard_env["runs"], "stopped-run", {"event": "run_stopped", "step": 3, "checkpoint": None})
    app = SnugtuneApp(demo_app("cpu").config(), attach=run_dir, gpus=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.screen.state == "stopped", what="the stopped run")
        stats = str(app.screen.query_one("#stats", Static).render())
        assert "3,000 seen" in stats
        assert "elapsed   35s" in stats  # run_started to run_stopped


# ---- missing: "copy the command" --------------------------------------------------------------

async def test_the_command_shown_is_the_setup_exactly(wizard_env):
    import shlex

    from core.presets import load_preset
    from tui.screens.modals import CommandScreen

    data = write_jsonl(wizard_env["tmp"] / "my data.jsonl", QA_ROWS)
    app = demo_app("cpu", [f"data.path='{data}'"])
    async with app.run_test(size=SIZE) as pilot:
        app.screen.query_one("#lora-r", Input).value = "8"
        app.screen.query_one("#train-warmup_ratio", Input).value = "0.1"
        await pilot.press("ctrl+y")
        assert isinstance(app.screen, CommandScreen)
        line = app.screen.query_one("#command").text
        assert app.clipboard == line
        argv = shlex.split(line)
        assert argv[:3] == ["snugtune", "train", "demo"]
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        # what `snugtune train` would build from it (tui/cmd_runs.cmd_train) is the setup on screen
        rebuilt = load_preset("demo").with_overrides(sets)
        assert rebuilt.to_dict() == app.config().to_dict()
        assert "lora.r=8" in sets and any(s.startswith("data.path=") for s in sets)
        await pilot.press("escape")
        assert not isinstance(app.screen, CommandScreen)


def test_the_command_without_a_preset_uses_the_closest_builtin():
    from core.presets import load_preset
    from tui.command import train_command

    cfg = load_preset("gtx-1650-qwen2.5-0.5b").with_overrides(["lora.r=4"]).to_dict()
    line, note = train_command(cfg, None)
    assert line == "snugtune train gtx-1650-qwen2.5-0.5b --set lora.r=4" and "built-in preset" in note


def test_the_command_round_trips_awkward_values():
    import shlex

    from core.presets import load_preset
    from tui.command import train_command

    cfg = load_preset("demo").with_overrides(["gpu.profile='gtx-1650'", "data.path='/tmp/my data.jsonl'",
                                              "lora.target_modules=['q_proj']", "data.columns={instruction='q'}",
                                              "output.name='true'", "train.learning_rate=0.0003"])
    line, _ = train_command(cfg.to_dict(), "demo")
    assert "--set gpu.profile=gtx-1650 " in line  # bare where --set reads it back the same
    argv = shlex.split(line)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert load_preset("demo").with_overrides(sets).to_dict() == cfg.to_dict()


async def test_checkboxes_say_on_or_off_in_words(wizard_env, monkeypatch):
    from textual.widgets import Checkbox

    monkeypatch.setenv("NO_COLOR", "1")
    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        box = app.screen.query_one("#data-packing", Checkbox)
        assert str(box.label).endswith(": on")
        box.focus()
        await pilot.press("enter")
        assert box.value is False and str(box.label).endswith(": off")
