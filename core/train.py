"""The training run: `python -m core.train RUN_DIR`.

Four stages, as torchtune's recipes name them: setup (config, device, model, data), train
(transformers' Trainer, accelerate underneath), save (the final adapter), cleanup. Everything a
viewer needs goes to RUN_DIR/events.jsonl through one EventWriter; a TrainerCallback turns the
Trainer's logs into events. Extra callbacks (tests, benchmarks) plug into the same Trainer.

Stopping: SIGTERM, SIGINT or a `stop` file in the run directory make the engine save a
checkpoint at the end of the current step, emit run_stopped and exit 0; launching the engine
again on the same directory resumes from the last checkpoint (step count, optimizer, scheduler,
data order). Failures emit run_failed (kind oom/user/disk/internal) and exit non-zero.
Checkpoints are staged and renamed when complete; a resume starts from the newest one that
verifies (core.runs.verify_checkpoint) and never trains past the planned steps.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

from core.config import RunConfig
from core.errors import UserError
from core.events import EventWriter
from core import distributed
from core import runs as rundirs
from core.runs import CONFIG_FILE, PID_FILE, STOP_FILE, DiskSpaceError, last_checkpoint  # noqa: F401

EXIT_USER = 2
EXIT_OOM = 3
EXIT_DISK = 4
EXIT_INTERNAL = 1
# Non-finite steps in a row after which a run is declared diverged: one can be a fluke the
# optimizer skips (fp16 loss scaling does that), three in a row are not.
DIVERGED_AFTER = 3


# The decisions (optimizer, dtype, savers, CUDA graphs, the retry after an OOM) are core.plan's;
# these two are re-exported for the step accounting here.
from core.plan import few_steps_note, oom_fallback, planned_steps  # noqa: E402,F401

from core.plan import PLAN_FILE  # noqa: E402


def write_plan(run_dir: Path, plan) -> Path:
    """plan.json in the run directory: the decisions the engine executes (atomically replaced)."""
    import json

    path = Path(run_dir) / PLAN_FILE
    tmp = path.with_name(f".{PLAN_FILE}.tmp")
    tmp.write_text(json.dumps(plan.to_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def source_spec(source: str, revision: Optional[str] = None):
    """The model's shape (core.catalog.ModelSpec) from its config.json: a local directory, or the
    Hub id whose config.json resolve_model_source already put in the cache."""
    import json

    from core import catalog

    path = Path(source)
    if path.is_dir():
        return catalog.spec_from_dir(path)
    try:
        from huggingface_hub import hf_hub_download

        cfg_path = hf_hub_download(source, "config.json", revision=revision, local_files_only=True)
        return catalog.spec_from_config(json.loads(Path(cfg_path).read_text()), source)
    except Exception:  # noqa: BLE001 - not cached: the catalog's numbers, else the Hub's
        spec = catalog.catalog_lookup(source)
        return spec if spec is not None else catalog.resolve_model(source, revision=revision)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for dist in ("snugtune", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    out["cuda"] = torch.version.cuda
    return out


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom_type)


REAL_TOKENS_KEY = "snugtune_real_tokens"


class _TokenCounter:
    """Wraps the data's collate: tags each batch with its real (non-padding) token count.

    The count rides in the batch and is taken out just before the forward pass (see
    _counting_trainer), so it is credited to the step that trains on it even though the
    dataloader fetches batches ahead of time.
    """

    def __init__(self, pad_token_id: int, pad_packed_to: int = 0):
        from core.data import collate

        self._collate = collate
        self.pad_token_id = pad_token_id
        self.pad_packed_to = pad_packed_to  # CUDA-graph steps: every packed micro-batch one shape
        self.tokens = 0  # real tokens trained on so far in this engine process

    def __call__(self, rows: list[dict]) -> dict:
        batch = self._collate(rows, self.pad_token_id, self.pad_packed_to)
        # Rows arrive unpadded: their lengths are exactly the tokens the model really reads.
        batch[REAL_TOKENS_KEY] = torch.tensor(sum(len(r["input_ids"]) for r in rows))
        return batch


def _counting_trainer(counter: _TokenCounter):
    from transformers import Trainer

    class CountingTrainer(Trainer):
        snug_graphs = None  # core.graphs.CudaGraphStep, set by the engine when train.cuda_graphs allows
        snug_length_buckets = False  # unpacked rows: core.data.LengthBucketSampler, set by the engine
        snug_group = None  # core.distributed.Group when several processes train this run

        def _get_train_sampler(self, *args, **kwargs):
            # Unpacked rows are padded per micro-batch: like-length rows together keep the padding
            # small, but in random micro-batch order. transformers' group_by_length hands them out
            # longest to shortest, 50 micro-batches at a time: on the H200 real-weights bench the
            # unpacked loss jumped back up at the same steps in bf16, fp16 and graphed runs (21, 27,
            # 35, 51, ..., a new run of lengths each) and scored 75-92/128 against the plain recipe's
            # 128/128 (core.data.length_bucketed_order). Packed rows (nearly full) keep the random sampler.
            ds = args[0] if args else kwargs.get("train_dataset", self.train_dataset)
            if self.snug_length_buckets and ds is not None and hasattr(ds, "__len__"):
                from core.data import LengthBucketSampler

                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                # at the global micro-batch (x processes): accelerate gives rank r slice r of each one,
                # so N processes read the rows one process with N times the micro-batch reads (core.distributed)
                return LengthBucketSampler([len(r["input_ids"]) for r in ds],
                                           self.args.train_batch_size * self.args.world_size, seed)
            return super()._get_train_sampler(*args, **kwargs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            gs = self.snug_graphs
            if gs is not None and gs.disabled is None:
                if gs.model is None:
                    gs.bind(model)  # the accelerate-wrapped model: its forward carries the autocast
                model.train()
                prepared = self._prepare_inputs(dict(inputs))
                n = prepared.pop(REAL_TOKENS_KEY, None)
                accum = getattr(self, "current_gradient_accumulation_steps", 1) or 1
                # the graph's gradient buffers are lent as .grad only when each micro-batch is a whole
                # window (nothing accumulates into them before the optimizer reads them); otherwise copied
                loss = gs.step(prepared, num_items_in_batch, accumulation_steps=accum, last_in_window=accum == 1)
                if loss is not None:
                    if n is not None:
                        counter.tokens += int(n)
                    return loss
            if gs is None or not gs.graphs:
                return super().training_step(model, inputs, num_items_in_batch)
            # An eager step (another shape: the epoch's last, short micro-batch) beside a graph's
            # memory pool may not fit where the graph alone did: free the graph and retry once,
            # when no gradient of this window was lost with the failed step.
            fresh = all(p.grad is None for p in gs.params)
            counted = counter.tokens
            try:
                return super().training_step(model, dict(inputs), num_items_in_batch)
            except torch.OutOfMemoryError:
                if not fresh:
                    gs.release("out of memory in an eager step beside the graph")
                    raise
            gs.release("out of memory in an eager step beside the graph: graphs freed, steps run eagerly")
            counter.tokens = counted  # the failed attempt's tokens are counted by the retry
            for p in gs.params:
                p.grad = None
            return super().training_step(model, inputs, num_items_in_batch)

        def _save_checkpoint(self, model, trial):
            # Written under checkpoints/.partial, renamed into checkpoints/ once every file is
            # there: a checkpoint-N that exists is complete, whatever killed or filled the disk
            # mid-save. The Trainer names its folder inside _get_output_dir(), so that is what is
            # pointed at the staging directory for the duration of the save.
            final_root = Path(self.args.output_dir)
            staging = final_root / rundirs.STAGING_DIR
            name = f"checkpoint-{self.state.global_step}"
            group = self.snug_group  # several processes: rank 0 stages and renames, each writes its RNG state
            if group is None or group.main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            if group is not None:
                group.barrier()
            self._get_output_dir = lambda trial=None: str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir
            if group is not None:
                group.barrier()  # every rank's files are written
                if not group.main:
                    group.barrier()  # rank 0 has renamed the checkpoint into place
                    return
            _fsync_tree(staging / name)
            rundirs.share_modes(staging / name)
            target = final_root / name
            if target.exists():  # a step redone after an OOM retry or past a damaged checkpoint
                shutil.rmtree(target)
            (staging / name).rename(target)
            shutil.rmtree(staging, ignore_errors=True)
            _rotate_checkpoints(final_root.parent, self.args.save_total_limit or None)
            if group is not None:
                group.barrier()

        def compute_loss(self, model, inputs, *args, **kwargs):
            n = inputs.pop(REAL_TOKENS_KEY, None)
            if n is not None and model.training:
                counter.tokens += int(n)
            return super().compute_loss(model, inputs, *args, **kwargs)

    return CountingTrainer


def _fsync_tree(path: Path) -> None:
    """Flush a staged checkpoint's files to the disk before it is renamed into place, so that a
    checkpoint-N that exists after a power cut holds data, not empty files."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)


