"""Several GPUs, one run: N engine processes under torchrun, gradients averaged by the Trainer's DDP.

`gpu.nproc = N` (`snugtune train PRESET --nproc N`) makes runs.spawn start
`python -m core.distributed RUN_DIR`, a small torch-free supervisor, instead of the engine. It runs
`python -m torch.distributed.run --standalone --nproc-per-node N -m core.train RUN_DIR` (torchrun:
its own rendezvous on a port the OS picks, no launcher of ours) and waits. Each rank is the normal
engine (core.train.Engine): it loads the whole 4-bit model on its own card (device_map
{"": device_index + LOCAL_RANK}: DDP, which suits the 0.5-8B models snugtune targets), and the HF
Trainer wraps it in DistributedDataParallel through accelerate. Nothing here averages gradients.

What one run directory sees, whatever N is:
* events.jsonl, plan.json, checkpoints and the adapter are written by rank 0 only (the other ranks'
  only file is their RNG state in each checkpoint, rng_state_R.pth, written by the Trainer);
* the pid file holds the supervisor's pid: viewers' liveness covers the whole group, and
  `snugtune stop` signals it; the supervisor answers with the stop file, which every rank reads;
* a stop is agreed: at each step end the ranks all-reduce "someone was asked to stop" (a one-byte
  gloo all-reduce beside the NCCL group), so all of them checkpoint the same step and none waits
  in a gradient all-reduce for a rank that left;
* a failure is said once: ranks do not emit run_failed; each writes failures/rank-R.json and the
  supervisor, when torchrun has ended, emits one run_failed for the first cause (an out-of-memory
  on rank 1 rather than the connection error it then caused on rank 0);
* out of memory: an OOM on one rank leaves the others waiting in a collective, so it cannot be
  recovered in place. The supervisor decides instead: it starts all N ranks again with
  SNUGTUNE_OOM_ATTEMPT = k + 1, each takes core.plan's k + 1-th retry plan (the same on every rank:
  it is a pure function of the config), rank 0 emits oom_recovered, and the run resumes from the
  last checkpoint with a smaller micro-batch and the same effective batch.

The data order is the one of a single process with the same effective batch: the sampler (the
Trainer's seeded random one, or core.data.LengthBucketSampler built at the global micro-batch
micro_batch x N) orders the rows once, and accelerate's BatchSamplerShard hands global micro-batch
g's slice r to rank r, so one optimizer step reads the same rows for any N (tests/test_distributed.py).

No torch at module level: the CLI imports check_nproc, and the supervisor never needs it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from core.errors import UserError

ENV_OOM_ATTEMPT = "SNUGTUNE_OOM_ATTEMPT"  # the out-of-memory retries behind this launch of the ranks
ENV_OOM_STEP = "SNUGTUNE_OOM_STEP"  # the step the last one failed at (for oom_recovered)
FAILURES_DIR = "failures"
# Out-of-memory relaunches before the supervisor gives up (each halves the micro-batch, so a
# micro-batch of 64 reaches 1 in 6 or 7; the first retry drops spare-memory uses at the same size).
MAX_OOM_RELAUNCHES = 16
# How long the ranks wait for each other in a collective before failing (the Trainer's default,
# 30 min, also covers a slow first checkpoint of an 8B model on a network disk).
COLLECTIVE_TIMEOUT_S = 1800


def nproc_of(cfg) -> int:
    return int(getattr(cfg.gpu, "nproc", None) or 1)


def check_nproc(cfg) -> None:
    """gpu.nproc against the cards there are (NVML, torch-free); a user error names both numbers.

    On the CPU (gpu.profile = 'cpu', or no GPU with 'auto') any N runs: the ranks share the cores
    through gloo, which is how the tests run it."""
    n = nproc_of(cfg)
    if n <= 1 or cfg.gpu.profile == "cpu":
        return
    from core.gpu import detect_gpus

    gpus = detect_gpus()
    if not gpus:
        if cfg.gpu.profile == "auto":
            return  # the engine trains on the CPU (gloo)
        raise UserError(f"gpu.nproc = {n} plans for {n} GPUs, but no GPU is visible here",
                        hint="run with --nproc 1, or on the CPU with --set gpu.profile=cpu")
    first = cfg.gpu.device_index
    if first + n > len(gpus):
        raise UserError(
            f"gpu.nproc = {n} from gpu.device_index = {first} needs cards {first}..{first + n - 1}, "
            f"but this machine shows {len(gpus)} ({', '.join(g.name for g in gpus)})",
            hint=f"use --nproc {max(len(gpus) - first, 1)} or fewer (CUDA_VISIBLE_DEVICES picks which cards)")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group, from torchrun's environment (1 process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Ranks":
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                       int(os.environ.get("WORLD_SIZE", 1)))
        except ValueError:
            return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0


class Group:
    """The engine's side of a run on several processes: the process group, and a gloo side group
    for the small agreements (stop, token counts, barriers around a checkpoint) that must not wait
    on the GPU stream."""

    def __init__(self, ranks: Ranks, device_type: str):
        import datetime

        import torch
        import torch.distributed as dist

        self.ranks = ranks
        self.rank, self.world_size, self.main = ranks.rank, ranks.world_size, ranks.main
        self._dist = dist
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        if not dist.is_initialized():
            if device_type == "cuda":
                # initialised here rather than by accelerate, so that the gloo side group below exists
                # before the Trainer does; accelerate takes an initialised group as it is
                dist.init_process_group("nccl", timeout=timeout,
                                        device_id=torch.device("cuda", torch.cuda.current_device()))
            else:
                dist.init_process_group("gloo", timeout=timeout)
        self._cpu = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None

    def _reduce(self, value: int, op) -> int:
        import torch

        t = torch.tensor([int(value)], dtype=torch.int64)
        self._dist.all_reduce(t, op=op, group=self._cpu)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (every rank must call it at the same point)."""
        return bool(self._reduce(int(bool(flag)), self._dist.ReduceOp.MAX))

    def sum(self, value: int) -> int:
        return self._reduce(value, self._dist.ReduceOp.SUM)

    def barrier(self) -> None:
        self._dist.barrier(group=self._cpu)

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first, the others after it: a download, the demo model's build, a
        damaged checkpoint set aside. (transformers' save_pretrained writes nothing on ranks other
        than 0, so a demo model built by rank 1 was a directory without config.json: measured.)"""
        if not self.main:
            self.barrier()
        try:
            yield
        finally:
            if self.main:
                self.barrier()

    def close(self) -> None:
        try:
            if self._dist.is_initialized():
                self._dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to tear down
            pass


class NullWriter:
    """The event writer of ranks other than 0: the log is rank 0's alone."""

    path = None

    def emit(self, event: str, **fields: Any) -> dict:
        return {"event": event, **fields}

    def close(self) -> None:
        pass


