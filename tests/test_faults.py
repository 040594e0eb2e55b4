"""Fault injection: what a hostile user, a crash and a full disk do to a run, and that each ends
in a resumable run or one clear message, with the losses of a run nothing happened to.

One uninterrupted reference run (the tiny 4-bit Llama from conftest, 8 steps, a checkpoint every
2) is shared by the module; every faulted run has the same configuration, and its resumed curve
is compared step by step with the reference's. Signals go to a real engine process (`snugtune`
or runs.spawn); faults that need exact timing (a disk that fills at a given step) run the engine
in this process with a TrainerCallback, the plug-in point the engine offers, doing the damage.
Full and read-only disks are small tmpfs mounts (root only, as on CI; skipped with the reason
elsewhere).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import make_tiny_config
from core import runs
from core.events import read_events, read_log

pytestmark = pytest.mark.slow

STEPS = 8
SNUGTUNE = Path(sys.executable).parent / "snugtune"
CMD = [str(SNUGTUNE)] if SNUGTUNE.exists() else [sys.executable, "-m", "tui.cli"]
LONG = 600  # a generous ceiling for one engine run on a loaded 2-core machine (not a timing assertion)


def _cfg(model_dir, data, runs_dir, *extra):
    return make_tiny_config(model_dir, data, runs_dir, f"train.max_steps={STEPS}", "train.save_steps=2",
                            "train.save_total_limit=2", "data.eval_fraction=0", *extra)


def final_losses(events) -> dict[int, float]:
    """The loss of each step as the run ended up with it (a step redone after a crash: its last)."""
    return {e["step"]: e["loss"] for e in events if e["event"] == "step_logged"}


def assert_same_curve(events, reference):
    got = final_losses(events)
    assert sorted(got) == list(range(1, STEPS + 1)), got
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (step, got, reference)
    assert events[-1]["event"] == "run_finished" and events[-1]["steps"] == STEPS


def wait_for(check, what: str, limit: float = LONG):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {limit:.0f}s")


def snugtune(*args, timeout=LONG):
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("fault-runs")


@pytest.fixture(scope="module")
def make_cfg(tiny_model_dir, tiny_instruction_jsonl, fault_runs):
    def make(*extra, runs_dir=None):
        return _cfg(tiny_model_dir, tiny_instruction_jsonl, runs_dir or fault_runs, *extra)

    return make


@pytest.fixture(scope="module")
def reference(make_cfg):
    from core.train import Engine

    run_dir = runs.create_run_dir(make_cfg())
    assert Engine(run_dir).run() == 0
    return final_losses(read_events(run_dir))


def _callback(on_step_begin=None, on_train_end=None):
    from transformers import TrainerCallback

    class Fault(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if on_step_begin:
                on_step_begin(state.global_step + 1)

        def on_train_end(self, args, state, control, **kwargs):
            if on_train_end:
                on_train_end()

    return Fault()


@pytest.fixture(scope="module")
def stopped_run(make_cfg):
    """A run stopped (by its stop file) after step 6: checkpoints 4 and 6 (the limit keeps two)."""
    from core.train import Engine

    run_dir = runs.create_run_dir(make_cfg())

    def stop_before(step):
        if step == 6:
            (run_dir / "stop").touch()

    assert Engine(run_dir, callbacks=[_callback(on_step_begin=stop_before)]).run() == 0
    assert read_events(run_dir)[-1]["event"] == "run_stopped"
    assert [p.name for _, p in runs.checkpoints(run_dir)] == ["checkpoint-4", "checkpoint-6"]
    return run_dir


def copy_run(run_dir: Path, where: Path) -> Path:
    target = where / f"{run_dir.name}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(run_dir, target)
    return target


# ---- the engine killed and stopped -----------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_a_random_step_resumes_to_the_same_curve(seed, make_cfg, reference):
    from core.train import Engine

    kill_after = random.Random(seed).randint(1, STEPS - 1)
    run_dir = runs.create_run_dir(make_cfg())
    proc = runs.spawn(run_dir)
    try:
        wait_for(lambda: any(e["event"] == "step_logged" and e["step"] >= kill_after for e in read_events(run_dir)),
                 f"step {kill_after}")
        proc.send_signal(signal.SIGKILL)  # no handler runs: whatever was being written stays half-written
    finally:
        proc.wait(timeout=LONG)
    assert runs.run_status(run_dir)["status"] == "died"
    assert Engine(run_dir).run() == 0
    events = read_events(run_dir)
    assert_same_curve(events, reference)
    assert not (run_dir / "checkpoints" / runs.STAGING_DIR).exists()
    assert all(runs.verify_checkpoint(p) is None for _, p in runs.checkpoints(run_dir))


def test_stop_then_resume_in_the_foreground_finishes_at_exactly_max_steps(make_cfg, reference, tmp_path):
    toml = make_cfg().write_toml(tmp_path / "faults.toml", overwrite=True)
    started = snugtune("train", str(toml), "--detach", "--json")
    assert started.returncode == 0, started.stderr
    run_dir = Path(json.loads(started.stdout)["run_dir"])
    assert run_dir.name.startswith("faults-")  # named after the preset file
    wait_for(lambda: any(e["event"] == "step_logged" for e in read_events(run_dir)), "a first step")
    # Frozen until the stop request is out, so that it cannot finish its 8 steps first.
    engine = int((run_dir / "pid").read_text())
    os.kill(engine, signal.SIGSTOP)
    try:
        stop = subprocess.Popen([*CMD, "stop", str(run_dir), "--wait"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # the stop file and SIGTERM
        assert "to save a checkpoint and stop" in stop.stdout.readline()
    finally:
        os.kill(engine, signal.SIGCONT)
    out, err = stop.communicate(timeout=LONG)  # returns once the engine has stopped
    assert stop.returncode == 0, out + err
    stopped = read_events(run_dir)[-1]
    assert stopped["event"] == "run_stopped" and 1 <= stopped["step"] < STEPS, stopped
    assert f"stopped at step {stopped['step']}" in out
    resumed = snugtune("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"finished: {STEPS} steps" in resumed.stdout
    assert "stopped at step" not in resumed.stdout  # the earlier attempt's end is not this one's
    assert f"step {stopped['step']}/" not in resumed.stdout  # nor are its steps printed again
    events = read_events(run_dir)
    assert [e["step"] for e in events if e["event"] == "step_logged"][-1] == STEPS
    assert_same_curve(events, reference)


# ---- damaged checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth"])
def test_a_truncated_newest_checkpoint_is_skipped_by_name_and_the_previous_one_resumed(
        damaged, stopped_run, reference, tmp_path):
    from core.train import Engine

    run_dir = copy_run(stopped_run, tmp_path)
    f = run_dir / "checkpoints" / "checkpoint-6" / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert runs.verify_checkpoint(f.parent).startswith(damaged)
    assert Engine(run_dir).run() == 0
    events = read_events(run_dir)
    skipped = [e for e in events if e["event"] == "checkpoint_skipped"]
    assert len(skipped) == 1 and skipped[0]["path"].endswith("checkpoint-6") and damaged in skipped[0]["reason"]
    assert (run_dir / "checkpoints" / "damaged-checkpoint-6" / damaged).is_file()
    starts = [e for e in events if e["event"] == "run_started"]
    assert starts[-1]["resumed_from"].endswith("checkpoint-4")
    assert_same_curve(events, reference)


# ---- damaged event logs ------------------------------------------------------------------------------------


def test_garbage_and_a_torn_line_in_the_log_are_skipped_and_the_run_resumes(stopped_run, reference, tmp_path):
    from core.train import Engine

    run_dir = copy_run(stopped_run, tmp_path)
    with open(run_dir / "events.jsonl", "ab") as fh:
        fh.write(b"\x89PNG\r\n\x1a\x00 not an event at all\n")
        fh.write(b'{"v": 1, "event": "step_logged", "step": 7, "lo')  # torn: the engine died mid-write
    before = len(read_events(run_dir))
    assert Engine(run_dir).run() == 0
    log = read_log(run_dir)
    assert len(log.events) > before and log.events[-1]["event"] == "run_finished"
    # the torn line ended where it stopped; the next attempt's first event is whole, on its own line
    assert [why.split(" (")[0] for _, why in log.skipped] == ["not UTF-8", "not JSON", "not JSON"]
    assert_same_curve(log.events, reference)
    listed = runs.run_status(run_dir)
    assert listed["status"] == "finished" and listed["log_skipped"] == 3


# ---- a full disk, a read-only one -------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A function mounting a tmpfs of a given size; all unmounted at the end."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs-{len(mounted)}"
        where.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
        if shutil.which("mount") is None or shutil.which("umount") is None:
            pytest.skip("no mount command here")
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(where: Path, leave: int) -> Path:
    """Fill a filesystem until only about `leave` bytes are free (one file, removed to free it again)."""
    filler = where / "filler"
    with open(filler, "ab") as fh:
        while True:
            room = runs.free_bytes(where) - leave
            if room <= 0:
                break
            try:
                fh.write(b"\0" * min(room, 1 << 20))
                fh.flush()
            except OSError:
                break
    return filler


def test_a_disk_too_small_is_refused_before_the_run_with_the_figures(make_cfg, tmpfs, tmp_path):
    small = tmpfs("3m")
    toml = make_cfg(runs_dir=small / "runs").write_toml(tmp_path / "small.toml", overwrite=True)
    out = snugtune("train", str(toml), "--detach")
    assert out.returncode == 4, out.stdout + out.stderr
    assert f"not enough disk space in {small / 'runs'}" in out.stderr and "MB free" in out.stderr
    assert "save_total_limit" in out.stderr and "Traceback" not in out.stderr
    assert not (small / "runs").exists() or not list((small / "runs").iterdir())


def test_a_disk_that_fills_mid_run_fails_as_disk_and_resumes_to_the_same_curve(make_cfg, reference, tmpfs):
    from core.train import Engine

    disk = tmpfs("16m")
    run_dir = runs.create_run_dir(make_cfg(runs_dir=disk / "runs"))
    filler = {}

    def fill_before(step):
        if step == 3 and not filler:  # after checkpoint-2, before checkpoint-4
            filler["path"] = fill(disk, leave=48_000)

    assert Engine(run_dir, callbacks=[_callback(on_step_begin=fill_before)]).run() == 4
    failed = read_events(run_dir)[-1]
    assert failed["event"] == "run_failed" and failed["kind"] == "disk"
    assert failed["path"] == str(run_dir) and failed["free_mb"] < 1 and failed["needed_mb"] > failed["free_mb"]
    assert "MB free" in failed["error"] and f"snugtune resume {run_dir.name}" in failed["error"]
    assert failed["checkpoint"] == "checkpoint-2"
    # the half-written checkpoint-4 is nowhere: what is there is complete
    assert [p.name for _, p in runs.checkpoints(run_dir)] == ["checkpoint-2"]
    assert not (run_dir / "checkpoints" / runs.STAGING_DIR).exists()
    assert runs.run_status(run_dir)["status"] == "failed"

    # a resume on the still-full disk: refused with the figures, and the log stays whole lines
    assert Engine(run_dir).run() == 4
    log = read_log(run_dir)
    assert log.events[-1]["event"] == "run_failed" and log.events[-1]["kind"] == "disk"

    filler["path"].unlink()
    assert Engine(run_dir).run() == 0
    log = read_log(run_dir)
    assert_same_curve(log.events, reference)
    assert all(why.startswith("not JSON") for _, why in log.skipped)  # at most a torn line, never two glued


def test_an_adapter_save_on_a_full_disk_resumes_without_an_extra_step(make_cfg, reference, tmpfs):
    from core.train import Engine

    disk = tmpfs("16m")
    run_dir = runs.create_run_dir(make_cfg(runs_dir=disk / "runs"))
    filler = {}

    def fill_at_the_end():
        filler["path"] = fill(disk, leave=48_000)  # after checkpoint-8: the adapter's save fails

    assert Engine(run_dir, callbacks=[_callback(on_train_end=fill_at_the_end)]).run() == 4
    assert read_events(run_dir)[-1]["kind"] == "disk" and not (run_dir / "adapter").exists()
    assert not (run_dir / "adapter.tmp").exists()
    filler["path"].unlink()
    assert Engine(run_dir).run() == 0
    events = read_events(run_dir)
    assert max(e["step"] for e in events if e["event"] == "step_logged") == STEPS  # not "finished 9/8"
    assert_same_curve(events, reference)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_on_a_read_only_run_directory_is_one_message(stopped_run, tmpfs):
    disk = tmpfs("16m")
    run_dir = copy_run(stopped_run, disk)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    out = snugtune("resume", str(run_dir))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"cannot write to the run directory {run_dir}" in out.stderr and "Traceback" not in out.stderr
    assert runs.run_status(run_dir)["status"] == "stopped"


def test_a_file_size_limit_is_said_as_the_limit_not_a_full_disk(make_cfg, stopped_run, reference):
    """`ulimit -f` (or FAT32's 4 GiB) makes a checkpoint write fail as a full disk would, but the disk
    has room: the message says the limit and how to raise it; the run resumes once it is raised."""
    import resource

    from core.train import Engine

    biggest = max(p.stat().st_size for p in (stopped_run / "checkpoints" / "checkpoint-4").rglob("*") if p.is_file())
    limit = biggest // 2  # below a checkpoint's largest file, far above what the log holds by then
    assert limit > 64_000, biggest
    run_dir = runs.create_run_dir(make_cfg())

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.Popen(runs.engine_command(run_dir), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=cap,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.wait(timeout=LONG) == 4
    failed = read_events(run_dir)[-1]
    assert failed["event"] == "run_failed" and failed["kind"] == "disk", failed
    assert "larger than this system lets a file be" in failed["error"] and "`ulimit -f`" in failed["error"]
    assert "filled up" not in failed["error"] and failed["file_size_limit_mb"] == round(limit / runs.MB, 1)
    assert "ulimit -f unlimited" in failed["error"] and f"snugtune resume {run_dir.name}" in failed["error"]
    assert not (run_dir / "checkpoints" / runs.STAGING_DIR).exists()

    assert Engine(run_dir).run() == 0  # this process has no limit: the run resumes to the same curve
    assert_same_curve(read_events(run_dir), reference)


def test_saved_adapters_and_checkpoints_take_the_umask_modes(stopped_run, reference, make_cfg):
    """safetensors writes 0600; the run's adapter and checkpoints are shared like its other files."""
    run_dir = copy_run(stopped_run, stopped_run.parent)
    from core.train import Engine

    assert Engine(run_dir).run() == 0
    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    files = [*(run_dir / "adapter").rglob("*"), *(run_dir / "checkpoints").rglob("*")]
    weights = [p for p in files if p.name.endswith(".safetensors")]
    assert weights and {oct(p.stat().st_mode & 0o777) for p in files if p.is_file()} == {oct(want)}
