"""core.plan: one set of decisions, each with its reason, that the estimator prices and the engine runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core import estimate as E
from core import plan as P
from core.catalog import TINY_LLAMA, catalog_lookup
from core.config import ConfigError, RunConfig
from core.errors import UserError
from core.gpu import GpuTarget, resolve_gpu


def cfg(seq=1024, mb=1, accum=8, r=16, **train):
    return RunConfig.from_dict({
        "model": {"name_or_path": "x"},
        "data": {"path": "x", "max_seq_len": seq},
        "lora": {"r": r, "alpha": 2 * r},
        "train": {"micro_batch": mb, "grad_accum": accum, **train},
    })


def card(budget=7.79, bf16=True, total=None) -> GpuTarget:
    return GpuTarget(name="card", label="test card", budget_gib=budget, bf16=bf16, compute_capability=(8, 6),
                     fp16_tflops=20.0, bandwidth_gbs=300.0, total_gib=total or budget, cuda_context_gib=0.35)


Q15 = catalog_lookup("Qwen/Qwen2.5-1.5B")


def test_plan_imports_no_ml_stack():
    code = "import core.plan, sys, json; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & {"torch", "transformers", "peft", "bitsandbytes", "textual"}


def test_every_decision_says_why():
    p = P.plan(cfg(seq=32768), Q15, resolve_gpu("gtx-1650"))
    rows = p.decisions()
    assert {r[0] for r in rows} >= {"compute", "optimizer", "allocator cap", "loss", "MLP", "attention", "blocks",
                                    "CUDA graphs", "fp16 guard"}
    assert all(why.strip() for _, _, why in rows)
    assert p.compute_dtype == "fp16" and "bf16" in p.compute_dtype_why  # a GTX 1650 has none
    assert not p.cuda_graphs and "fp16" in p.cuda_graphs_why
    assert p.offload and "exceed" in p.offload_why  # 28 inputs of 32k tokens are far over 10% of 3.82 GiB
    # one meaning of the budget: the card's whole share, context included; the allocator gets the rest
    assert p.allocator_cap_gib == pytest.approx(3.82 - 0.35)
    assert json.loads(json.dumps(p.to_dict()))["blocks"]["offloaded"] is True  # plan.json is plain JSON


def test_kept_blocks_use_spare_memory_and_the_estimate_counts_them():
    p = P.plan(cfg(seq=1024), Q15, card())
    assert 0 < p.keep_blocks <= Q15.num_layers and p.cached_block_scales
    est = E.estimate(Q15, cfg(seq=1024), card(), plan=p)
    need = E.estimate(Q15, cfg(seq=1024), card(), keep_layers=0)
    assert est.total_gib > need.total_gib  # the kept activations (and expanded block scales) are in it
    assert est.total_gib <= P.KEEP_SHARE * card().budget_gib + 1e-9
    # per row length: shorter rows keep as many, longer ones none; long rows offload
    assert p.blocks_at(512).kept == p.keep_blocks
    assert p.blocks_at(4096).kept == 0
    assert p.blocks_at(64 * 1024).offloaded and p.blocks_at(64 * 1024).kept == 0
    # spare=False: what the run needs, every block checkpointed
    assert P.plan(cfg(seq=1024), Q15, card(), spare=False).keep_blocks == 0


def test_the_retry_after_out_of_memory_gives_up_spare_memory_first_then_halves_the_micro_batch():
    p = P.plan(cfg(seq=512, mb=4, accum=2), Q15, card())
    assert p.keep_blocks > 0 and p.cuda_graphs
    r1 = p.after_oom()
    assert (r1.micro_batch, r1.grad_accum) == (4, 2) and r1.keep_blocks == 0 and not r1.cuda_graphs
    assert r1.attempt == 1 and "out of memory" in r1.retry_why
    r2 = r1.after_oom()
    assert (r2.micro_batch, r2.grad_accum) == (2, 4)  # same effective batch
    r3 = r2.after_oom()
    assert (r3.micro_batch, r3.grad_accum) == (1, 8)
    assert r3.after_oom() is None  # nothing left to shrink
    assert P.oom_fallback(6, 3) == (3, 6)


def test_budget_above_the_card_zero_or_negative_is_one_user_error():
    with pytest.raises(UserError, match="more than"):
        resolve_gpu("gtx-1650", 500)
    with pytest.raises(UserError, match="positive"):
        resolve_gpu("gtx-1650", 0)
    with pytest.raises(UserError, match="more than"):
        P.check_budget(card(budget=8.0, total=3.82))
    with pytest.raises(ConfigError):
        RunConfig.from_dict({"model": {"name_or_path": "x"}, "data": {"path": "x"}, "gpu": {"vram_budget_gib": 0}})
    # the engine's target on a real card: above its memory is refused before anything loads
    device = {"type": "cuda", "name": "NVIDIA GeForce RTX 3050", "total_gib": 7.79, "capability": "8.6", "bf16": True}
    over = RunConfig.from_dict({"model": {"name_or_path": "x"}, "data": {"path": "x"},
                                "gpu": {"vram_budget_gib": 9.0}})
    with pytest.raises(UserError, match="more than"):
        P.plan(over, Q15, P.target_for_device(over, device))


@pytest.mark.parametrize("vram", ["500", "0", "-1"])
def test_cli_bad_budget_exits_2(vram, capsys):
    from tui.cli import main

    rc = main(["estimate", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "gtx-1650", "--vram", vram])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("error") == 1 and "GiB" in err


def test_a_named_profile_keeps_its_context_on_a_larger_card():
    # how a 4 GB card is simulated on a big one: the profile's 0.35 GiB context, the real card's size
    c = RunConfig.from_dict({"model": {"name_or_path": "x"}, "data": {"path": "x"},
                             "gpu": {"profile": "rtx-3050", "vram_budget_gib": 3.82}})
    h200 = {"type": "cuda", "name": "NVIDIA H200", "total_gib": 139.8, "capability": "9.0", "bf16": True}
    p = P.plan(c, Q15, P.target_for_device(c, h200))
    assert p.allocator_cap_gib == pytest.approx(3.47)
    auto = RunConfig.from_dict({"model": {"name_or_path": "x"}, "data": {"path": "x"}, "gpu": {"vram_budget_gib": 10}})
    assert P.plan(auto, Q15, P.target_for_device(auto, h200)).context_gib == pytest.approx(0.81)  # measured Hopper


def test_autofit_respects_the_models_positions():
    fit = E.fit_for(TINY_LLAMA, cfg(seq=999_936), card(24.0))
    assert fit.max_seq_len == TINY_LLAMA.max_position_embeddings == 2048
    assert any("positions" in n for n in fit.notes)
    full = E.fit_for(TINY_LLAMA, cfg(seq=256), card(24.0), from_full_context=True)
    assert full.max_seq_len == 2048


def test_autofit_keeps_a_setting_that_already_fits():
    # issue 14 item 13: a fitting config went to micro-batch 8 with offload, estimated slower
    spec = catalog_lookup("Qwen/Qwen2.5-0.5B")
    given = cfg(seq=1024, mb=1, accum=16)
    fit = E.fit_for(spec, given, resolve_gpu("gtx-1650"))
    assert fit.max_seq_len == 1024
    t_given = E.estimate_step_time(spec, given, resolve_gpu("gtx-1650"))
    t_fit = E.estimate_step_time(spec, cfg(seq=1024, mb=fit.micro_batch, accum=fit.grad_accum), resolve_gpu("gtx-1650"))
    assert t_fit <= t_given  # never slower by the estimate
    if not fit.changed:
        assert (fit.micro_batch, fit.grad_accum) == (1, 16)
    assert not fit.estimate.plan.offload


def test_offload_turns_on_where_only_offload_fits(monkeypatch):
    # (measured before core/kernels.py, whose smaller blocks let 3,136 tokens fit without offload)
    monkeypatch.setenv("SNUGTUNE_KERNELS", "off")
    # Gemma-2-2B on a 4 GB card: the block inputs are under 10% of the budget at 3k tokens, but
    # the run fits only with them in CPU memory (fit_truth run 1: auto-fit stopped at 40% before)
    g2 = catalog_lookup("google/gemma-2-2b")
    p = P.plan(cfg(seq=3136), g2, card(3.82))
    assert p.offload and "only" in p.offload_why
    assert E.estimate(g2, cfg(seq=3136), card(3.82), plan=p).verdict == "fits"
    assert E.fit_for(g2, cfg(seq=8192), card(3.82)).max_seq_len >= 3136


def test_a_configuration_that_cannot_fit_says_the_smallest_change():
    spec = catalog_lookup("Qwen/Qwen2.5-3B")
    fit = E.fit_for(spec, cfg(seq=2048), card(1.6))
    assert not fit.fits
    text = " ".join(fit.suggestions)
    assert "smaller model" in text and "Qwen/Qwen2.5-" in text and "larger budget" in text


def test_fp16_guard_field_defaults_to_not_needed():
    p = P.plan(cfg(), Q15, resolve_gpu("gtx-1650"))
    assert p.fp16_guard is False and p.fp16_guard_why.startswith("not needed")
    assert P.plan(cfg(), Q15, card()).fp16_guard_why.startswith("not needed")  # bf16


def test_the_savers_execute_the_plan_they_are_given():
    torch = pytest.importorskip("torch")
    from core import savers
    from core.catalog import spec_from_config
    from core.gpu import cpu_target
    from tests.test_savers import _lora, _tiny_llama

    m = _lora(_tiny_llama())
    spec = spec_from_config(savers._unwrap(m).config.to_dict(), "tiny", source="local")
    forced = P.plan(cfg(seq=128, mb=2, accum=1), spec, cpu_target(), keep=1)
    applied = savers.install_savers(m, forced)
    st = savers._unwrap(m)._snug_ckpt_state
    assert applied["uncheckpointed_blocks"] == 1 and st["upto"](torch.empty(2, 128, 64)) == spec.num_layers - 1
    retry = forced.after_oom()  # the engine installs the retry's plan: no kept blocks now
    savers.install_savers(m, retry)
    st = savers._unwrap(m)._snug_ckpt_state
    assert st["upto"](torch.empty(2, 128, 64)) == spec.num_layers


def test_viewers_read_the_plan_file(tmp_path):
    from core.train import write_plan

    p = P.plan(cfg(seq=512, mb=4, accum=2), Q15, card())
    write_plan(tmp_path, p)
    d = P.read_plan(tmp_path)
    assert d == json.loads(json.dumps(p.to_dict()))
    line = P.plan_summary(d)
    assert line.startswith("512 x 4 x 2, bf16, paged_adamw_8bit, cap 7.44 GiB") and "kept" in line
    write_plan(tmp_path, p.after_oom())  # the retry replaces it
    assert P.read_plan(tmp_path)["attempt"] == 1 and "retry 1" in P.plan_summary(P.read_plan(tmp_path))
    assert P.read_plan(tmp_path / "missing") is None and P.plan_summary(None) == ""


def test_without_a_budget_the_engine_plans_for_what_is_free():
    c = RunConfig.from_dict({"model": {"name_or_path": "x"}, "data": {"path": "x"}})
    device = {"type": "cuda", "name": "NVIDIA GeForce RTX 3060", "total_gib": 11.76, "capability": "8.6",
              "bf16": True, "free_gib": 9.0}  # a desktop holds 2.4 GiB
    t = P.target_for_device(c, device)
    assert t.budget_source == "free" and t.budget_gib == pytest.approx(9.0 + 0.35)
    assert P.plan(c, Q15, t).allocator_cap_gib == pytest.approx(9.0)


def test_snugtune_estimate_shows_the_plan(capsys):
    from tui.cli import main

    assert main(["estimate", "--model", "Qwen/Qwen2.5-1.5B", "--gpu", "gtx-1650", "--seq", "2048"]) == 0
    out = capsys.readouterr().out
    assert "plan (what the engine will do" in out and "allocator cap  3.47 GiB" in out and "CUDA graphs" in out
    assert main(["estimate", "--model", "Qwen/Qwen2.5-1.5B", "--gpu", "gtx-1650", "--autofit", "--full-context",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["plan"]["compute_dtype"] == "fp16" and d["plan"]["optimizer_why"]
    assert d["autofit"]["max_seq_len"] <= 131072 and d["plan"]["seq_len"] == d["autofit"]["max_seq_len"]


def test_a_row_shorter_than_the_planned_one_offloads_when_the_planned_one_does():
    """Memory must not fall as rows grow: under the 10% rule alone a packed row just under its line
    kept all its block inputs on the card, more than the planned row's two offloaded ones
    (Gemma-2-2B at 8,192 tokens, 8 GB card: 4.21 GiB allocated by rows of ~6,700 tokens where the
    estimate priced 3.43, fit_truth run 4)."""
    g2 = catalog_lookup("google/gemma-2-2b")
    p = P.plan(cfg(seq=8192), g2, card(7.79))
    assert p.offload and p.keep_blocks == 0
    line = int(P.AUTO_OFFLOAD_SHARE * p.budget_bytes / (g2.num_layers * g2.hidden_size * 2))
    assert 6000 < line < 8192  # a row of 6,700 tokens is under the rule's own line...
    assert not P.offload_rule("auto", True, True, g2.num_layers, 6700, g2.hidden_size, p.budget_bytes)[0]
    for n in (128, 2048, 6700, line, 8192):  # ...and still offloads, as the planned row does
        assert p.blocks_at(n).offloaded, n
    # a plan that does not offload at its length offloads none shorter; 'off' never does
    short = P.plan(cfg(seq=1024), Q15, card())
    assert not short.offload and not short.blocks_at(512).offloaded


def test_a_row_shorter_than_a_tiled_planned_row_holds_no_more_than_one_mlp_tile():
    """Rows up to two tiles ran the MLP whole: a packed row just under two tiles held twice the
    planned row's one tile (Gemma-2-2B planned at 8,192 tokens: rows of ~6,700 took 3.56 GiB
    allocated, the planned length 3.31, fit_truth runs 5 and 5b)."""
    g2 = catalog_lookup("google/gemma-2-2b")
    long = P.plan(cfg(seq=8192), g2, card(7.79))
    t = long.mlp_tile_at(1)
    assert long.mlp_tile_tokens == t and 8192 >= 2 * t > 6700 > t
    assert long.mlp_whole_below(1) == t  # the planned row is tiled: so is any row over one tile
    short = P.plan(cfg(seq=4096), g2, card(7.79))  # planned rows run whole: shorter ones too
    assert short.mlp_whole_below(1) == 2 * t and "run whole" in short.mlp_why


def test_the_savers_tile_what_the_plan_says():
    import torch

    from core import savers

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 32)
            self.down = torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    for whole_below, T, tiled in ((lambda b: 16, 24, True), (lambda b: 32, 24, False), (None, 24, False)):
        mlp = MLP()
        savers.tiled_mlp_forward(mlp, 32, tile=16, whole_below=whole_below)
        x = torch.randn(1, T, 8, requires_grad=True)
        out = mlp(x)
        assert ("TiledMLP" in type(out.grad_fn).__name__) is tiled, (T, tiled, type(out.grad_fn).__name__)
        ref = MLP()
        ref.load_state_dict(mlp.state_dict())
        assert torch.allclose(out, ref(x), atol=1e-6)


def test_the_plan_decides_the_fused_kernels_and_says_why(monkeypatch):
    """core/kernels.py runs where the plan says, for the reason it gives (the savers only execute it)."""
    import dataclasses
    import importlib.util

    have_triton = importlib.util.find_spec("triton") is not None
    gtx = resolve_gpu("gtx-1650")
    on = P.plan(cfg(seq=1024), Q15, gtx)
    assert on.kernels == have_triton and ("fused Triton" in on.kernels_why if have_triton
                                          else "not installed" in on.kernels_why)
    assert ("kernels", "fused" if have_triton else "off", on.kernels_why) in on.decisions()
    cpu = P.plan(cfg(seq=1024), Q15, resolve_gpu("cpu"))
    assert not cpu.kernels and cpu.kernels_why == "not on a CUDA device"
    pascal = P.plan(cfg(seq=1024), Q15, dataclasses.replace(gtx, compute_capability=(6, 1)))
    assert not pascal.kernels and "7.0 or newer (this one: 6.1)" in pascal.kernels_why
    compiled = P.plan(cfg(seq=1024, compile=True), Q15, gtx)
    assert not compiled.kernels and "train.compile" in compiled.kernels_why
    monkeypatch.setenv("SNUGTUNE_KERNELS", "off")
    off = P.plan(cfg(seq=1024), Q15, gtx)
    assert not off.kernels and off.kernels_why == "SNUGTUNE_KERNELS=off"
    record = json.loads(json.dumps(off.to_dict()))  # what plan.json and run_started carry
    assert record["kernels"] is False and record["kernels_why"] == "SNUGTUNE_KERNELS=off"
