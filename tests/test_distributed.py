"""Several processes, one run (core.distributed): `snugtune train demo --nproc 2` on the CPU.

Two engine ranks under torchrun with the gloo backend, as CI runs them (no GPU needed): the
losses of --nproc 2 at micro-batch 2 are those of one process at micro-batch 4 (the same rows
in each optimizer step, the same effective batch), step by step within 1e-3; one log, one
plan and one set of checkpoints, written by rank 0; a stop only rank 0 hears of, then
`snugtune stop` and `snugtune resume`, end on the uninterrupted curve; an out-of-memory error on
rank 1 restarts both ranks with micro-batch 1 x accumulation 2 and the same curve.

The model and data are the built-in demo's (core/demo.py). Each two-process run costs two
interpreters importing torch, so the module is marked slow; no assertion is about time.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import runs
from core.events import read_events

pytestmark = pytest.mark.slow

STEPS = 10
SNUGTUNE = Path(sys.executable).parent / "snugtune"
CMD = [str(SNUGTUNE)] if SNUGTUNE.exists() else [sys.executable, "-m", "tui.cli"]
LONG = 600  # a ceiling for one command on a loaded 2-core machine (not a timing assertion)
TESTS = Path(__file__).resolve().parent
# Packed demo rows, no dropout (each rank has its own random stream), no eval (speed).
COMMON = ["gpu.profile=cpu", f"train.max_steps={STEPS}", "train.save_steps=5", "train.save_total_limit=3",
          "data.eval_fraction=0", "lora.dropout=0"]
REFERENCE_TOKENS: dict = {}  # the reference run's tokens_seen at its last step


def snugtune(*args, hook=None, runs_dir: Path, env=None, timeout=LONG) -> subprocess.CompletedProcess:
    env = {**os.environ, "SNUGTUNE_RUNS_DIR": str(runs_dir), **(env or {})}
    env["PYTHONPATH"] = str(TESTS) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if hook:
        env["SNUGTUNE_CALLBACKS"] = "distributed_hooks:Hook"
        env["SNUGTUNE_TEST_HOOK"] = hook
    else:
        env.pop("SNUGTUNE_CALLBACKS", None)
    return subprocess.run([*CMD, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def train_two(runs_dir: Path, *extra: str, hook=None) -> tuple[subprocess.CompletedProcess, Path]:
    sets = [a for s in [*COMMON, "train.micro_batch=2", *extra] for a in ("--set", s)]
    done = snugtune("train", "demo", "--nproc", "2", "--no-preflight", *sets, hook=hook, runs_dir=runs_dir)
    m = re.search(r"^run directory: (.+)$", done.stdout, re.MULTILINE)
    assert m, (done.stdout, done.stderr)
    return done, Path(m.group(1).strip())


def losses(events) -> dict[int, float]:
    """Each step's loss as the run ended up with it (a step redone after a restart: its last)."""
    return {e["step"]: e["loss"] for e in events if e["event"] == "step_logged"}


def assert_curve(got: dict, reference: dict) -> None:
    assert sorted(got) == list(range(1, STEPS + 1)), got
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-3), (step, got, reference)


