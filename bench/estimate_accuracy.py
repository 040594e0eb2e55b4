"""How right is `snugtune estimate`? Measure real peaks on a CUDA GPU and compare.

For a matrix of configurations (6 architectures incl. Gemma-2's 256k vocabulary, 256 to
4096 tokens, micro-batch 1-4, LoRA rank 8-64, checkpointing on and off, three optimizers),
random-init models are built once from the real configs (memory does not depend on weight
values), saved, and each (configuration, recipe) then runs 3 optimizer steps in its own
subprocess so peaks never mix:

* plain: /work/shared/reference/qlora_probe.py's recipe (prepare_model_for_kbit_training,
  peft LoRA, HF gradient checkpointing, the model's own loss);
* snugtune: the engine's path (core.model load/prepare/attach + core.savers.install_savers),
  reached through `snugtune_model()` below, the one function to point elsewhere if the
  engine's entry points move.

Measured: torch.cuda.max_memory_allocated / max_memory_reserved, and NVML's used memory for
the process (sampled every 5 ms; per-process when the driver exposes it). Compared with
core.estimate.estimate(...) for the same settings. Writes estimate_accuracy.json and
estimate_accuracy.md (config, measured, estimated, error %) into $OUT (default bench/results).

    PYTHONPATH=. python bench/estimate_accuracy.py            # ~4-6 min on one H200
    BENCH_JOBS=1 ...                                          # one case at a time (exact NVML)
    BENCH_ONLY=qwen2.5-0.5b ...                               # a subset, by model name
    python bench/estimate_accuracy.py --rescore bench/results/estimate_accuracy.json
                                  # today's estimator against the stored measurements (no GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 2**30
STEPS = int(os.environ.get("BENCH_STEPS", 3))

# Bench model name -> catalog id (the catalog holds the real config numbers).
MODELS = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "gemma-2-2b": "google/gemma-2-2b",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B-Base",
    "stablelm-2-1.6b": "stabilityai/stablelm-2-1_6b",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
}


@dataclass(frozen=True)
class Case:
    """One configuration; each runs under both recipes."""

    name: str
    model: str  # key of MODELS
    seq: int
    micro_batch: int = 1
    rank: int = 16
    grad_ckpt: bool = True
    optimizer: str = "paged_adamw_8bit"
    grad_accum: int = 1
    vram_gib: Optional[float] = None  # the engine sizes chunks / offload for this budget (no cap is set)
    offload: str = "auto"


def config_matrix() -> list[Case]:
    """The benchmark's configurations (>= 12, >= 5 architectures, 256-4096 tokens, mb 1-4,
    rank 8-64, checkpointing on and off)."""
    return [
        Case("q05-512", "qwen2.5-0.5b", 512),
        Case("q05-4096", "qwen2.5-0.5b", 4096),
        Case("q15-1024", "qwen2.5-1.5b", 1024),
        Case("q15-2048-b2-r32-acc2", "qwen2.5-1.5b", 2048, micro_batch=2, rank=32, grad_accum=2),
        Case("q15-4096-offload-4g", "qwen2.5-1.5b", 4096, vram_gib=4.0, offload="on"),
        Case("l1-1024", "llama-3.2-1b", 1024),
        Case("l1-512-b4-r64", "llama-3.2-1b", 512, micro_batch=4, rank=64),
        Case("g2-1024", "gemma-2-2b", 1024),
        Case("g2-256-b2-r8-nogc", "gemma-2-2b", 256, micro_batch=2, rank=8, grad_ckpt=False),
        Case("q3-0.6-2048-r8", "qwen3-0.6b", 2048, rank=8),
        Case("q3-0.6-512-b2-nogc-adamw", "qwen3-0.6b", 512, micro_batch=2, grad_ckpt=False, optimizer="adamw_torch"),
        Case("slm-1024", "stablelm-2-1.6b", 1024),
        Case("slm-256-b4-r32-nogc-8bit", "stablelm-2-1.6b", 256, micro_batch=4, rank=32, grad_ckpt=False,
             optimizer="adamw_8bit"),
        Case("smol360-4096-4g", "smollm2-360m", 4096, vram_gib=4.0),
    ]


def hf_config_kwargs(spec) -> dict:
    """transformers config kwargs that rebuild `spec`'s architecture (random weights)."""
    kw = dict(
        hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size, tie_word_embeddings=spec.tie_word_embeddings,
        max_position_embeddings=spec.max_position_embeddings,
    )
    if spec.head_dim != spec.hidden_size // spec.num_heads or spec.model_type in ("qwen3", "gemma2", "gemma3_text"):
        kw["head_dim"] = spec.head_dim
    if spec.model_type == "stablelm":
        kw["use_qkv_bias"] = spec.qkv_bias
    if spec.model_type == "gemma2" and spec.final_logit_softcap:
        kw["final_logit_softcapping"] = spec.final_logit_softcap
    return kw


