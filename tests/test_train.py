"""The engine on the real 4-bit QLoRA path, on the CPU: load, train, stop, resume, save, reload.

One uninterrupted reference run and one stopped-and-resumed run of the same configuration are
shared by the whole module (a few seconds each on 2 cores); the tests read their outcomes.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_config
from core import runs
from core.events import read_events
from core.plan import optimizer as pick_optimizer
from core.train import Engine, oom_fallback, planned_steps

STEPS = 8
STOP_AFTER = 4  # the interrupted run stops after this step; save_steps=5 so only the stop saves it


def _cfg(tiny_model_dir, data, runs_dir, *extra):
    return make_tiny_config(tiny_model_dir, data, runs_dir, f"train.max_steps={STEPS}", "train.save_steps=5", *extra)


def _losses(events):
    return {e["step"]: e["loss"] for e in events if e["event"] == "step_logged"}


@pytest.fixture(scope="module")
def module_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("train-runs")


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tiny_instruction_jsonl, module_runs):
    run_dir = runs.create_run_dir(_cfg(tiny_model_dir, tiny_instruction_jsonl, module_runs))
    engine = Engine(run_dir)
    rc = engine.run()
    return run_dir, rc, read_events(run_dir), engine


class _StopBefore:
    """Asks the engine to stop the way a viewer does (the `stop` file), just before a step."""

    def __new__(cls, run_dir: Path, step: int):
        from transformers import TrainerCallback

        class StopBefore(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == step - 1:
                    (run_dir / "stop").touch()

        return StopBefore()


@pytest.fixture(scope="module")
def resumed_run(tiny_model_dir, tiny_instruction_jsonl, module_runs):
    run_dir = runs.create_run_dir(_cfg(tiny_model_dir, tiny_instruction_jsonl, module_runs))
    rc_stop = Engine(run_dir, callbacks=[_StopBefore(run_dir, STOP_AFTER)]).run()
    after_stop = read_events(run_dir)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    had_adapter = (run_dir / "adapter").exists()
    rc_resume = Engine(run_dir).run()
    return {"dir": run_dir, "rc_stop": rc_stop, "after_stop": after_stop, "ckpts": ckpts,
            "had_adapter": had_adapter, "rc_resume": rc_resume, "events": read_events(run_dir)}


# ---- the model ----------------------------------------------------------------------------------


def test_model_loads_in_4bit_nf4_with_lora_on_every_linear_projection(tiny_run_config):
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from core.model import load_for_training, select_device

    cfg = tiny_run_config()
    model, tok, info = load_for_training(cfg, select_device(cfg))
    linear4 = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # 2 layers x 7 projections (q, k, v, o, gate, up, down); the output head stays unquantized.
    assert len(linear4) == 14 == info["linear4bit_layers"]
    assert not any("lm_head" in n for n in linear4)
    some = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert some.weight.quant_type == "nf4" and some.weight.quant_state.nested  # double quantization
    lora = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora) == 14 and not any("lm_head" in n for n in lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert info["compute_dtype"] == "fp32" and tok.pad_token_id is not None


def test_16bit_lora_when_4bit_is_off(tiny_run_config):
    import bitsandbytes as bnb

    from core.model import load_for_training, select_device

    cfg = tiny_run_config("model.load_in_4bit=false", "lora.target_modules=['q_proj', 'v_proj']")
    model, _, info = load_for_training(cfg, select_device(cfg))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert info["linear4bit_layers"] == 0
    assert sorted({n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}) == \
        ["q_proj", "v_proj"]


def test_unknown_lora_targets_are_a_user_error(tiny_run_config):
    from core.errors import UserError
    from core.model import load_for_training, select_device

    cfg = tiny_run_config("lora.target_modules=['no_such_proj']")
    with pytest.raises(UserError, match="(?s)no_such_proj.*q_proj"):
        load_for_training(cfg, select_device(cfg))


def test_compute_dtype_follows_the_hardware():
    from core.model import pick_compute_dtype

    assert pick_compute_dtype("auto", {"type": "cuda", "bf16": True}) == "bf16"
    assert pick_compute_dtype("auto", {"type": "cuda", "bf16": False}) == "fp16"  # GTX 16xx, T4
    assert pick_compute_dtype("auto", {"type": "cpu", "bf16": False}) == "fp32"
    assert pick_compute_dtype("fp16", {"type": "cuda", "bf16": True}) == "fp16"


def test_a_gpu_profile_without_a_gpu_is_a_user_error(tiny_run_config):
    from core.errors import UserError
    from core.model import select_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="gpu.profile=cpu"):
        select_device(tiny_run_config("gpu.profile='gtx-1650'"))


# ---- pure decisions ------------------------------------------------------------------------------


@pytest.mark.parametrize("mb,ga", [(8, 2), (6, 1), (5, 3), (2, 16), (3, 4)])
def test_oom_fallback_keeps_the_effective_batch(mb, ga):
    new_mb, new_ga = oom_fallback(mb, ga)
    assert new_mb <= mb // 2 and new_mb >= 1
    assert new_mb * new_ga == mb * ga


def test_oom_fallback_gives_up_at_micro_batch_one():
    chain, state = [], (16, 1)
    while state is not None:
        chain.append(state)
        state = oom_fallback(*state)
    assert chain == [(16, 1), (8, 2), (4, 4), (2, 8), (1, 16)]
    assert oom_fallback(1, 64) is None


def test_planned_steps_and_optimizer_choice():
    assert planned_steps(100, 4, 2, 1.0, None) == 13  # 25 batches -> 12 full + 1 partial accumulation
    assert planned_steps(100, 4, 2, 2.0, None) == 26
    assert planned_steps(100, 4, 2, 1.0, 7) == 7
    assert pick_optimizer("auto", True)[0] == "paged_adamw_8bit"
    assert pick_optimizer("auto", False)[0] == "adamw_torch"
    assert pick_optimizer("adamw_8bit", True)[0] == "adamw_8bit"


# ---- training ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_trains_the_loss_down_and_logs_every_event(reference_run):
    run_dir, rc, events, _ = reference_run
    assert rc == 0
    names = [e["event"] for e in events]
    assert names[-1] == "run_finished" and names.count("run_started") == 1
    started = next(e for e in events if e["event"] == "run_started")
    assert started["total_steps"] == STEPS and started["device"]["type"] == "cpu"
    assert started["model"]["linear4bit_layers"] == 14 and started["versions"]["bitsandbytes"]
    assert started["config"]["train"]["max_steps"] == STEPS and started["resumed_from"] is None
    # the plan the engine executed (core.plan): in the event and in plan.json beside it
    plan = json.loads((run_dir / "plan.json").read_text())
    assert started["plan"] == plan and plan["device"] == "cpu" and plan["optimizer"] == "adamw_torch"
    assert plan["compute_dtype"] == "fp32" and plan["allocator_cap_gib"] is None and plan["blocks"]["kept"] == 0
    prepared = next(e for e in events if e["event"] == "data_prepared")
    assert prepared["format"] == "instruction" and prepared["train_samples"] > 0
    steps = [e for e in events if e["event"] == "step_logged"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    for e in steps:
        assert e["total_steps"] == STEPS and e["tokens_per_s"] > 0 and e["learning_rate"] > 0
        assert e["grad_norm"] is not None and "mem_allocated_gib" in e and "eta_s" in e
    losses = [e["loss"] for e in steps]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert any(e["event"] == "eval_logged" for e in events)
    assert [e["step"] for e in events if e["event"] == "checkpoint_saved"] == [5, STEPS]  # every 5, and the last
    finished = events[-1]
    assert finished["steps"] == STEPS and finished["final_loss"] == losses[-1]
    adapter = Path(finished["adapter_path"])
    assert adapter == run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file()
    assert not (run_dir / "adapter.tmp").exists() and not (run_dir / "stop").exists()


@pytest.mark.slow
def test_a_stop_request_checkpoints_and_a_resumed_run_continues_the_curve(reference_run, resumed_run):
    r = resumed_run
    assert r["rc_stop"] == 0 and r["after_stop"][-1]["event"] == "run_stopped"
    assert r["after_stop"][-1]["step"] == STOP_AFTER
    assert r["ckpts"] == [f"checkpoint-{STOP_AFTER}"] and not r["had_adapter"]
    assert r["rc_resume"] == 0
    events = r["events"]
    starts = [e for e in events if e["event"] == "run_started"]
    assert len(starts) == 2 and starts[1]["resumed_from"].endswith(f"checkpoint-{STOP_AFTER}")
    second = events[events.index(starts[1]):]
    resumed_steps = [e["step"] for e in second if e["event"] == "step_logged"]
    assert resumed_steps == list(range(STOP_AFTER + 1, STEPS + 1))
    # Same seed, same data order, optimizer and scheduler restored: the curve is the reference's.
    ref = _losses(reference_run[2])
    got = _losses(events)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-3), (step, got, ref)
    lrs = {e["step"]: e["learning_rate"] for e in events if e["event"] == "step_logged"}
    ref_lrs = {e["step"]: e["learning_rate"] for e in reference_run[2] if e["event"] == "step_logged"}
    assert lrs == pytest.approx(ref_lrs)
    assert events[-1]["event"] == "run_finished" and events[-1]["steps"] == STEPS


@pytest.mark.slow
def test_a_finished_run_is_not_retrained_and_its_log_stays_intact(reference_run):
    run_dir = reference_run[0]
    before = (run_dir / "events.jsonl").read_text()
    assert Engine(run_dir).run() == 2
    assert (run_dir / "events.jsonl").read_text() == before


@pytest.mark.slow
def test_the_saved_adapter_reloads_with_peft_and_generates(reference_run, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.model import quantization_config

    adapter = reference_run[0] / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved and any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # B starts at 0: it trained
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization_config("fp32"),
                                                dtype=torch.float32, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, str(adapter))
    tok = AutoTokenizer.from_pretrained(adapter)
    ids = tok("What does len do?", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        tuned_logits = model(ids).logits
        with model.disable_adapter():
            base_logits = model(ids).logits
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0, ids.shape[1]:]), str)
    assert not torch.allclose(tuned_logits, base_logits)  # the adapter changes the model


@pytest.mark.slow
def test_chat_answers_over_json_lines_with_and_without_the_adapter(reference_run):
    from core.chat import serve

    stdin = io.StringIO(
        json.dumps({"id": 1, "prompt": "What does len do?", "max_new_tokens": 6, "compare": True}) + "\n"
        + "this is not json\n"
        + json.dumps({"id": 2, "prompt": ""}) + "\n"
        + json.dumps({"cmd": "quit"}) + "\n"
        + json.dumps({"id": 3, "prompt": "never read"}) + "\n"
    )
    stdout = io.StringIO()
    assert serve(reference_run[0], stdin, stdout) == 0
    out = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [o["event"] for o in out] == ["ready", "reply", "error", "error"]
    assert out[0]["adapter"].endswith("adapter")
    assert out[1]["id"] == 1 and isinstance(out[1]["response"], str) and isinstance(out[1]["base"], str)
    assert out[3]["id"] == 2 and "prompt" in out[3]["error"]


def test_chat_on_a_run_without_adapter_says_so(tmp_path, tiny_run_config):
    from core.chat import serve

    run_dir = runs.create_run_dir(tiny_run_config())
    stdout = io.StringIO()
    assert serve(run_dir, io.StringIO(""), stdout) == 2
    reply = json.loads(stdout.getvalue())
    assert reply["event"] == "error" and "no adapter yet" in reply["error"]


@pytest.mark.slow
def test_export_merges_the_adapter_and_refuses_an_existing_dir(reference_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.errors import UserError
    from core.export import export_merged

    out = export_merged(reference_run[0], tmp_path / "merged")
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not (tmp_path / "merged.tmp").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(reference_run[0] / "adapter"))
    # the export is 16-bit (bf16 for a CPU fp32 run): the fp32 merge, rounded once
    want = peft_model.merge_and_unload().to(torch.bfloat16).state_dict()
    got = merged.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        export_merged(reference_run[0], tmp_path / "taken")
    assert list((tmp_path / "taken").iterdir()) == []


def test_bad_data_fails_the_run_with_a_user_error_and_no_adapter(tiny_run_config, tmp_path):
    run_dir = runs.create_run_dir(tiny_run_config(f"data.path='{tmp_path / 'missing.jsonl'}'"))
    assert Engine(run_dir).run() == 2
    events = read_events(run_dir)
    assert events[-1]["event"] == "run_failed" and events[-1]["kind"] == "user"
    assert "missing.jsonl" in events[-1]["error"]
    assert not (run_dir / "adapter").exists() and not (run_dir / "adapter.tmp").exists()
    assert runs.run_status(run_dir)["status"] == "failed"


class _OutOfMemoryOnce:
    """Raises the error CUDA raises when memory runs out, once, before a given step.

    The CPU cannot run out of GPU memory; this puts the same exception where a real one
    comes from (inside the training loop), so the engine's whole recovery runs for real.
    """

    def __new__(cls, before_step: int):
        from transformers import TrainerCallback

        class OutOfMemoryOnce(TrainerCallback):
            fired = False

            def on_step_begin(self, args, state, control, **kwargs):
                if not OutOfMemoryOnce.fired and state.global_step == before_step - 1:
                    OutOfMemoryOnce.fired = True
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

        return OutOfMemoryOnce()


@pytest.mark.slow
def test_out_of_memory_halves_the_micro_batch_and_resumes_from_the_checkpoint(tiny_run_config):
    cfg = tiny_run_config("train.max_steps=6", "train.save_steps=2", "data.eval_fraction=0")
    run_dir = runs.create_run_dir(cfg)
    assert Engine(run_dir, callbacks=[_OutOfMemoryOnce(before_step=4)]).run() == 0
    events = read_events(run_dir)
    recovered = [e for e in events if e["event"] == "oom_recovered"]
    assert len(recovered) == 1
    assert (recovered[0]["micro_batch"], recovered[0]["grad_accum"]) == (2, 2)  # same effective batch, 4
    assert recovered[0]["step"] == 3 and recovered[0]["resume_from"].endswith("checkpoint-2")
    # the retry's plan is in the event and replaces plan.json
    assert recovered[0]["plan"]["micro_batch"] == 2 and recovered[0]["plan"]["attempt"] == 1
    assert json.loads((run_dir / "plan.json").read_text())["grad_accum"] == 2
    steps = [(e["step"], e["micro_batch"], e["grad_accum"]) for e in events if e["event"] == "step_logged"]
    # Steps 1-3 at micro-batch 4; step 3 is redone from checkpoint-2 at micro-batch 2 x 2.
    assert steps == [(1, 4, 1), (2, 4, 1), (3, 4, 1), (3, 2, 2), (4, 2, 2), (5, 2, 2), (6, 2, 2)]
    assert events[-1]["event"] == "run_finished" and (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_out_of_memory_without_recovery_fails_with_kind_oom(tiny_run_config):
    cfg = tiny_run_config("train.max_steps=3", "train.oom_recovery=false", "data.eval_fraction=0")
    run_dir = runs.create_run_dir(cfg)
    assert Engine(run_dir, callbacks=[_OutOfMemoryOnce(before_step=2)]).run() == 3
    failed = read_events(run_dir)[-1]
    assert failed["event"] == "run_failed" and failed["kind"] == "oom"
    assert "micro-batch 4" in failed["error"] and "train.oom_recovery" in failed["error"]
    assert not (run_dir / "adapter").exists()


@pytest.mark.slow
def test_a_diverged_run_fails_with_a_clear_message_instead_of_training_on(tiny_run_config):
    from transformers import TrainerCallback

    class PoisonAdapter(TrainerCallback):
        """Puts a NaN into one adapter weight after step 1: what a diverging run looks like."""

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    run_dir = runs.create_run_dir(tiny_run_config("train.max_steps=8", "data.eval_fraction=0"))
    assert Engine(run_dir, callbacks=[PoisonAdapter()]).run() == 2
    events = read_events(run_dir)
    steps = [e for e in events if e["event"] == "step_logged"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]  # three non-finite steps in a row, then it stops
    assert all(e["loss"] != e["loss"] for e in steps[1:])  # NaN is logged as NaN, not filtered to a number
    assert events[-1]["event"] == "run_failed" and "diverged" in events[-1]["error"]
    assert not (run_dir / "adapter").exists()