def _rotate_checkpoints(run_dir: Path, keep: Optional[int]) -> None:
    """Keep the newest `keep` complete checkpoints (the Trainer's own rotation sees only the
    staging directory, which holds one)."""
    if not keep:
        return
    for _step, path in rundirs.checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# EFBIG: a file-size limit; said as such by Engine._disk_failed, but the same recovery
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
# What torch.save's zip writer and safetensors say when a write fails (their errors carry no
# errno): "[enforce fail at inline_container.cc:672] . unexpected pos 960 vs 854", "file write
# failed", "PytorchStreamWriter failed writing file", "I/O error: No space left on device (os error 28)".
_DISK_FULL_TEXT = ("unexpected pos", "file write failed", "failed writing file", "no space left", "disk quota",
                   "os error 28", "file too large", "os error 27")


def _errno_in(exc: Optional[BaseException], code: int) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == code:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        # any type: safetensors raises its own SafetensorError ("I/O error: No space left on device")
        if isinstance(exc, Exception) and any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Engine:
    """One run of the engine on one run directory."""

    def __init__(self, run_dir: str | Path, callbacks: Optional[list] = None, install_signal_handlers: bool = True):
        self.run_dir = Path(run_dir).resolve()
        self.extra_callbacks = list(callbacks or [])
        self.install_signal_handlers = install_signal_handlers
        self.events: Optional[EventWriter] = None
        self.cfg: Optional[RunConfig] = None
        self.device: dict = {}
        self.model = None
        self.tokenizer = None
        self.model_info: dict = {}
        self.train_rows: list = []
        self.eval_rows: list = []
        self.data_info: dict = {}
        self.micro_batch = 1
        self.grad_accum = 1
        self.plan = None  # core.plan.Plan: what this process executes (replaced after an OOM retry)
        self.spec = None
        self._signal: Optional[int] = None
        self._setup_interruptible = False  # a signal may end setup at once (_on_signal)
        self._old_handlers: dict = {}
        self.last_loss: Optional[float] = None
        self.last_eval_step: Optional[int] = None
        self.trainer = None
        self.counter: Optional[_TokenCounter] = None
        self.stopped = False
        self.resume_from: Optional[Path] = None  # the verified checkpoint this attempt starts from
        self.checkpoint_bytes: int = 0  # what one checkpoint of this run writes (estimated)
        self.ranks = distributed.Ranks.from_env()  # torchrun's rank (core.distributed); rank 0 of 1 alone
        self.group: Optional[distributed.Group] = None

    # ---- stop requests --------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:
            # A second signal: the user means it. Restore the default and let it kill us.
            signal.signal(signum, self._old_handlers.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self._signal = signum
        if self._setup_interruptible:
            # Setup writes nothing in the run directory while interruptible (resolving, reading the
            # data, loading the weights): stop now, not after minutes of loading a 7B model.
            raise _SetupStopped()

    def _stop_point(self) -> None:
        """Between setup's stages: a stop asked for (the stop file, a signal) ends setup here."""
        if self.stop_requested():
            raise _SetupStopped()

    def stop_requested(self) -> bool:
        asked = self._signal is not None or (self.run_dir / STOP_FILE).exists()
        # several processes: every rank calls this at the same points and they agree, so all stop together
        return self.group.any(asked) if self.group is not None else asked

    def _install_handlers(self) -> None:
        if not self.install_signal_handlers:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    # ---- the run --------------------------------------------------------------------------

    def run(self) -> int:
        if not (self.run_dir / CONFIG_FILE).is_file():
            print(f"snugtune engine: {self.run_dir} is not a run directory (no {CONFIG_FILE})", file=sys.stderr)
            return EXIT_USER
        if (self.run_dir / "adapter").exists():
            # Refused before anything is written: a finished run's log must stay a finished run's.
            print(f"snugtune engine: this run already finished ({self.run_dir / 'adapter'} exists); "
                  "start a new run with `snugtune train`", file=sys.stderr)
            return EXIT_USER
        # several processes: the log (and the pid file: the supervisor's) is rank 0's alone
        self.events = EventWriter(self.run_dir / "events.jsonl") if self.ranks.main else distributed.NullWriter()
        if self.install_signal_handlers and self.ranks.world_size == 1:
            # Our own pid, for viewers' liveness checks, also when started without runs.spawn
            # (`python -m core.train RUN_DIR` by hand or from a benchmark).
            (self.run_dir / PID_FILE).write_text(f"{os.getpid()}\n")
        self._install_handlers()
        started = time.time()
        try:
            try:
                self.setup()
            except _SetupStopped:
                self._setup_interruptible = False
                return self._stopped()
            if self.stop_requested():
                return self._stopped()
            self.train()
            if self.stopped:
                return self._stopped()
            adapter = self.save()
            self.events.emit(
                "run_finished",
                adapter_path=str(adapter),
                steps=self.trainer.state.global_step,
                final_loss=self.last_loss,
                runtime_s=round(time.time() - started, 2),
            )
            return 0
        except DiskSpaceError as exc:
            self._clean_partial_writes()
            self._failed(str(exc), "disk", path=exc.path, free_mb=exc.free_mb, needed_mb=exc.needed_mb,
                         checkpoint=self._resumable_checkpoint_name())
            return EXIT_DISK
        except UserError as exc:
            self._failed(str(exc), "user")
            return EXIT_USER
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the event log
            if _disk_full(exc):
                return self._disk_failed(exc)
            if _is_oom(exc):
                recovery = "" if self.cfg is None or self.cfg.train.oom_recovery else \
                    ", or turn on train.oom_recovery (smaller micro-batches, same effective batch)"
                self._failed(
                    f"CUDA out of memory at micro-batch {self.micro_batch}: {str(exc).splitlines()[0]}",
                    "oom",
                    hint=f"lower data.max_seq_len or lora.r, or choose a smaller model{recovery}",
                )
                return EXIT_OOM
            if isinstance(exc, KeyboardInterrupt):
                self._failed("interrupted before a checkpoint could be saved", "internal")
                return 130
            self._failed(f"{type(exc).__name__}: {exc}", "internal")
            return EXIT_INTERNAL
        finally:
            self.cleanup()

    def _failed(self, error: str, kind: str, hint: Optional[str] = None, **fields: Any) -> None:
        tb = traceback.format_exc()
        try:
            print(tb, file=sys.stderr)
        except OSError:
            pass  # engine.log on a full disk
        if self.ranks.world_size > 1:
            # one rank's failure makes its peers fail next: the supervisor says the first cause, once
            step = self.trainer.state.global_step if self.trainer is not None else None
            try:
                distributed.record_failure(self.run_dir, self.ranks.rank, dict(
                    error=error + (f"\n  hint: {hint}" if hint else ""), kind=kind, traceback=tb, step=step,
                    **fields))
            except OSError:
                pass
            return
        try:
            self.events.emit("run_failed", error=error + (f"\n  hint: {hint}" if hint else ""), kind=kind,
                             traceback=tb, **fields)
        except OSError:
            # The log's disk is full even after the partial checkpoint went: viewers see the engine
            # end without a word and say so (`died`, pointing at engine.log).
            pass

    # ---- a full disk ------------------------------------------------------------------------

    def _clean_partial_writes(self) -> None:
        """Remove what a failed save left: the staged checkpoint and a half-written adapter."""
        shutil.rmtree(self.run_dir / "checkpoints" / rundirs.STAGING_DIR, ignore_errors=True)
        shutil.rmtree(self.run_dir / "adapter.tmp", ignore_errors=True)

    def _resumable_checkpoint_name(self) -> Optional[str]:
        good = [p for _, p in reversed(rundirs.checkpoints(self.run_dir)) if rundirs.verify_checkpoint(p) is None]
        return good[0].name if good else None

    def _disk_failed(self, exc: BaseException) -> int:
        """ENOSPC while writing: one message with the figures, the run left resumable."""
        self._clean_partial_writes()
        free = rundirs.free_bytes(self.run_dir)
        needed = self.checkpoint_bytes or rundirs.MB
        ckpt = self._resumable_checkpoint_name()
        where = f"continues from {ckpt}" if ckpt else "starts again from step 0 (no checkpoint was complete)"
        first_line = (str(exc).splitlines() or [""])[0][:200]
        limit = rundirs.file_size_limit()
        too_large = _errno_in(exc, errno.EFBIG) or "file too large" in str(exc).lower() or "os error 27" in str(exc)
        if too_large or (limit is not None and free > 2 * needed):
            # a file-size limit (`ulimit -f`, FAT32's 4 GiB) reads like a full disk to the writers
            # (torch's zip writer: "file write failed"), but the disk has room: say the limit
            lim = f" ({limit / rundirs.MB:,.1f} MB, `ulimit -f`)" if limit is not None else ""
            self._failed(
                f"the engine could not write into {self.run_dir}: a file grew larger than this system lets "
                f"a file be{lim} ({type(exc).__name__}: {first_line}); one checkpoint of this run needs about "
                f"{needed / rundirs.MB:,.1f} MB and the disk has {free / rundirs.MB:,.1f} MB free",
                "disk", hint=f"raise the limit (`ulimit -f unlimited`), or put the runs on a filesystem that takes "
                f"large files (output.runs_dir), then `snugtune resume {self.run_dir.name}`: it {where}",
                path=str(self.run_dir), free_mb=round(free / rundirs.MB, 1), needed_mb=round(needed / rundirs.MB, 1),
                checkpoint=ckpt, file_size_limit_mb=round(limit / rundirs.MB, 1) if limit is not None else None)
            return EXIT_DISK
        self._failed(
            f"the disk holding {self.run_dir} filled up while the engine was writing to it "
            f"({type(exc).__name__}: {first_line}): {free / rundirs.MB:,.1f} MB free, one checkpoint of this run "
            f"needs about {needed / rundirs.MB:,.1f} MB",
            "disk", hint=f"free some space, then `snugtune resume {self.run_dir.name}`: it {where}",
            path=str(self.run_dir), free_mb=round(free / rundirs.MB, 1), needed_mb=round(needed / rundirs.MB, 1),
            checkpoint=ckpt)
        return EXIT_DISK

    def _stopped(self) -> int:
        ckpt = last_checkpoint(self.run_dir)
        step = self.trainer.state.global_step if self.trainer is not None else 0
        self.events.emit("run_stopped", step=step, checkpoint=str(ckpt) if ckpt else None)
        return 0

    # ---- stage 1: setup -------------------------------------------------------------------

    def setup(self) -> None:
        from core.model import load_for_training, resolve_model_source, select_device

        from core import plan as plan_mod

        self.cfg = RunConfig.from_toml(self.run_dir / CONFIG_FILE)
        if distributed.nproc_of(self.cfg) != self.ranks.world_size:
            raise UserError(f"gpu.nproc = {distributed.nproc_of(self.cfg)}, but this engine is one of "
                            f"{self.ranks.world_size} process(es)",
                            hint="start it with `snugtune resume` (or `python -m core.distributed RUN_DIR`), "
                                 "which starts gpu.nproc of them")
        if self.ranks.world_size > 1:
            self.cfg = self._join_group(self.cfg)
        cfg = self.cfg
        self.device = select_device(cfg)
        if self.device["type"] == "cuda" and not cfg.gpu.vram_budget_gib:
            # without a budget the run may use what is free on the card now (a desktop may hold some)
            free, _ = torch.cuda.mem_get_info(self.device["index"])
            self.device["free_gib"] = round(free / 2**30, 3)
        target = plan_mod.target_for_device(cfg, self.device)  # a budget above the card: UserError here
        self._stop_point()
        self.events.emit("setup_progress", message="resolving the model")
        with self._interruptible(), self.group.main_first() if self.group is not None else contextlib.nullcontext():
            source = resolve_model_source(cfg.model.name_or_path, cfg.model.revision)
        self._stop_point()
        self.spec = source_spec(source, cfg.model.revision)
        self.plan = plan_mod.plan(cfg, self.spec, target)
        retried = self._relaunch_retries()
        if self.device["type"] == "cuda":
            from core import savers

            # before anything is allocated: the model loads under the cap too
            savers.apply_vram_budget(self.plan, self.device["index"])
        self.micro_batch, self.grad_accum = self.plan.micro_batch, self.plan.grad_accum
        if self.ranks.main:
            write_plan(self.run_dir, self.plan)

        from core.model import load_tokenizer

        with self._interruptible():
            self.tokenizer = load_tokenizer(source, cfg)
        self._stop_point()
        self.events.emit("setup_progress", message="preparing the data")
        from core.data import build_datasets

        with self._interruptible():
            self.train_rows, self.eval_rows, self.data_info = build_datasets(cfg.data, self.tokenizer)
        self._stop_point()
        if not self.train_rows:
            raise UserError(f"data.path = {cfg.data.path!r}: no training samples left after preparation",
                            hint="check the file's contents and data.format / data.columns")
        self.events.emit("setup_progress", message="loading the model")
        with self._interruptible():
            self._load_model(source)
        self._stop_point()
        with self.group.main_first() if self.group is not None else contextlib.nullcontext():
            resumed = self.resume_from = self._checkpoint_to_resume()  # rank 0 sets damaged ones aside
        if retried is not None:
            self.events.emit("oom_recovered", step=retried, micro_batch=self.micro_batch, grad_accum=self.grad_accum,
                             resume_from=str(resumed) if resumed else None, mem_allocated_after_free_gib=None,
                             reason=self.plan.retry_why, plan=self.plan.to_dict(), world_size=self.ranks.world_size)
        self._check_disk(source, resumed)
        load_peak = None
        if self.device["type"] == "cuda":
            # the peaks of loading (weights quantized on the device); the steps' peaks count from
            # process start, so a step's mem_peak_gib includes these: this tells the two apart
            idx = self.device["index"]
            load_peak = {"allocated_gib": round(torch.cuda.max_memory_allocated(idx) / 2**30, 3),
                         "reserved_gib": round(torch.cuda.max_memory_reserved(idx) / 2**30, 3)}
        self.events.emit(
            "run_started",
            config=cfg.to_dict(),
            versions=_versions(),
            device={k: self.device.get(k) for k in ("type", "name", "total_gib", "budget_gib", "index", "capability")},
            total_steps=self._total_steps(),
            resumed_from=str(resumed) if resumed else None,
            world_size=self.ranks.world_size,
            model=self.model_info,
            savers=self.model_info.get("savers", {}),
            plan=self.plan.to_dict(),
            load_peak=load_peak,
            pid=os.getpid(),
        )
        self.events.emit(
            "data_prepared",
            # samples, not packed rows: the user counts the records of their file
            train_samples=self.data_info.get("train_samples", len(self.train_rows)),
            eval_samples=self.data_info.get("eval_samples", len(self.eval_rows)),
            train_rows=len(self.train_rows),
            format=self.data_info.get("format"),
            length_stats=self.data_info.get("length_stats"),
            info=self.data_info,
            few_steps=few_steps_note(self._total_steps(), planned_steps(
                len(self.train_rows), self.micro_batch * self.ranks.world_size, self.grad_accum, 1.0, None),
                self.cfg.train.max_steps),
        )

    @contextlib.contextmanager
    def _interruptible(self):
        """A stage of setup that a stop may end at once: one process (several ranks stop together at
        the stop points) and a signal handler of ours; the stage writes nothing in the run directory."""
        self._setup_interruptible = bool(self._old_handlers) and self.ranks.world_size == 1
        try:
            yield
        finally:
            self._setup_interruptible = False

    def _checkpoint_to_resume(self) -> Optional[Path]:
        """The newest checkpoint whose files are all there and whole. A damaged one (a truncated
        file, a missing one) is set aside as damaged-checkpoint-N, with an event saying so."""
        shutil.rmtree(self.run_dir / "checkpoints" / rundirs.STAGING_DIR, ignore_errors=True)  # a save cut short
        for _step, path in reversed(rundirs.checkpoints(self.run_dir)):
            problem = rundirs.verify_checkpoint(path)
            if problem is None:
                return path
            try:
                moved = rundirs.set_aside_checkpoint(path)
            except OSError as exc:
                raise UserError(f"checkpoint {path} is damaged ({problem}) and cannot be moved aside "
                                f"({exc.strerror})", hint=f"delete {path} and resume again") from None
            self.events.emit("checkpoint_skipped", path=str(path), reason=problem, moved_to=str(moved))
        return None

    def _check_disk(self, source: Optional[str], resumed: Optional[Path]) -> None:
        """Refuse to start when the checkpoints and the adapter this run will write do not fit."""
        cfg = self.cfg
        lora = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = self._total_steps()
        done = 0
        if resumed is not None:
            try:
                done = int(json.loads((resumed / "trainer_state.json").read_text())["global_step"])
            except (OSError, ValueError, KeyError):
                done = 0
        need, self.checkpoint_bytes, what = rundirs.disk_needed(
            cfg, lora, rundirs.tokenizer_bytes(source), self.plan.optimizer,
            max(total - done, 1), existing_checkpoints=len(rundirs.checkpoints(self.run_dir)))
        rundirs.check_disk_space(self.run_dir, need, what)

    def _load_model(self, source: Optional[str] = None) -> None:
        from transformers import set_seed

        from core.model import load_for_training

        # Seeded before the adapters are created, so their initialisation (and so the whole run)
        # is the same every time a run is started or restarted from scratch.
        set_seed(self.cfg.train.seed)

        self.model, tok, self.model_info = load_for_training(self.cfg, self.device, source=source, plan=self.plan)
        if self.tokenizer is None:
            self.tokenizer = tok

    # ---- stage 2: train -------------------------------------------------------------------

    def _training_args(self):
        from transformers import TrainingArguments

        cfg, dev = self.cfg, self.device
        compute = self.plan.compute_dtype
        total = self._total_steps()
        has_eval = bool(self.eval_rows)
        return TrainingArguments(
            output_dir=str(self.run_dir / "checkpoints"),
            per_device_train_batch_size=self.micro_batch,
            per_device_eval_batch_size=self.micro_batch,
            gradient_accumulation_steps=self.grad_accum,
            num_train_epochs=cfg.train.epochs,
            max_steps=cfg.train.max_steps or -1,
            learning_rate=cfg.train.learning_rate,
            lr_scheduler_type=cfg.train.lr_scheduler,
            # Whole steps, computed here: `warmup_ratio` left TrainingArguments in transformers 5.x.
            warmup_steps=int(math.ceil(cfg.train.warmup_ratio * total)),
            weight_decay=cfg.train.weight_decay,
            max_grad_norm=cfg.train.max_grad_norm,
            optim=self.plan.optimizer,
            bf16=compute == "bf16" and dev["type"] == "cuda",
            fp16=compute == "fp16" and dev["type"] == "cuda",
            use_cpu=dev["type"] == "cpu",
            # Gradient checkpointing is not the Trainer's job here: core.model switches it on
            # (non-reentrant) before LoRA is attached, and core.savers may replace it.
            eval_strategy=("steps" if cfg.train.eval_steps else "epoch") if has_eval else "no",
            eval_steps=cfg.train.eval_steps,
            save_strategy="steps",
            save_steps=cfg.train.save_steps,
            save_total_limit=cfg.train.save_total_limit,
            logging_strategy="steps",
            logging_steps=cfg.train.logging_steps,
            seed=cfg.train.seed,
            data_seed=cfg.train.seed,
            report_to="none",
            disable_tqdm=True,
            # Report a NaN loss as NaN: the default filter logs a made-up finite value instead.
            logging_nan_inf_filter=False,
            remove_unused_columns=False,  # rows are plain dicts the collate function reads
            dataloader_num_workers=0,
            dataloader_pin_memory=dev["type"] == "cuda",
            # several processes: every LoRA weight gets a gradient each step (no search for unused ones)
            ddp_find_unused_parameters=False if self.ranks.world_size > 1 else None,
            ddp_timeout=distributed.COLLECTIVE_TIMEOUT_S,
        )

    def _make_trainer(self):
        graphs = self.plan.cuda_graphs and self.device.get("type") == "cuda"
        # graphed steps replay one shape: packed rows (nearly full anyway) are padded to full length
        self.counter = _TokenCounter(self.tokenizer.pad_token_id,
                                     self.cfg.data.max_seq_len if graphs and self.cfg.data.packing else 0)
        trainer = _counting_trainer(self.counter)(
            model=self.model,
            args=self._training_args(),
            train_dataset=self.train_rows,
            eval_dataset=self.eval_rows or None,
            data_collator=self.counter,
            processing_class=self.tokenizer,
            callbacks=[EventCallback(self), *self.extra_callbacks],
        )
        trainer.snug_length_buckets = not self.cfg.data.packing
        from core.fp16guard import set_initial_loss_scale

        set_initial_loss_scale(trainer)  # fp16 only: no skipped first steps (see core.fp16guard)
        trainer.snug_group = self.group
        if graphs:
            from core.graphs import CudaGraphStep

            trainer.snug_graphs = CudaGraphStep()
        return trainer

    def train(self) -> None:
        resume = self.resume_from
        if resume is not None and self._already_done(resume):
            return
        first = True
        while True:
            self.trainer = self._make_trainer()
            if not first:  # after an out-of-memory retry: the checkpoints this attempt wrote
                resume = self._checkpoint_to_resume()
            first = False
            out_of_memory = False
            try:
                self.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            except BaseException as exc:  # noqa: BLE001
                # several processes: the peers wait in a collective; the supervisor restarts them all
                if not (_is_oom(exc) and self.cfg.train.oom_recovery) or self.ranks.world_size > 1:
                    raise
                out_of_memory = True
            if not out_of_memory:
                break
            # Recovery happens here, outside the except block: the exception's traceback holds
            # the frames of the failed step, and with them its activations, until the block ends.
            self._recover_from_oom()
        self._finish_training()

    def _already_done(self, ckpt: Path) -> bool:
        """A checkpoint at the run's last step (its adapter save failed, say on a full disk):
        restore it and go on to the save, without a step the Trainer would otherwise add.

        transformers' train(resume_from_checkpoint=...) with global_step == max_steps still runs
        one step before it checks the count (measured, transformers 5.24: "finished 4/3")."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import TrainerState

        state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
        total = self._total_steps()
        if state.global_step < total:
            return False
        self.events.emit("setup_progress", message=f"{ckpt.name} is the run's last step ({state.global_step} of "
                                                   f"{total}): saving its adapter without training further")
        self.trainer = self._make_trainer()
        set_peft_model_state_dict(self.model, load_file(str(ckpt / "adapter_model.safetensors")))
        self.trainer.state = state
        for entry in state.log_history:
            if "loss" in entry:
                self.last_loss = entry["loss"]
            if "eval_loss" in entry:
                self.last_eval_step = entry.get("step")
        self._finish_training()
        return True

    def _recover_from_oom(self) -> None:
        nxt = self.plan.after_oom()
        if nxt is None:
            raise UserError(
                "CUDA out of memory even at micro-batch 1",
                hint="lower data.max_seq_len or lora.r, or choose a smaller model; `snugtune estimate` shows what fits",
            )
        step = self.trainer.state.global_step
        self._free_model()
        self.plan = nxt
        self.micro_batch, self.grad_accum = nxt.micro_batch, nxt.grad_accum
        write_plan(self.run_dir, nxt)
        ckpt = last_checkpoint(self.run_dir)
        freed_to = round(torch.cuda.memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
        self.events.emit("oom_recovered", step=step, micro_batch=self.micro_batch, grad_accum=self.grad_accum,
                         resume_from=str(ckpt) if ckpt else None, mem_allocated_after_free_gib=freed_to,
                         reason=nxt.retry_why, plan=nxt.to_dict())
        # A fresh model: the weights in memory moved past the last checkpoint, which the Trainer
        # restores (adapter, optimizer, scheduler, data position) when there is one.
        self._load_model()

    def _finish_training(self) -> None:
        state = self.trainer.state
        if self.stopped and state.max_steps and state.global_step >= state.max_steps:
            self.stopped = False  # the stop came with the last step: the run is simply finished
        if self.stopped:
            return
        # One evaluation at the end, unless the last step was just evaluated.
        if self.eval_rows and self.last_eval_step != self.trainer.state.global_step:
            self.trainer.evaluate()

    def _free_model(self) -> None:
        gs = getattr(self.trainer, "snug_graphs", None)
        if gs is not None:  # a captured graph holds its own memory pool until released
            gs.release("model freed")
        self.trainer = None
        self.model = None
        try:
            import bitsandbytes as bnb

            # The Trainer registers every embedding module with bitsandbytes' global optimizer
            # manager (to keep their states in 32 bits); that registry would keep the old model's
            # embeddings (0.25 GiB for Qwen2.5-0.5B) alive through every retry.
            bnb.optim.GlobalOptimManager.get_instance().initialize()
        except Exception:  # noqa: BLE001 - no bitsandbytes, or another layout: nothing to release
            pass
        gc.collect()  # the Trainer, its accelerator and optimizer hold the model in reference cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    # ---- stage 3: save --------------------------------------------------------------------

    def save(self) -> Path:
        """The final adapter, written to adapter.tmp and renamed: a present adapter/ is complete."""
        final = self.run_dir / "adapter"
        if not self.ranks.main:
            return final  # rank 0 writes it
        tmp = self.run_dir / "adapter.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.trainer.model.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        rundirs.share_modes(tmp)
        tmp.rename(final)
        return final

    # ---- stage 4: cleanup -----------------------------------------------------------------

    def cleanup(self) -> None:
        self._restore_handlers()
        if self.ranks.main:
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        if self.events is not None:
            self.events.close()
        if self.group is not None:
            self.group.close()
            self.group = None

    # ---- several processes (core.distributed) ---------------------------------------------------

    def _total_steps(self) -> int:
        """Optimizer steps of the run: each reads micro_batch x grad_accum rows on every process."""
        return planned_steps(len(self.train_rows), self.micro_batch * self.ranks.world_size, self.grad_accum,
                             self.cfg.train.epochs, self.cfg.train.max_steps)

    def _join_group(self, cfg: RunConfig) -> RunConfig:
        """This rank's device (LOCAL_RANK: the supervisor narrowed CUDA_VISIBLE_DEVICES to the run's
        cards) and the process group."""
        cfg = cfg.with_overrides([f"gpu.device_index={self.ranks.local_rank}"])
        on_cuda = cfg.gpu.profile != "cpu" and torch.cuda.is_available()
        if on_cuda:
            torch.cuda.set_device(self.ranks.local_rank)
        self.group = distributed.Group(self.ranks, "cuda" if on_cuda else "cpu")
        return cfg

    def _relaunch_retries(self) -> Optional[int]:
        """Several processes, started again after an out-of-memory error (core.distributed): the same
        retry plan on every rank, the k-th after_oom() of the config's. Returns the failed step."""
        try:
            attempts = int(os.environ.get(distributed.ENV_OOM_ATTEMPT, "0"))
        except ValueError:
            attempts = 0
        if self.ranks.world_size <= 1 or attempts <= 0:
            return None
        for _ in range(attempts):
            nxt = self.plan.after_oom()
            if nxt is None:
                raise UserError(f"CUDA out of memory even at micro-batch 1 (on one of {self.ranks.world_size} GPUs)",
                                hint="lower data.max_seq_len or lora.r, or choose a smaller model; "
                                     "`snugtune estimate` shows what fits one card")
            self.plan = nxt
        try:
            return int(os.environ.get(distributed.ENV_OOM_STEP, "0"))
        except ValueError:
            return 0