def run_config(case: Case, model_id: str | None = None):
    """The RunConfig of a case (what both the engine and the estimator read)."""
    from core.config import RunConfig

    train = {"micro_batch": case.micro_batch, "grad_accum": case.grad_accum, "optimizer": case.optimizer,
             "gradient_checkpointing": case.grad_ckpt, "offload_activations": case.offload}
    gpu = {"profile": "auto"}
    if case.vram_gib:
        gpu["vram_budget_gib"] = case.vram_gib
    return RunConfig.from_dict({
        "model": {"name_or_path": model_id or MODELS[case.model]},
        "data": {"path": "(random tokens)", "max_seq_len": case.seq},
        "lora": {"r": case.rank, "alpha": 2 * case.rank, "dropout": 0.0},
        "train": train,
        "gpu": gpu,
    })


def estimate_case(case: Case, recipe: str, total_gib: float = 139.81, context_gib: float | None = None,
                  kernels: Optional[bool] = None) -> dict:
    """core.estimate's numbers for a case on the bench GPU (budget: the case's vram or the card).

    `kernels`: whether the measured engine ran core/kernels.py (None: what the plan decides here).
    The stored measurements (bench/results/estimate_accuracy.json) predate the kernels: transformers'
    modules, so a row without a `kernels` field is re-estimated with them off."""
    from dataclasses import replace

    from core import plan as P
    from core.catalog import catalog_lookup
    from core.estimate import estimate
    from core.gpu import resolve_gpu

    spec = catalog_lookup(MODELS[case.model])
    gpu = resolve_gpu("h200", case.vram_gib)
    gpu = replace(gpu, total_gib=total_gib, budget_gib=case.vram_gib or total_gib)
    if context_gib is not None:
        gpu = replace(gpu, cuda_context_gib=context_gib)
    # the bench measured the need: every block checkpointed (keep_layers=0, as the runs were)
    cfg = run_config(case)
    pl = P.plan(cfg, spec, gpu)
    if kernels is not None:
        pl = replace(pl, kernels=bool(kernels) and pl.kernels)
    est = estimate(spec, cfg, gpu, recipe, plan=pl, keep_layers=0)
    return {"kernels": pl.kernels, "total_gib": est.total_gib, "allocated_gib": est.allocated_gib, "reserved_gib": est.reserved_gib,
            "device_gib": est.device_gib,
            "components": est.components, "peak_phase": est.peak_phase, "verdict": est.verdict, "knobs": est.knobs}


def error_pct(measured: Optional[float], estimated: Optional[float]) -> Optional[float]:
    """(estimated - measured) / measured in %; positive = the estimate is conservative."""
    if not measured or estimated is None:
        return None
    return 100.0 * (estimated - measured) / measured


def markdown_table(results: list[dict]) -> str:
    """The README table: one row per (case, recipe)."""
    head = ("| config | recipe | measured reserved GiB | estimated reserved GiB | error % "
            "| measured alloc GiB | est. alloc GiB | error % | NVML process GiB | est. device GiB | error % |")
    lines = [head, "|" + "---|" * 11]

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    for r in results:
        m, e = r.get("measured") or {}, r.get("estimated") or {}
        if r.get("error"):
            lines.append(f"| {r['case']} | {r['recipe']} | {r['error'][:60]} | {f(e.get('reserved_gib'))} | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r['case']} | {r['recipe']} | {f(m.get('peak_reserved_gib'))} | {f(e.get('reserved_gib'))} | "
            f"{f(error_pct(m.get('peak_reserved_gib'), e.get('reserved_gib')), '{:+.1f}')} | "
            f"{f(m.get('peak_alloc_gib'))} | {f(e.get('allocated_gib'))} | "
            f"{f(error_pct(m.get('peak_alloc_gib'), e.get('allocated_gib')), '{:+.1f}')} | "
            f"{f(m.get('nvml_process_gib'))} | {f(e.get('device_gib'))} | "
            f"{f(error_pct(m.get('nvml_process_gib'), e.get('device_gib')), '{:+.1f}')} |"
        )
    errs = [abs(x) for r in results if not r.get("error")
            for x in [error_pct((r.get("measured") or {}).get("peak_reserved_gib"), (r.get("estimated") or {}).get("reserved_gib"))]
            if x is not None]
    if errs:
        lines.append("")
        lines.append(f"Reserved-memory error: max {max(errs):.1f}%, mean {sum(errs) / len(errs):.1f}% over {len(errs)} runs.")
    for label, mk, ek in (("Allocated", "peak_alloc_gib", "allocated_gib"), ("NVML", "nvml_process_gib", "device_gib")):
        more = [abs(x) for r in results if not r.get("error")
                for x in [error_pct((r.get("measured") or {}).get(mk), (r.get("estimated") or {}).get(ek))]
                if x is not None]
        if more:
            lines.append(f"{label} error: max {max(more):.1f}%, mean {sum(more) / len(more):.1f}%.")
    return "\n".join(lines)


