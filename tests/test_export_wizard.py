"""The wizard's done step exports: the choice (merged, GGUF at a quant, Ollama) with estimated
sizes, the export run in a subprocess with its progress shown, and an existing path refused."""
from __future__ import annotations

import json

import pytest

from test_tui_helpers import finished_run, status_text, wait_for, wizard_env  # noqa: F401

SIZE = (80, 24)


def _real_adapter(run_dir):
    """A LoRA adapter of the demo model in run_dir/adapter (random weights, written with peft)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.demo import resolve_builtin

    base = AutoModelForCausalLM.from_pretrained(resolve_builtin("builtin:tiny-llama"), dtype=torch.float32)
    torch.manual_seed(3)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(run_dir / "adapter"))


def test_export_sizes_come_from_the_logged_parameter_count(tmp_path):
    from core.events import EventWriter
    from tui.screens.done import _size_label, export_sizes

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": 262144, "hidden_size": 640}))
    ev = EventWriter(tmp_path / "events.jsonl")
    ev.emit("run_started", model={"total_params": 268_098_176 + 1_000_000, "trainable_params": 1_000_000,
                                  "source": str(model_dir)})
    ev.close()
    sizes = export_sizes(tmp_path)
    assert sizes["merged"] == 2 * 268_098_176
    assert sizes["f16"] > sizes["q8_0"] > sizes["q5_k_m"] > sizes["q4_k_m"]
    # Gemma 3 270M's measured q4_k_m GGUF is 253 MB (bench/results/gguf_export_gemma3_270m.json):
    # most of it is the 168M-parameter embedding, which k-quant mixes keep at 8 bits or so
    assert 200e6 < sizes["q4_k_m"] < 300e6, sizes
    assert _size_label(None) == "size unknown" and _size_label(253_000_000) == "~253 MB"


@pytest.mark.slow  # the export runs as `snugtune export` in a subprocess
async def test_done_step_exports_merged_weights_and_refuses_an_existing_path(wizard_env):
    from textual.widgets import Input, OptionList

    from tui.app import SnugtuneApp
    from tui.screens.done import DoneScreen, ExportChoiceScreen
    from tui.screens.modals import PromptScreen

    run_dir = finished_run(wizard_env["runs"])
    _real_adapter(run_dir)
    from test_tui_helpers import demo_app

    app = SnugtuneApp(demo_app().config(), attach=run_dir, gpus=[])
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.screen.state == "finished", what="the replayed run")
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, DoneScreen)
        await pilot.press("ctrl+e")
        await wait_for(pilot, lambda: isinstance(app.screen, ExportChoiceScreen), what="the export choice")
        options = app.screen.query_one("#export-choice", OptionList)
        labels = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert any("GGUF q4_k_m" in s for s in labels) and any("Ollama" in s for s in labels)
        assert any("Merged 16-bit" in s for s in labels)
        options.highlighted = [options.get_option_at_index(i).id for i in range(options.option_count)].index("merged:bf16")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen), what="the destination prompt")
        assert app.screen.query_one("#prompt", Input).value == str(run_dir / "merged")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "exported:" in status_text(app) or "failed" in status_text(app),
                       timeout=600, what="the export")
        assert "exported:" in status_text(app), status_text(app)
        assert (run_dir / "merged" / "model.safetensors").is_file()

        # the same destination again: refused, and the merged model is untouched
        before = (run_dir / "merged" / "model.safetensors").stat().st_mtime_ns
        await pilot.press("ctrl+e")
        await wait_for(pilot, lambda: isinstance(app.screen, ExportChoiceScreen), what="the export choice")
        options = app.screen.query_one("#export-choice", OptionList)
        options.highlighted = [options.get_option_at_index(i).id for i in range(options.option_count)].index("merged:bf16")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen), what="the destination prompt")
        box = app.screen.query_one("#prompt", Input)
        assert box.value == str(run_dir / "merged-2")  # a free path is offered the second time
        box.value = str(run_dir / "merged")  # the user types the taken one anyway
        await pilot.press("enter")
        await wait_for(pilot, lambda: "already exists" in status_text(app), what="the refusal")
        assert (run_dir / "merged" / "model.safetensors").stat().st_mtime_ns == before