def engine_log(run_dir: Path) -> str:
    try:
        return (run_dir / "engine.log").read_text(errors="replace")[-6000:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist-runs")


@pytest.fixture(scope="module")
def reference(runs_dir) -> dict[int, float]:
    """One process at micro-batch 4 (`snugtune train demo`, no --nproc): the curve every two-process
    run must give. One thread, as torchrun gives each rank: on a loaded 2-core machine, two spinning
    OpenMP threads made this run 10x slower than it is alone."""
    sets = [a for s in [*COMMON, "train.micro_batch=4"] for a in ("--set", s)]
    done = snugtune("train", "demo", "--no-preflight", *sets, runs_dir=runs_dir, env={"OMP_NUM_THREADS": "1"})
    m = re.search(r"^run directory: (.+)$", done.stdout, re.MULTILINE)
    assert m and done.returncode == 0, (done.stdout, done.stderr)
    run_dir = Path(m.group(1).strip())
    events = read_events(run_dir)
    got = losses(events)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [e["world_size"] for e in events if e["event"] == "run_started"] == [1]
    REFERENCE_TOKENS["n"] = [e for e in events if e["event"] == "step_logged"][-1]["tokens_seen"]
    return got


def test_two_processes_at_micro_batch_2_give_the_losses_of_one_at_4_and_write_one_log(runs_dir, reference):
    done, run_dir = train_two(runs_dir)
    assert done.returncode == 0, (done.stdout, done.stderr, engine_log(run_dir))
    events = read_events(run_dir)
    assert_curve(losses(events), reference)
    # rank 0 alone writes the log: one run_started (with the world size), one line a step, one end
    started = [e for e in events if e["event"] == "run_started"]
    assert len(started) == 1 and started[0]["world_size"] == 2
    assert [e["step"] for e in events if e["event"] == "step_logged"] == list(range(1, STEPS + 1))
    assert [e["event"] for e in events].count("run_finished") == 1 and events[-1]["event"] == "run_finished"
    assert [e["step"] for e in events if e["event"] == "checkpoint_saved"] == [5, 10]
    # the plan says what a step is: 2 rows on each of 2 processes, per-GPU figures
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["micro_batch"], plan["grad_accum"], plan["world_size"], plan["effective_batch"]) == (2, 1, 2, 4)
    assert started[0]["plan"]["world_size"] == 2
    # the supervisor's pid (not a rank's) is the run's; both ranks' RNG states are in each checkpoint
    assert runs.run_status(run_dir)["status"] == "finished"
    for _, ckpt in runs.checkpoints(run_dir):
        assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
        assert runs.verify_checkpoint(ckpt) is None
    assert not (run_dir / "failures").exists() and not (run_dir / "stop").exists()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # the tokens of both ranks are counted: the same rows, so the one process's count
    assert [e for e in events if e["event"] == "step_logged"][-1]["tokens_seen"] == REFERENCE_TOKENS["n"]


def test_a_stop_one_rank_hears_of_stops_both_and_stop_resume_finish_the_same_curve(runs_dir, reference):
    # 1. rank 0 alone is signalled before step 3: both ranks checkpoint step 3 and stop
    done, run_dir = train_two(runs_dir, hook="sigterm:0:3")
    assert done.returncode == 0, (done.stdout, done.stderr, engine_log(run_dir))
    events = read_events(run_dir)
    assert events[-1]["event"] == "run_stopped" and events[-1]["step"] == 3, events[-1]
    assert Path(events[-1]["checkpoint"]).name == "checkpoint-3"
    assert runs.run_status(run_dir)["status"] == "stopped"

    # 2. resumed in the background, held before step 6 until `snugtune stop --wait` has arrived
    (run_dir / "paused").unlink(missing_ok=True)
    resumed = snugtune("resume", str(run_dir), "--detach", hook="pause:0:6", runs_dir=runs_dir)
    assert resumed.returncode == 0, resumed.stderr
    deadline = time.monotonic() + LONG
    while not (run_dir / "paused").exists():
        assert time.monotonic() < deadline, engine_log(run_dir)
        assert runs.run_status(run_dir)["status"] in ("running", "stopped"), engine_log(run_dir)
        time.sleep(0.05)
    stopped = snugtune("stop", str(run_dir), "--wait", runs_dir=runs_dir)
    assert stopped.returncode == 0, (stopped.stdout, stopped.stderr, engine_log(run_dir))
    assert "stopped at step 6" in stopped.stdout, stopped.stdout
    assert runs.run_status(run_dir)["status"] == "stopped"

    # 3. resumed in the foreground: it ends at exactly max_steps, on the uninterrupted curve
    final = snugtune("resume", str(run_dir), runs_dir=runs_dir)
    assert final.returncode == 0, (final.stdout, final.stderr, engine_log(run_dir))
    events = read_events(run_dir)
    assert_curve(losses(events), reference)
    assert events[-1]["event"] == "run_finished" and events[-1]["steps"] == STEPS
    assert [e["resumed_from"] and Path(e["resumed_from"]).name for e in events if e["event"] == "run_started"] == \
        [None, "checkpoint-3", "checkpoint-6"]