# ---- failures: written by each rank, said once by the supervisor -----------------------------------

def record_failure(run_dir: Path, rank: int, record: dict) -> None:
    """failures/rank-R.json (atomically replaced): what ended this rank, for the supervisor."""
    d = Path(run_dir) / FAILURES_DIR
    d.mkdir(exist_ok=True)
    tmp = d / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "time": time.time(), **record}, default=str), encoding="utf-8")
    tmp.replace(d / f"rank-{rank}.json")


def read_failures(run_dir: Path) -> list[dict]:
    out = []
    for p in sorted((Path(run_dir) / FAILURES_DIR).glob("rank-*.json")):
        try:
            out.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return out


def clear_failures(run_dir: Path) -> None:
    import shutil

    shutil.rmtree(Path(run_dir) / FAILURES_DIR, ignore_errors=True)


def root_cause(failures: list[dict]) -> Optional[dict]:
    """The failure to report: the earliest of a known kind (oom, user, disk), else the earliest.

    A rank that fails makes its peers fail next (a closed connection, a collective timing out):
    theirs are consequences, later and of kind internal."""
    if not failures:
        return None
    known = [f for f in failures if f.get("kind") in ("oom", "user", "disk")]
    return min(known or failures, key=lambda f: (f.get("time") or 0, f.get("rank", 0)))


EXIT_CODES = {"user": 2, "oom": 3, "disk": 4}


# ---- the supervisor: python -m core.distributed RUN_DIR ----------------------------------------------