def write_markdown(results: list[dict], md: Path, meta: dict | None = None) -> Path:
    header = "# snugtune estimate accuracy\n\n"
    if meta:
        header += "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n"
    md.write_text(header + markdown_table(results) + "\n")
    return md


def write_report(results: list[dict], out_dir: Path, meta: dict | None = None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "estimate_accuracy.json"
    md = out_dir / "estimate_accuracy.md"
    js.write_text(json.dumps({"meta": meta or {}, "results": results}, indent=2))
    write_markdown(results, md, meta)
    return js, md


def rescore(path: Path) -> Path:
    """Recompute every row's estimate with the current core.estimate from the stored
    configuration, keep the GPU's measurements as they are, and rewrite the .md beside the
    JSON (the JSON itself, the GPU's record, is not touched). Needs no GPU."""
    try:
        data = json.loads(Path(path).read_text())
        results = data["results"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: not a bench result file ({exc})")
    rows = []
    for r in results:
        row = dict(r)
        try:
            row["estimated"] = estimate_case(Case(**r["config"]), r["recipe"], r.get("total_memory_gib", 139.81),
                                             kernels=r.get("kernels", False))
        except Exception as exc:  # noqa: BLE001 (report the row, keep going)
            row["estimated"] = None
            row["estimate_error"] = repr(exc)
        rows.append(row)
    meta = dict(data.get("meta") or {})
    meta["estimates"] = f"rescored from the stored measurements by the current code: " \
                        f"python bench/estimate_accuracy.py --rescore {path}"
    return write_markdown(rows, Path(path).with_suffix(".md"), meta)


# ---- GPU side (subprocesses) -------------------------------------------------------------------------

def build_models(root: Path, names: list[str]) -> None:
    """Random-init bf16 models from the real configs, saved once (like qlora_probe.build)."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.catalog import catalog_lookup

    for name in names:
        path = root / name
        if (path / "config.json").exists():
            continue
        spec = catalog_lookup(MODELS[name])
        cfg = AutoConfig.for_model(spec.model_type, **hf_config_kwargs(spec))
        with torch.device("cuda"):
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.save_pretrained(path)
        del m
        gc.collect()
        torch.cuda.empty_cache()
        print(f"built {name}", flush=True)


class NvmlSampler:
    """Peak NVML memory of this process (per-process when the driver exposes it) and of the device."""

    def __init__(self, index: int = 0, period: float = 0.005):
        self.pid = os.getpid()
        self.period = period
        self.peak_proc = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.h = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.device_before = pynvml.nvmlDeviceGetMemoryInfo(self.h).used
        except Exception:  # no nvidia-ml-py or no NVML: torch's numbers only
            self.nv = None
            self.device_before = 0
        self.peak_device = self.device_before

    def _proc_used(self):
        try:
            for p in self.nv.nvmlDeviceGetComputeRunningProcesses(self.h):
                if p.pid == self.pid and p.usedGpuMemory:
                    return p.usedGpuMemory
        except self.nv.NVMLError:
            return None
        return None

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.period)

    def sample(self):
        if self.nv is None:
            return
        used = self.nv.nvmlDeviceGetMemoryInfo(self.h).used
        self.peak_device = max(self.peak_device, used)
        pu = self._proc_used()
        if pu is not None:
            self.peak_proc = max(self.peak_proc or 0, pu)

    def start(self):
        if self.nv is not None:
            self._t.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._t.is_alive():
            self._t.join()
        self.sample()
        if self.nv is None:
            return {"nvml_process_gib": None, "nvml_device_delta_gib": None}
        return {"nvml_process_gib": self.peak_proc / GIB if self.peak_proc else None,
                "nvml_device_delta_gib": (self.peak_device - self.device_before) / GIB}


def plain_model(model_dir: str, case: Case):
    """The plain recipe, as /work/shared/reference/qlora_probe.py runs it."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0})
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=case.grad_ckpt,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    lc = LoraConfig(r=case.rank, lora_alpha=2 * case.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                    target_modules="all-linear")
    m = get_peft_model(m, lc)
    m.train()
    return m


def snugtune_model(model_dir: str, case: Case):
    """snugtune's engine path: core.model's 4-bit load, 16-bit-keeping prepare, LoRA, then the savers.

    This is the one function to repoint if the engine's entry points change.
    """
    from core import model as cm
    from core import savers

    cfg = run_config(case, model_id=model_dir)
    device = cm.select_device(cfg)
    m = cm.load_base_model(model_dir, cfg, device)
    cm.prepare_for_training(m, cfg)
    m = cm.attach_lora(m, cfg)
    from core import plan as plan_mod
    from core.train import source_spec

    # the need: every block checkpointed (keep=0), what the estimate's verdict is about
    pl = plan_mod.plan(cfg, source_spec(model_dir), plan_mod.target_for_device(cfg, device), keep=0)
    applied = savers.install_savers(m, pl) or {}
    m.train()
    return m, applied


def _optimizer(params, name):
    import bitsandbytes as bnb
    import torch

    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def run_one(case: Case, recipe: str, model_dir: str) -> dict:
    """Inside the subprocess: load, train STEPS optimizer steps, measure the peaks."""
    sampler = NvmlSampler().start()
    import torch

    torch.cuda.init()
    applied = {}
    if recipe == "plain":
        m = plain_model(model_dir, case)
    else:
        m, applied = snugtune_model(model_dir, case)
    after_load = torch.cuda.memory_allocated() / GIB
    opt = _optimizer([p for p in m.parameters() if p.requires_grad], case.optimizer)
    vocab = m.config.get_text_config().vocab_size if hasattr(m.config, "get_text_config") else m.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = None
    # the engine trains through HF Trainer with bf16=True, i.e. under autocast; the plain
    # reference script does not use autocast
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if recipe == "snugtune"
           else torch.autocast("cuda", enabled=False))
    for _ in range(STEPS):
        for _ in range(case.grad_accum):
            ids = torch.randint(0, vocab, (case.micro_batch, case.seq), device="cuda", generator=g)
            with amp:
                out = m(input_ids=ids, labels=ids)
            (out.loss / case.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    measured = {
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "after_load_gib": after_load,
        "s_per_step": dt / STEPS,
        "tokens_per_s": STEPS * case.grad_accum * case.micro_batch * case.seq / dt,
        "loss": float(out.loss),
    }
    measured.update(sampler.stop())
    # what the process holds outside PyTorch's allocator (context, cuBLAS, paged optimizer states)
    if measured.get("nvml_process_gib"):
        measured["outside_allocator_gib"] = measured["nvml_process_gib"] - measured["peak_reserved_gib"]
    return {"measured": measured, "savers": applied, "total_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB}


def _subprocess_case(case: Case, recipe: str, model_dir: Path, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if recipe == "snugtune":
        # as the engine's launcher (core/runs.py) does; and measure the need, not the savers'
        # optional use of spare memory for un-checkpointed blocks
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env["SNUGTUNE_KEEP_LAYERS"] = "0"
    cmd = [sys.executable, __file__, "--one", json.dumps(asdict(case)), "--recipe", recipe, "--model-dir", str(model_dir)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)[:400] or f"exit {p.returncode}"}
    res = json.loads(lines[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


CALIBRATION_CASES = [Case("cal-512", "qwen2.5-0.5b", 512), Case("cal-2048", "qwen2.5-0.5b", 2048)]


def calibration_factor(pairs: list[tuple[float, float]]) -> float:
    """measured/estimated over the probe's runs: the larger ratio, so the correction never
    makes the estimate less safe than the worst run says."""
    ratios = [m / e for m, e in pairs if m and e]
    if not ratios:
        raise ValueError("no usable measurement")
    return max(ratios)


def calibrate(root: Path) -> int:
    """Measure the probe cases on this card and store a per-recipe correction (core.estimate)."""
    from dataclasses import replace

    from core.catalog import catalog_lookup
    from core.estimate import estimate, save_calibration
    from core.gpu import resolve_gpu

    gpu = resolve_gpu("auto")
    if not gpu.detected:
        print(f"no GPU to calibrate: {gpu.note}", file=sys.stderr)
        return 2
    b = subprocess.run([sys.executable, __file__, "--build", "qwen2.5-0.5b", "--models-root", str(root)],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    if b.returncode != 0:
        return 1
    target = replace(gpu, budget_gib=gpu.total_gib)  # the engine sizes its savers on the card's total
    for recipe in ("snugtune", "plain"):
        pairs, samples = [], []
        for case in CALIBRATION_CASES:
            res = _subprocess_case(case, recipe, root / case.model, 240)
            if res.get("error"):
                print(f"{case.name} {recipe}: {res['error']}", file=sys.stderr)
                continue
            measured = res["measured"]["peak_reserved_gib"]
            est = estimate(catalog_lookup(MODELS[case.model]), run_config(case), target, recipe, calibration=1.0)
            pairs.append((measured, est.reserved_gib))
            samples.append({"case": case.name, "measured_gib": round(measured, 4), "estimated_gib": round(est.reserved_gib, 4)})
        try:
            factor = calibration_factor(pairs)
            path = save_calibration(gpu.name, recipe, factor, samples)
        except (ValueError, Exception) as exc:  # noqa: BLE001 (report and go on with the other recipe)
            print(f"{recipe}: not calibrated ({exc})", file=sys.stderr)
            continue
        print(f"{gpu.label}: {recipe} x{factor:.3f} stored in {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--models-root", default=os.environ.get("BENCH_MODELS"), help="where to keep the built models")
    ap.add_argument("--calibrate", action="store_true",
                    help="a short probe on this machine's card: store measured/estimated per recipe, which "
                    "`snugtune estimate --gpu auto` then applies (about a minute)")
    ap.add_argument("--rescore", metavar="FILE.json",
                    help="recompute the estimates of a stored run with the current code and rewrite "
                    "the .md beside it (measurements unchanged; no GPU needed)")
    args = ap.parse_args(argv)

    if args.rescore:
        md = rescore(Path(args.rescore))
        print(md.read_text())
        print(f"wrote {md}")
        return 0

    if args.build:
        build_models(Path(args.models_root), args.build.split(","))
        return 0
    if args.one:
        case = Case(**json.loads(args.one))
        print(json.dumps(run_one(case, args.recipe, args.model_dir)), flush=True)
        return 0

    if args.calibrate:
        return calibrate(Path(args.models_root or tempfile.mkdtemp(prefix="snug-cal-")))

    out_dir = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    cases = config_matrix()
    only = os.environ.get("BENCH_ONLY")
    if only:
        cases = [c for c in cases if c.model in only.split(",") or c.name in only.split(",")]
    root = Path(args.models_root or tempfile.mkdtemp(prefix="snug-bench-"))
    names = sorted({c.model for c in cases})
    t0 = time.perf_counter()
    b = subprocess.run([sys.executable, __file__, "--build", ",".join(names), "--models-root", str(root)],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    if b.returncode != 0:
        print("building the models failed", file=sys.stderr)
        return 1
    print(f"models built in {time.perf_counter() - t0:.0f}s", flush=True)
    jobs = int(os.environ.get("BENCH_JOBS", 4))  # per-process NVML numbers keep parallel runs apart
    timeout = float(os.environ.get("BENCH_CASE_TIMEOUT", 240))
    work = [(c, r) for c in cases for r in ("plain", "snugtune")]

    def go(item):
        case, recipe = item
        res = _subprocess_case(case, recipe, root / case.model, timeout)
        total = res.get("total_memory_gib", 139.81)
        measured = res.get("measured") or {}
        row = {"case": case.name, "recipe": recipe, "config": asdict(case), **res}
        try:
            row["estimated"] = estimate_case(case, recipe, total)
            row["kernels"] = row["estimated"]["kernels"]  # the engine measured ran what this plan says
        except Exception as exc:  # noqa: BLE001 (report, keep going)
            row["estimated"] = None
            row["estimate_error"] = repr(exc)
        if measured.get("outside_allocator_gib") is not None:
            row["measured_outside_allocator_gib"] = measured["outside_allocator_gib"]
        print(f"{case.name:<28} {recipe:<9} {json.dumps({k: round(v, 3) for k, v in measured.items() if isinstance(v, float)})}"
              f"{' ERROR ' + res['error'] if res.get('error') else ''}", flush=True)
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(go, work))
    meta = {"steps": STEPS, "jobs": jobs, "wall_s": round(time.perf_counter() - t0, 1),
            "command": "PYTHONPATH=. python bench/estimate_accuracy.py"}
    js, md = write_report(results, out_dir, meta)
    print(md.read_text())
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
