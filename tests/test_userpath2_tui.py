"""The wizard, round 2: what a second walk in tmux at 80x24 found. An error's hint was cut off
by the status line's three rows (the read-only runs folder's `SNUGTUNE_RUNS_DIR`, the GGUF
export's pip line), and what is cut is exactly how to fix it."""
from __future__ import annotations

from textual.geometry import Region

from test_tui_helpers import demo_app, status_text, wait_for, wizard_env  # noqa: F401

SIZE = (80, 24)


async def test_an_error_with_its_hint_is_shown_whole_at_80_columns(wizard_env):
    from tui.screens.settings import SettingsScreen
    from tui.screens.train import TrainScreen

    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen) and app.last_estimate is not None,
                       what="the settings step with its estimate")
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainScreen) and status_text(app).strip(),
                       what="the train step with its first status")
        app.screen.set_status("could not start the engine: cannot create the runs directory "
                              "/home/someone/.local/share/snugtune/runs (Read-only file system)\n"
                              "  hint: choose a writable place with --set output.runs_dir=/path or "
                              "SNUGTUNE_RUNS_DIR", "error")
        status = app.screen.query_one("#status")

        def shown() -> str:
            return "".join(seg.text for line in status.render_lines(Region(0, 0, status.size.width, status.size.height))
                           for seg in line)

        # before: cut after "output.runs_dir=/path or", three rows at most
        await wait_for(pilot, lambda: "SNUGTUNE_RUNS_DIR" in shown(), what="the whole hint on screen")
        assert status.size.height == 4


async def test_a_file_that_cannot_be_read_leaves_no_stale_column_mapping_and_says_how_to_map(wizard_env):
    # The Columns box showed the previous file's detected mapping (instruction=instruction, ...)
    # as its placeholder beside the new file's error, read as the mapping in use.
    import json

    from textual.widgets import Input

    from test_tui_helpers import QA_ROWS, write_jsonl
    from tui.screens.data import COLUMNS_PLACEHOLDER, DataScreen

    good = write_jsonl(wizard_env["tmp"] / "qa.jsonl", QA_ROWS)
    labels = wizard_env["tmp"] / "reviews.jsonl"
    labels.write_text("".join(json.dumps({"text": f"review {i}", "label": "good"}) + "\n" for i in range(3)),
                      encoding="utf-8")
    app = demo_app("gtx-1650", [f"data.path='{good}'"])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+b")
        assert isinstance(app.screen, DataScreen)
        columns = app.screen.query_one("#columns", Input)
        await wait_for(pilot, lambda: "instruction=" in columns.placeholder, timeout=300, what="the first preview")
        path = app.screen.query_one("#path", Input)
        path.value = str(labels)
        path.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: "classification set" in status_text(app), timeout=300, what="the error")
        assert columns.placeholder == COLUMNS_PLACEHOLDER
        shown = str(app.screen.query_one("#samples").render())
        assert "type instruction=text, output=label in the Columns box" in shown, shown


async def test_the_export_path_question_is_shown_whole(wizard_env):
    # "Write the Ollama folder (q4_k_m GGUF + Modelfile) to (a ne": cut at the dialog's edge
    from textual.widgets import Static

    from tui.screens.modals import PromptScreen

    app = demo_app()
    async with app.run_test(size=SIZE) as pilot:
        title = "Write the Ollama folder (q4_k_m GGUF + Modelfile) to (a new directory)"
        app.push_screen(PromptScreen(title, "a path that does not exist yet", value="/tmp/x"))
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen) and app.screen.query(".dialog-title"),
                       what="the question")
        box = app.screen.query_one(".dialog-title", Static)
        await wait_for(pilot, lambda: box.size.height >= 2, what="the question laid out")
        shown = " ".join("".join(seg.text for seg in line).strip()
                         for line in box.render_lines(Region(0, 0, box.size.width, box.size.height)))
        assert "(a new directory)" in shown, shown


async def test_a_saved_preset_is_described_by_its_own_setup_not_the_demos(wizard_env):
    from core.presets import list_presets
    from tui.screens.modals import PromptScreen
    from tui.screens.settings import SettingsScreen

    data = wizard_env["tmp"] / "mine.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    app = demo_app("gtx-1650", [f"data.path='{data}'"])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen), what="the settings step")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen), what="the name prompt")
        app.screen.query_one("#prompt").value = "mine"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "saved preset 'mine'" in status_text(app), what="the save")
    saved = {p.name: p for p in list_presets()}["mine"]
    # before: "Offline demo: a tiny local model learns Python-docs Q&A ..."
    assert saved.description == "builtin:tiny-llama on mine.jsonl: LoRA r=16, 256 tokens (saved from the wizard)"


async def test_memory_on_the_cpu_is_said_not_measured_rather_than_pending(wizard_env):
    # "memory … / est 0.04 GiB" for a whole CPU run: "…" reads as a reading still to come
    from test_tui_helpers import finished_run

    from tui.app import SnugtuneApp

    run_dir = finished_run(wizard_env["runs"])  # device type cpu, no memory figures in its steps
    app = SnugtuneApp(demo_app().config(), attach=run_dir, gpus=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.screen.state == "finished", what="the replayed run")
        app.last_estimate = type("Est", (), {"total_gib": 0.04})()
        stats = str(app.screen.stats_text())
        assert "n/a (CPU) / est 0.04 GiB" in stats, stats


async def test_an_empty_chat_answer_is_said_not_left_blank(wizard_env):
    # a tiny or barely trained adapter ends its answer at once: a blank line read as a hang
    from textual.widgets import RichLog

    from test_tui_helpers import finished_run
    from core.runs import EMPTY_REPLY
    from tui.app import SnugtuneApp
    from tui.screens.done import ChatReply, DoneScreen

    app = SnugtuneApp(demo_app().config(), attach=finished_run(wizard_env["runs"]), gpus=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.screen.state == "finished", what="the replayed run")
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: isinstance(app.screen, DoneScreen), what="the done step")
        app.screen.post_message(ChatReply("adapter", ""))
        log = app.screen.query_one("#chat-adapter", RichLog)
        await wait_for(pilot, lambda: log.lines, what="the answer")
        assert EMPTY_REPLY[:40] in "".join(seg.text for line in log.lines for seg in line)


async def test_a_gguf_of_an_architecture_that_cannot_train_is_said_on_the_model_step(wizard_env):
    # before: "✓ chosen: rwkv.gguf", and the first word of it came at the data preview or the engine
    import pytest

    pytest.importorskip("gguf")
    import numpy as np
    from gguf import GGUFWriter
    from textual.widgets import Input

    from tui.app import SnugtuneApp
    from tui.screens.model import ModelScreen

    path = wizard_env["tmp"] / "rwkv.gguf"
    w = GGUFWriter(str(path), "rwkv6")
    w.add_context_length(4096)
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    app = SnugtuneApp(gpus=[], check_runs=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelScreen), what="the model step")
        box = app.screen.query_one(Input)
        box.value = str(path)
        box.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: "chosen:" in status_text(app), timeout=120, what="the choice")
        assert "architecture 'rwkv6' is none transformers can dequantize" in status_text(app), status_text(app)