def torchrun_command(run_dir: Path, nproc: int) -> list[str]:
    # --standalone: a c10d rendezvous on localhost, its store bound to port 0 (the OS picks a free
    # one: no port to configure, no clash between runs); no restarts (a failure is ours to judge)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "core.train", str(run_dir)]


def _die_with_parent() -> None:
    """In torchrun's process: SIGTERM when the supervisor dies (kill -9), so no rank trains on
    unwatched with its pid file pointing at a dead process (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def supervise(run_dir: Path) -> int:
    from core.config import RunConfig
    from core.events import TERMINAL_EVENTS, EventWriter, read_log
    from core.runs import CONFIG_FILE, STOP_FILE

    run_dir = Path(run_dir).resolve()
    cfg = RunConfig.from_toml(run_dir / CONFIG_FILE)
    n = nproc_of(cfg)
    state: dict = {"signals": 0, "proc": None}

    def on_signal(signum, frame):
        state["signals"] += 1
        if state["signals"] == 1:
            # what every rank polls (agreed at each step end): all stop at the same step
            try:
                (run_dir / STOP_FILE).write_text(f"{time.time()}\n")
            except OSError:
                pass
        elif state["proc"] is not None and state["proc"].poll() is None:
            state["proc"].send_signal(signal.SIGTERM)  # a second one: torchrun tears the ranks down

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    attempt, oom_step = 0, None
    while True:
        clear_failures(run_dir)
        start = (run_dir / "events.jsonl").stat().st_size if (run_dir / "events.jsonl").exists() else 0
        env = dict(os.environ)
        env[ENV_OOM_ATTEMPT] = str(attempt)
        env.update(_visible_devices(cfg, n, env.get("CUDA_VISIBLE_DEVICES")))
        if oom_step is not None:
            env[ENV_OOM_STEP] = str(oom_step)
        print(f"snugtune supervisor: starting {n} engine processes (torchrun), attempt {attempt + 1}", flush=True)
        proc = subprocess.Popen(torchrun_command(run_dir, n), cwd=str(run_dir), env=env, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        state["proc"] = proc
        rc = _wait(proc)
        state["proc"] = None
        log = read_log(run_dir)
        ended = [e for e, end in zip(log.events, log.ends) if end > start and e.get("event") in TERMINAL_EVENTS]
        if ended:
            ev = ended[-1]
            return 0 if ev["event"] in ("run_finished", "run_stopped") else EXIT_CODES.get(ev.get("kind"), 1)
        failures = read_failures(run_dir)
        cause = root_cause(failures)
        stopping = state["signals"] > 0 or (run_dir / STOP_FILE).exists()
        if (cause is not None and cause.get("kind") == "oom" and cfg.train.oom_recovery and not stopping
                and attempt < MAX_OOM_RELAUNCHES):
            attempt += 1
            oom_step = cause.get("step")
            print(f"snugtune supervisor: rank {cause.get('rank')} ran out of memory at step {oom_step}; "
                  f"starting all {n} again with the next retry plan", flush=True)
            continue
        writer = EventWriter(run_dir / "events.jsonl")
        try:
            if cause is not None:
                fields = {k: v for k, v in cause.items() if k not in ("time",)}
                fields.setdefault("kind", "internal")
                writer.emit("run_failed", **fields)
                return EXIT_CODES.get(cause.get("kind"), 1)
            writer.emit("run_failed", kind="internal", traceback=None,
                        error=f"the {n} engine processes ended without a final event (torchrun exit code {rc}); "
                              "see engine.log in the run directory")
            return rc or 1
        finally:
            writer.close()
            (run_dir / STOP_FILE).unlink(missing_ok=True)


def _visible_devices(cfg, n: int, visible: Optional[str]) -> dict:
    """CUDA_VISIBLE_DEVICES for the ranks: the run's cards, device_index .. device_index + n - 1 (of the
    ones already visible), so that rank r's card is cuda:r, the device accelerate gives LOCAL_RANK r."""
    first = cfg.gpu.device_index
    if cfg.gpu.profile == "cpu" or not first:
        return {}
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(first + n)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids[first:first + n])}


def _wait(proc: subprocess.Popen) -> int:
    while True:
        try:
            return proc.wait()
        except InterruptedError:  # a signal handler ran; keep waiting
            continue


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m core.distributed RUN_DIR", file=sys.stderr)
        return 2
    return supervise(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