def test_out_of_memory_on_one_rank_restarts_both_at_half_the_micro_batch_on_the_same_curve(runs_dir, reference):
    done, run_dir = train_two(runs_dir, "train.save_steps=2", hook="oom:1:4")
    assert done.returncode == 0, (done.stdout, done.stderr, engine_log(run_dir))
    events = read_events(run_dir)
    recovered = [e for e in events if e["event"] == "oom_recovered"]
    assert len(recovered) == 1, engine_log(run_dir)
    r = recovered[0]
    assert (r["micro_batch"], r["grad_accum"], r["world_size"], r["step"]) == (1, 2, 2, 3)
    assert Path(r["resume_from"]).name == "checkpoint-2" and r["plan"]["effective_batch"] == 4
    assert json.loads((run_dir / "plan.json").read_text())["micro_batch"] == 1
    # no failure reached the log: the restart is part of the run, which ends once
    assert not [e for e in events if e["event"] == "run_failed"]
    steps = [(e["step"], e["micro_batch"], e["grad_accum"]) for e in events if e["event"] == "step_logged"]
    assert steps == [(1, 2, 1), (2, 2, 1), (3, 2, 1), *[(s, 1, 2) for s in range(3, STEPS + 1)]]
    # the same rows a step (packed rows: the seeded sampler's order, whatever the micro-batch)
    assert_curve(losses(events), reference)
    assert events[-1]["event"] == "run_finished"