class _SetupStopped(BaseException):
    """A stop asked for during setup: the engine ends with run_stopped before training. A
    BaseException, so library code's `except Exception` fallbacks (model loading has them) pass it on."""


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class EventCallback(_trainer_callback_base()):
    """Turns the Trainer's logs into events, and stop requests into a checkpoint and a stop."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._t0 = None
        self._step0 = 0
        self._last_t = None
        self._last_tokens = 0
        self._health = None  # core.fp16guard.StepHealth, made at the first log (the model is loaded by then)

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = self._last_t = time.monotonic()
        self._step0 = state.global_step
        self._rate = rundirs.StepRate()  # the ETA from the recent steps' time (core/runs.py says why)
        self._rate.add(state.global_step, self._t0)
        self._last_tokens = self.engine.counter.tokens if self.engine.counter else 0
        if self.engine.group is not None:
            self._last_tokens = self.engine.group.sum(self._last_tokens)
        if self.engine.stop_requested():
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.engine.stop_requested() and not self.engine.stopped:
            self.engine.stopped = True
            control.should_save = True
            control.should_training_stop = True
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        ev = self.engine.events
        if "eval_loss" in logs:
            self.engine.last_eval_step = state.global_step
            ev.emit("eval_logged", step=state.global_step, eval_loss=logs["eval_loss"])
            return
        if "loss" not in logs:
            return  # the end-of-training summary (train_runtime ...) is not a step
        now = time.monotonic()
        tokens = self.engine.counter.tokens if self.engine.counter else 0
        if self.engine.group is not None:  # every rank logs the same steps: the tokens of all of them
            tokens = self.engine.group.sum(tokens)
        dt = max(now - self._last_t, 1e-9)
        tps = (tokens - self._last_tokens) / dt
        self._last_t, self._last_tokens = now, tokens
        remaining = max(state.max_steps - state.global_step, 0)
        self._rate.add(state.global_step, now)
        eta = self._rate.eta(remaining)
        mem: dict[str, Any] = {"mem_allocated_gib": None, "mem_reserved_gib": None, "mem_peak_gib": None,
                               "mem_peak_allocated_gib": None}
        if self.engine.device.get("type") == "cuda":
            idx = self.engine.device["index"]
            mem = {
                "mem_allocated_gib": round(torch.cuda.memory_allocated(idx) / 2**30, 3),
                "mem_reserved_gib": round(torch.cuda.memory_reserved(idx) / 2**30, 3),
                "mem_peak_gib": round(torch.cuda.max_memory_reserved(idx) / 2**30, 3),
                # the peak the tensors themselves took (the estimate's allocated_gib), beside the reserve
                "mem_peak_allocated_gib": round(torch.cuda.max_memory_allocated(idx) / 2**30, 3),
            }
        self.engine.last_loss = logs["loss"]
        if self._health is None:
            from core.fp16guard import StepHealth

            # fp16 on a GPU: a finite loss with an inf gradient norm is the loss scaler skipping a step
            self._health = StepHealth(fp16=self.engine.model_info.get("compute_dtype") == "fp16"
                                      and self.engine.device.get("type") == "cuda", diverged_after=DIVERGED_AFTER)
        unhealthy = self._health.update(logs["loss"], logs.get("grad_norm"))
        ev.emit(
            "step_logged",
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=round(state.epoch or 0.0, 4),
            loss=logs["loss"],
            learning_rate=logs.get("learning_rate"),
            grad_norm=logs.get("grad_norm"),
            tokens_per_s=round(tps, 1),
            tokens_seen=tokens,
            eta_s=round(eta, 1) if eta is not None else None,
            micro_batch=self.engine.micro_batch,
            grad_accum=self.engine.grad_accum,
            cuda_graphs=getattr(self.engine.trainer, "snug_graphs", None) and self.engine.trainer.snug_graphs.status,
            **mem,
        )
        if unhealthy:
            from core.fp16guard import divergence_hint

            info = self.engine.model_info
            raise UserError(
                f"training diverged at step {state.global_step}: {unhealthy}",
                hint=divergence_hint(info.get("compute_dtype", ""), bool(info.get("fp16_guard"))),
            )

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.engine.events.emit("checkpoint_saved", step=state.global_step, path=str(path))


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m core.train RUN_DIR", file=sys.stderr)
        return EXIT_USER
    return Engine(argv[0], callbacks=_env_callbacks()).run()


def _env_callbacks() -> list:
    """TrainerCallbacks named in $SNUGTUNE_CALLBACKS ("module:factory,..."): the plug-in point that
    tests and benchmarks use when the engine runs in its own processes (several ranks, a spawn)."""
    import importlib

    out = []
    for item in filter(None, os.environ.get("SNUGTUNE_CALLBACKS", "").split(",")):
        module, _, name = item.strip().partition(":")
        out.append(getattr(importlib.import_module(module), name)())
    return out


if __name__ == "__main__":
    sys.exit(main())