@pytest.mark.parametrize("n_rows", [64, 61])
def test_the_length_bucket_order_split_over_two_ranks_is_the_one_process_order(n_rows):
    """Unpacked rows: the engine's sampler at micro-batch 2 on 2 ranks, cut by accelerate's own
    BatchSamplerShard as the Trainer's dataloader is, gives each optimizer step the rows one
    process at micro-batch 4 reads (no training: the real sampler code, the real shard)."""
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from core.train import _counting_trainer

    trainer_cls = _counting_trainer(None)
    rows = [{"input_ids": [0] * (3 + (i * 37) % 50)} for i in range(n_rows)]  # lengths 3-52, mixed

    def sampler(micro_batch: int, world: int):
        fake = SimpleNamespace(snug_length_buckets=True, train_dataset=rows, args=SimpleNamespace(
            data_seed=7, seed=7, train_batch_size=micro_batch, world_size=world))
        return trainer_cls._get_train_sampler(fake)

    one = list(BatchSampler(sampler(4, 1), 4, drop_last=False))
    ranks = [list(BatchSamplerShard(BatchSampler(sampler(2, 2), 2, drop_last=False), num_processes=2,
                                    process_index=r, split_batches=False, even_batches=True)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    full = n_rows // 4  # every whole global micro-batch: rank 0's half, then rank 1's
    for step in range(full):
        assert ranks[0][step] + ranks[1][step] == one[step], step
    if n_rows % 4:
        # the epoch's short last batch (here 1 row): accelerate's even_batches tops it up with the
        # epoch's first rows so that both ranks step (a known difference: one process trains it alone)
        padded = ranks[0][full] + ranks[1][full]
        assert padded[: len(one[full])] == one[full] and padded[len(one[full]):] == one[0][: 4 - len(one[full])]


def test_a_failure_on_one_rank_is_said_once_by_the_supervisor_naming_that_rank(runs_dir):
    done, run_dir = train_two(runs_dir, "train.max_steps=4", hook="fail:1:2")
    assert done.returncode == 1, (done.stdout, done.stderr, engine_log(run_dir))
    events = read_events(run_dir)
    failed = [e for e in events if e["event"] == "run_failed"]
    # rank 1's error, not the broken connection it then left rank 0 with
    assert len(failed) == 1 and events[-1] is failed[0], failed
    assert failed[0]["rank"] == 1 and failed[0]["kind"] == "internal"
    assert "injected failure on one rank" in failed[0]["error"] and failed[0]["step"] == 1
    assert runs.run_status(run_dir)["status"] == "failed"
    assert "failed (internal): RuntimeError: injected failure on one rank" in done.stdout


def test_the_plan_is_per_gpu_and_says_the_effective_batch():
    from core.catalog import catalog_lookup
    from core.config import RunConfig
    from core.gpu import resolve_gpu
    from core.plan import plan, plan_summary

    spec = catalog_lookup("Qwen/Qwen2.5-1.5B")
    base = {"model": {"name_or_path": spec.id}, "data": {"path": "x.jsonl", "max_seq_len": 2048},
            "train": {"micro_batch": 2, "grad_accum": 4}}
    one = plan(RunConfig.from_dict(base), spec, resolve_gpu("rtx-3090"))
    two = plan(RunConfig.from_dict({**base, "gpu": {"nproc": 2}}), spec, resolve_gpu("rtx-3090"))
    assert (one.world_size, one.effective_batch, two.world_size, two.effective_batch) == (1, 8, 2, 16)
    # the same card's figures: each process holds the whole model
    assert (two.budget_gib, two.keep_blocks, two.micro_batch) == (one.budget_gib, one.keep_blocks, one.micro_batch)
    rows = {r[0]: r for r in two.decisions()}
    assert "processes" not in {r[0] for r in one.decisions()}
    assert rows["processes"][1] == "2 GPUs" and "per GPU" in rows["processes"][2] and "= 16 rows" in rows["processes"][2]
    assert not two.cuda_graphs and "DDP" in two.cuda_graphs_why and "x 2 GPUs" in plan_summary(two.to_dict())
    # after an out-of-memory retry: still two processes, the same effective batch
    nxt = two.after_oom().after_oom()
    assert (nxt.micro_batch, nxt.grad_accum, nxt.world_size, nxt.effective_batch) == (1, 8, 2, 16)


def test_nproc_beyond_the_cards_is_one_message_and_the_cpu_takes_any(monkeypatch):
    from core import gpu
    from core.config import RunConfig
    from core.distributed import check_nproc
    from core.errors import UserError

    cfg = RunConfig.from_dict({"model": {"name_or_path": "m"}, "data": {"path": "x.jsonl"}, "gpu": {"nproc": 3}})
    check_nproc(cfg.with_overrides(["gpu.profile=cpu"]))  # gloo on the CPU: any number
    card = gpu.GpuInfo(index=0, name="NVIDIA GeForce RTX 3090", total_gib=23.7, used_gib=0.5, free_gib=23.2,
                       compute_capability=(8, 6), bf16=True, driver="")
    monkeypatch.setattr(gpu, "detect_gpus", lambda: [card, card])
    with pytest.raises(UserError, match=r"gpu.nproc = 3 .* needs cards 0..2, but this machine shows 2") as err:
        check_nproc(cfg)
    assert "--nproc 2" in str(err.value)
    check_nproc(cfg.with_overrides(["gpu.nproc=2"]))


@pytest.mark.parametrize("n", ["0", "-1"])
def test_nproc_zero_or_less_is_one_message_and_no_run(tmp_path, n):
    """`--nproc 0` was taken as "not given" and trained one process; now it is the config's own
    check (gpu.nproc >= 1): one message, exit 2, no run directory."""
    done = snugtune("train", "demo", "--nproc", n, "--set", "gpu.profile=cpu", runs_dir=tmp_path / "runs")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "--nproc: gpu.nproc" in done.stderr and "greater than or equal to 1" in done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
