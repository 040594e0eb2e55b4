"""Does it learn on real pretrained weights? Gemma 3 270M (a GGUF file), snugtune vs the plain recipe.

The task (ours, not the demo's, not an identity set): write an ISO date out in words,
"2021-03-04" -> "March 4, 2021". Deterministic, so a held-out scorer is exact match: 128
held-out dates (none of them in the 2,400 training dates) are answered greedily before and
after training, with the prompt laid out as in training. Every variant trains the same rows
for the same number of optimizer steps (micro-batch 8, lr 2e-4 cosine, LoRA r=16 on all seven
projections):

  sn-bf16-pack / sn-bf16-nopack / sn-bf16-pack-nographs / sn-bf16-nopack-nographs
      snugtune's engine (core.train.Engine), bf16, packing on/off, CUDA-graph steps auto/off
  sn-fp16-pack / sn-fp16-nopack
      the same in fp16 (what a T4, RTX 20xx or GTX 16xx gets): the fp16 guard on (auto for Gemma)
  sn-bf16-pack-nographs-nokern / sn-fp16-pack-nokern
      the same with SNUGTUNE_KERNELS=off (transformers' norms, GeGLU and rotary instead of
      core/kernels.py's fused Triton ones): the kernels' numerics on real weights
  plain-bf16 / plain-fp16
      the plain recipe (/work/shared/reference/qlora_probe.py's: NF4 + prepare_model_for_kbit_training
      + peft LoRA + HF checkpointing + paged 8-bit AdamW + HF Trainer) on the same unpacked rows

Each variant is its own process; they run concurrently on the one GPU (per-process memory
peaks stay valid; tokens/s under sharing are not a speed benchmark: --speed adds bf16 and
fp16 runs alone, one after the other). --estimator adds the estimator check: peak memory of
3 steps at 512 and 2,048 tokens x micro-batch 1 and 4, against core.estimate.

    python bench/real_weights.py --gguf /tmp/gemma.gguf --out $OUT --steps 200 --jobs 15 --estimator --deadline-s 295  # GPU
    python bench/real_weights.py --smoke --out /tmp/rw      # CPU: a tiny GGUF of the demo model, 2 steps each

Writes real_weights.json (everything, with the command) and real_weights.md (tables) to --out.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PROMPT = "Write this date out in words: {iso}"


# ---- the task --------------------------------------------------------------------------------------

def date_task(n_train: int, n_test: int, seed: int = 7) -> tuple[list[dict], list[dict]]:
    """Disjoint training and held-out dates between 1900 and 2099."""
    rng = random.Random(seed)
    start, days = dt.date(1900, 1, 1), (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days
    picked = rng.sample(range(days), n_train + n_test)

    def rec(i):
        d = start + dt.timedelta(days=i)
        return {"instruction": PROMPT.format(iso=d.isoformat()), "input": "",
                "output": f"{MONTHS[d.month - 1]} {d.day}, {d.year}"}

    return [rec(i) for i in picked[:n_train]], [rec(i) for i in picked[n_train:]]


# Gemma's tokenizer spells numbers digit by digit: "September 18, 2083" is 12 tokens after the
# leading space. The first GPU run (bench/results/real_weights.json) used 12 and so cut most
# answers short ("November 12,"): its exact-match scores count only the short dates.
MAX_NEW_TOKENS = 24


def score(model, tokenizer, data_cfg, tests: list[dict], max_new_tokens: int = MAX_NEW_TOKENS, batch: int = 64) -> dict:
    """Exact-match accuracy of greedy answers (first line, stripped) on the held-out dates."""
    import torch

    from core.data import render_prompt

    prompts = [render_prompt(tokenizer, data_cfg, [{"role": "user", "content": t["instruction"]}], kind="instruction")
               for t in tests]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    dev = next(p for p in model.parameters()).device
    answers = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(prompts), batch):
                enc = tokenizer(prompts[s:s + batch], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(dev) for k, v in enc.items()}
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                for row in out[:, enc["input_ids"].shape[1]:]:
                    answers.append(tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip())
    finally:
        tokenizer.padding_side = side
        model.train(was)
    right = [a == t["output"] for a, t in zip(answers, tests)]
    # a right beginning of the answer, cut by max_new_tokens (a scorer check: should be 0 now)
    cut = [bool(a) and a != t["output"] and t["output"].startswith(a) for a, t in zip(answers, tests)]
    return {"exact": sum(right), "prefix_only": sum(cut), "n": len(tests), "accuracy": round(sum(right) / len(tests), 4),
            "max_new_tokens": max_new_tokens,
            "examples": [{"q": t["instruction"], "want": t["output"], "got": a} for a, t in list(zip(answers, tests))[:4]]}


# ---- one variant (a child process) ----------------------------------------------------------------------

def _cfg(model_dir: str, data: str, runs: str, steps: int, dtype: str, packing: bool, graphs: bool,
         seq: int = 128, micro_batch: int = 8, cpu: bool = False, seed: int = 42, responses_only: bool = True):
    from core.config import RunConfig

    return RunConfig.from_dict({
        "gpu": {"profile": "cpu" if cpu else "auto"},
        "model": {"name_or_path": model_dir, "compute_dtype": "fp32" if cpu else dtype, "load_in_4bit": True},
        "data": {"path": data, "format": "instruction", "max_seq_len": seq, "packing": packing, "eval_fraction": 0.0,
                 "train_on_responses_only": responses_only},
        "lora": {"r": 16, "alpha": 32},
        "train": {"micro_batch": micro_batch, "grad_accum": 1, "max_steps": steps, "learning_rate": 2e-4,
                  "lr_scheduler": "cosine", "warmup_ratio": 0.03, "save_steps": 100_000, "logging_steps": 1,
                  "cuda_graphs": "auto" if graphs else "off", "seed": seed},
        "output": {"runs_dir": runs},
    })


def run_snugtune(spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from core import savers
    from core.events import read_events

    # "-oldsum": the fused NF4 + LoRA node's sum as before run 4 (the 16-bit base output rounded,
    # then the LoRA term added and rounded again), to measure the change beside it in one run
    savers.LORA_SUM_FP32 = spec.get("lora_sum_fp32", True)
    if spec.get("force_guard"):
        # "-guard" on a bf16 variant: the fp16 guard's patches without fp16 (its cost alone, no
        # loss scaler); the plan only turns the guard on for fp16, so this bench overrides its rule
        from core import plan as plan_mod

        plan_mod._fp16_guard = lambda _spec, _dtype, _setting: (True, "forced on by bench/real_weights.py (bf16)")
    from core.runs import create_run_dir
    from core.train import Engine

    tests = [json.loads(x) for x in Path(spec["tests"]).read_text().splitlines()]
    cfg = _cfg(spec["model_dir"], spec["data"], spec["runs"], spec["steps"], spec["dtype"], spec["packing"],
               spec["graphs"], spec.get("seq", 128), spec.get("micro_batch", 8), spec.get("cpu", False),
               spec.get("seed", 42), spec.get("responses_only", True))
    marks: list = []
    cuda = torch.cuda.is_available()
    holder: dict = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.monotonic())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:  # for the parent, should the deadline cut this run short
                print(f"@@L {logs['loss']}", flush=True)

        def on_train_end(self, args, state, control, **kw):
            if cuda:
                holder["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 4)
                holder["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 4)

    run_dir = create_run_dir(cfg)
    eng = Engine(run_dir, callbacks=[Probe()], install_signal_handlers=False)
    rc = eng.run()
    ev = read_events(run_dir)
    steps = [e for e in ev if e["event"] == "step_logged"]
    started = next((e for e in ev if e["event"] == "run_started"), {})
    res = {"variant": spec["variant"], "rc": rc, "steps": len(steps), "losses": [e["loss"] for e in steps],
           "grad_norms": [e.get("grad_norm") for e in steps],
           "peak_alloc_gib": holder.get("peak_alloc_gib"), "peak_reserved_gib": holder.get("peak_reserved_gib"),
           "fp16_guard": (started.get("model") or {}).get("fp16_guard"),
           "savers": started.get("savers"), "cuda_graphs": steps[-1].get("cuda_graphs") if steps else None,
           # what core/kernels.py installed ("off: <why>" when the plan kept transformers' path)
           "kernels": (started.get("savers") or {}).get("kernels"),
           "seed": spec.get("seed", 42), "skipped_steps": _skipped([e.get("grad_norm") for e in steps]),
           # how the fused node summed LoRA into the base output (core.savers._mm_f32: on CUDA the GEMM's
           # fp32 output, unless this torch lacks it and the fp32 upcast stood in)
           "lora_sum": ("16-bit (old)" if not savers.LORA_SUM_FP32 else
                        "fp32: mm out_dtype" if (cuda and savers._MM_OUT_DTYPE) else "fp32: upcast")}
    if len(marks) > 5 and steps:
        k = min(5, len(steps) - 1)  # after the warm-up (and graph capture) steps
        res["tokens_per_s"] = round((steps[-1]["tokens_seen"] - steps[k - 1]["tokens_seen"]) / (marks[-1] - marks[k - 1]), 1)
    if rc != 0:
        res["error"] = (ev[-1].get("error") if ev else "no events")[:1500]
    elif spec.get("score", True):
        eng.trainer = eng.model = None
        import gc

        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        res.update(score_adapter(run_dir, cfg, tests, before=spec.get("score_before", True)))
    return res


def _skipped(grad_norms: list) -> int:
    """Steps the fp16 loss scaler skipped: a logged gradient norm that is inf/NaN."""
    import math

    return sum(1 for g in grad_norms if isinstance(g, (int, float)) and not math.isfinite(g))


def score_adapter(run_dir: Path, cfg, tests: list[dict], before: bool = True) -> dict:
    """Before/after scores the way `snugtune chat` loads a run: a fresh base (NF4, guarded in fp16)
    with the saved adapter on top; the training-time patches are not in the way of generate()."""
    import torch
    from peft import PeftModel

    from core import fp16guard
    from core.model import (load_base_model, load_tokenizer, pick_compute_dtype, resolve_model_source,
                            select_device)

    device = select_device(cfg)
    compute = pick_compute_dtype(cfg.model.compute_dtype, device)
    source = resolve_model_source(cfg.model.name_or_path)
    base = load_base_model(source, cfg, device, compute=compute)
    if compute == "fp16" and fp16guard.needs_fp16_guard(base.config, cfg.model.fp16_guard)[0]:
        fp16guard.install(base, torch.float16)
    tok = load_tokenizer(str(run_dir / "adapter"), cfg)
    m = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    after = score(m, tok, cfg.data, tests)
    if not before:  # the base model's score is the same for every variant: one of them measures it
        return {"after": after}
    with m.disable_adapter():
        before = score(m, tok, cfg.data, tests)
    return {"before": before, "after": after}


def run_plain(spec: dict) -> dict:
    """The plain recipe on the same rows (core.data tokenizes; everything else is stock)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainerCallback,
                              TrainingArguments, set_seed)

    from core.data import build_datasets

    cpu = spec.get("cpu", False)
    dtype = torch.float16 if spec["dtype"] == "fp16" else torch.bfloat16
    if cpu:
        dtype = torch.float32
    tests = [json.loads(x) for x in Path(spec["tests"]).read_text().splitlines()]
    cfg = _cfg(spec["model_dir"], spec["data"], spec["runs"], spec["steps"], spec["dtype"], False, False,
               cpu=cpu)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows, _, _ = build_datasets(cfg.data, tok)
    set_seed(42)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    m = AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=q, dtype=dtype,
                                             device_map={"": "cpu" if cpu else 0})
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]))
    before = None
    if spec.get("score", True):
        with m.disable_adapter():
            before = score(m, tok, cfg.data, tests)

    def collate(batch):
        n = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), n), tok.pad_token_id)
        lab = torch.full((len(batch), n), -100)
        att = torch.zeros((len(batch), n), dtype=torch.long)
        for i, r in enumerate(batch):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            lab[i, :k] = torch.tensor(r["labels"])
            att[i, :k] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": att}

    logs_: list = []
    marks: list = []

    class Rec(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logs_.append((logs["loss"], logs.get("grad_norm")))
                print(f"@@L {logs['loss']}", flush=True)

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.monotonic())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                                 max_steps=spec["steps"], learning_rate=2e-4, lr_scheduler_type="cosine",
                                 warmup_steps=max(1, int(0.03 * spec["steps"] + 0.999)), logging_steps=1,
                                 optim="adamw_torch" if cpu else "paged_adamw_8bit", bf16=dtype == torch.bfloat16,
                                 fp16=dtype == torch.float16, use_cpu=cpu, save_strategy="no", report_to="none",
                                 disable_tqdm=True, logging_nan_inf_filter=False, remove_unused_columns=False,
                                 seed=42, data_seed=42, max_grad_norm=1.0)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        tr = Trainer(model=m, args=args, train_dataset=rows, data_collator=collate, callbacks=[Rec()])
        err = None
        try:
            tr.train()
        except Exception as exc:  # noqa: BLE001 - a failed recipe is a result
            err = f"{type(exc).__name__}: {exc}"[:800]
    res = {"variant": spec["variant"], "rc": 0 if err is None else 1, "steps": len(logs_),
           "losses": [x[0] for x in logs_], "grad_norms": [x[1] for x in logs_], "before": before, "error": err,
           "skipped_steps": _skipped([x[1] for x in logs_])}
    if torch.cuda.is_available():
        res["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 4)
        res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 4)
    if len(marks) > 5:
        toks = sum(len(r["input_ids"]) for r in rows[:8]) / 8 * 8  # rows are near-equal length
        res["tokens_per_s"] = round(toks * (len(marks) - 5) / (marks[-1] - marks[4]), 1)
    if err is None and spec.get("score", True):
        res["after"] = score(m, tok, cfg.data, tests)
    return res


def _kept_blocks(r: dict) -> int:
    """Un-checkpointed blocks a measured run had (the plan fills spare memory with them; on the
    H200 that is all 18 of Gemma 3 270M): the estimate is priced for the same count."""
    return int((r.get("savers") or {}).get("uncheckpointed_blocks") or 0)


def _kernels_of(r: dict):
    """Whether a measured run had core/kernels.py installed (None: the run predates the record)."""
    k = r.get("kernels") or (r.get("savers") or {}).get("kernels")
    if k is None:  # a run recorded before core/kernels.py existed (runs 1-4) had none
        return False if r.get("savers") else None
    return not str(k).startswith("off")


def estimate_for(model_dir: str, seq: int, micro_batch: int, total_gib: float = 139.81, keep_layers: int = 0,
                 responses_only: bool = False, kernels=None, dtype: str = "bf16") -> dict:
    """core.estimate's peak for one estimator probe on the H200, with `keep_layers` blocks un-checkpointed.

    `kernels` (True/False) prices the plan with core/kernels.py on/off as the measured run had it
    (the plan decides it from this machine's Triton and CUDA otherwise, which on a CPU-only
    machine re-scoring a GPU run is "off")."""
    from dataclasses import replace

    from core import plan as plan_mod
    from core.catalog import resolve_model
    from core.estimate import estimate
    from core.gpu import resolve_gpu

    cfg = _cfg(model_dir, "(none)", "/tmp", 3, dtype, True, False, seq, micro_batch, responses_only=responses_only)
    gpu = replace(resolve_gpu("h200"), total_gib=total_gib, budget_gib=total_gib)
    orig = plan_mod._kernels
    if kernels is not None:
        plan_mod._kernels = lambda *_a, **_k: (bool(kernels), "as the measured run had it (bench/real_weights.py)")
    try:
        est = estimate(resolve_model(model_dir), cfg, gpu, "snugtune", keep_layers=keep_layers)
    finally:
        plan_mod._kernels = orig
    return {"reserved_gib": round(est.reserved_gib, 4), "allocated_gib": round(est.allocated_gib, 4),
            "components": est.components, "peak_phase": est.peak_phase, "keep_layers": keep_layers,
            "kernels": kernels, "dtype": dtype}


def rescore(path: Path, model_dir: str) -> dict:
    """Today's estimator against stored measurements (no GPU): model_dir holds the model's config.json."""
    res = json.loads(Path(path).read_text())
    for r in res.get("estimator", []):
        r["estimate"] = estimate_for(model_dir, r["seq"], r["micro_batch"], keep_layers=_kept_blocks(r),
                                     kernels=_kernels_of(r), dtype=r.get("dtype", "bf16"))
    return res


def run_estimate_probe(spec: dict) -> dict:
    """3 steps at one (length, micro-batch): measured peaks beside core.estimate's for the same plan."""
    r = run_snugtune({**spec, "score": False})
    import torch

    # (the CPU smoke has no card: the H200's size)
    total = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 139.81
    r["estimate"] = estimate_for(spec["model_dir"], spec["seq"], spec["micro_batch"], total, _kept_blocks(r),
                                 spec.get("responses_only", True), kernels=_kernels_of(r), dtype=spec["dtype"])
    r["seq"], r["micro_batch"], r["dtype"] = spec["seq"], spec["micro_batch"], spec["dtype"]
    return r


# ---- the parent ---------------------------------------------------------------------------------------------

def child(spec: dict, log, argv: list | None = None) -> dict:
    # a few threads each: up to a dozen of these share the machine's cores
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if spec.get("kernels") is False:  # "-nokern": transformers' path instead of core/kernels.py (the plan's switch)
        env["SNUGTUNE_KERNELS"] = "off"
    t0 = time.time()
    try:
        p = subprocess.run(argv or [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=min(spec.get("timeout", 900), 86400))
    except subprocess.TimeoutExpired as exc:  # past the call's deadline: a result that says so
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        losses = [float(ln[4:]) for ln in out.splitlines() if ln.startswith("@@L ")]
        r = {"variant": spec["variant"], "rc": "timeout", "error": f"killed after {exc.timeout:.0f} s (--deadline-s)",
             "wall_s": round(time.time() - t0, 1), "steps": len(losses), "losses": losses}
        if spec["kind"] == "estimate":
            r.update(seq=spec["seq"], micro_batch=spec["micro_batch"])
        print(json.dumps(r), file=log, flush=True)
        print(f"-- {spec['variant']} timed out {r['wall_s']}s", flush=True)
        return r
    lines = [ln[3:] for ln in p.stdout.splitlines() if ln.startswith("@@ ")]
    r = json.loads(lines[-1]) if lines else {"variant": spec["variant"], "rc": p.returncode, "error": p.stderr[-2000:]}
    r["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "grad_norms", "savers")})[:600], file=log, flush=True)
    print(f"-- {spec['variant']} rc={r.get('rc')} {r['wall_s']}s", flush=True)
    if r.get("rc") and p.stderr:
        print(p.stderr[-1500:], file=log, flush=True)
    return r


WINDOW = 20


def curve_compare(a: list, b: list, window: int = WINDOW) -> dict:
    """How far loss curve a is from curve b, the reference.

    The curves are cut into windows of `window` steps and each window's mean loss is taken (single
    steps are noisy: one batch of dates is harder than the next). The metric, `curve_rel`, is the
    summed absolute difference of the window means over the summed reference window means:
    sum_w |mean_a(w) - mean_b(w)| / sum_w mean_b(w). Per-window relative differences
    (`windows`) are listed too, but they are not the metric: on this task the loss falls under
    0.01 after ~80 steps, where 0.0002 against 0.0001 reads as 100%; the summed form weighs each
    window by the loss it has. `mean_loss_rel` compares the two means over all steps."""
    n = min(len(a), len(b))
    rel, da, db = [], 0.0, 0.0
    for s in range(0, n - n % window or n, window):
        ma, mb = sum(a[s:s + window]) / len(a[s:s + window]), sum(b[s:s + window]) / len(b[s:s + window])
        rel.append(round(abs(ma - mb) / max(mb, 1e-9), 4))
        da += abs(ma - mb)
        db += mb
    whole = abs(sum(a[:n]) - sum(b[:n])) / max(sum(b[:n]), 1e-9) if n else None
    return {"curve_rel": round(da / db, 4) if db else None, "windows": rel,
            "mean_loss_rel": round(whole, 4) if whole is not None else None}


# The pairs compared, and why. The noise floor is what two bf16 runs differ by when nothing but
# chance differs: another seed (LoRA's random init and the order of the rows), or the same seed
# with CUDA graphs on against off (the same math, other kernels and summation order).
PAIRS = [
    ("sn-fp16-pack", "sn-bf16-pack-nographs", "fp16 (guard) vs bf16, packed, same seed"),
    ("sn-fp16-pack-seed2", "sn-bf16-pack-nographs-seed2", "fp16 (guard) vs bf16, packed, seed 2"),
    ("sn-fp16-nopack", "sn-bf16-nopack-nographs", "fp16 (guard) vs bf16, unpacked, same seed"),
    ("sn-bf16-pack-nographs-seed2", "sn-bf16-pack-nographs", "noise floor: bf16 vs bf16, another seed"),
    ("sn-fp16-pack-seed2", "sn-fp16-pack", "noise floor: fp16 vs fp16, another seed"),
    ("sn-bf16-pack", "sn-bf16-pack-nographs", "noise floor: bf16 graphs vs no graphs, same seed"),
    ("sn-bf16-nopack", "sn-bf16-nopack-nographs", "unpacked: graphs vs no graphs, same seed"),
    ("sn-fp16-pack", "sn-bf16-pack-nographs-oldsum", "before (run 3's code): fp16 (guard) vs bf16 with the old LoRA sum"),
    ("sn-bf16-pack-nographs", "sn-bf16-pack-nographs-oldsum", "bf16: the LoRA sum in fp32 vs the old sum"),
    ("sn-fp16-pack", "sn-fp16-pack-oldsum", "fp16 (guard): the LoRA sum in fp32 vs the old sum"),
    ("sn-bf16-pack-nographs", "sn-bf16-pack-nographs-nokern", "bf16: fused kernels on vs off (SNUGTUNE_KERNELS=off), same seed"),
    ("sn-fp16-pack", "sn-fp16-pack-nokern", "fp16 (guard): fused kernels on vs off, same seed"),
    ("sn-fp16-pack-nokern", "sn-bf16-pack-nographs-nokern", "kernels off: fp16 (guard) vs bf16, same seed"),
    ("plain-fp16", "plain-bf16", "plain recipe: fp16 vs bf16"),
    ("sn-bf16-pack-nographs", "plain-bf16", "snugtune bf16 packed vs the plain recipe (unpacked rows)"),
    ("sn-fp16-pack", "plain-bf16", "snugtune fp16 (guard) packed vs the plain recipe's bf16 (unpacked rows)"),
    ("sn-bf16-nopack-nographs", "plain-bf16", "snugtune unpacked vs the plain recipe (same unpacked rows)"),
]


def markdown(res: dict) -> str:
    rows = ["| variant | rc | steps | all losses finite | skipped (fp16 scaler) | first / steps 1-20 / last-20 mean loss | "
            "held-out before | after | peak reserved GiB | tokens/s (concurrent) | kernels |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    import math

    for r in res["variants"]:
        ls = r.get("losses") or []
        fin = all(isinstance(x, (int, float)) and math.isfinite(x) for x in ls) if ls else False
        last = sum(ls[-20:]) / len(ls[-20:]) if ls else float("nan")
        w1 = sum(ls[:20]) / len(ls[:20]) if ls else float("nan")
        b, a = r.get("before") or {}, r.get("after") or {}
        rows.append(f"| {r['variant']} | {r.get('rc')} | {r.get('steps')} | {fin} | {r.get('skipped_steps', '-')} | "
                    f"{(ls[0] if ls else float('nan')):.3f} / {w1:.3f} / {last:.3f} | {b.get('exact', '-')}/{b.get('n', '-')} | "
                    f"{a.get('exact', '-')}/{a.get('n', '-')} | {r.get('peak_reserved_gib')} | {r.get('tokens_per_s')} | "
                    f"{str(r.get('kernels') or '-')[:48]} |")
    out = ["# Real weights: Gemma 3 270M learns a date-writing task", "", f"command: `{res['command']}`", "",
           f"machine: {res.get('device')}; versions: {res.get('versions')}; GGUF conversion {res.get('convert_s')} s", "",
           *rows, ""]
    if res.get("rescored"):
        out[4:4] = [f"estimator columns re-scored: `{res['rescored']}`", ""]
    if res.get("curves"):
        out += [f"## Loss curves compared (windows of {WINDOW} steps; curve_rel = sum |mean a - mean b| / sum mean b)", "",
                "| a | b | what | curve_rel | mean loss rel | held-out a / b | per-window rel |", "|---|---|---|---|---|---|---|"]
        for c in res["curves"]:
            out.append(f"| {c['a']} | {c['b']} | {c['what']} | {100 * c['curve_rel']:.1f}% | {100 * c['mean_loss_rel']:.1f}% | "
                       f"{c['held_out'][0]} / {c['held_out'][1]} | {' '.join(f'{x:.3f}' for x in c['windows'])} |")
        out.append("")
    if res.get("speed"):
        out += ["## Speed alone (one process at a time; tokens/s after the first 5 steps)", "",
                "| variant | fp16 guard | steps | tokens/s | peak allocated / reserved GiB |", "|---|---|---|---|---|"]
        out += [f"| {r['variant']} | {r.get('fp16_guard')} | {r.get('steps')} | {r.get('tokens_per_s')} | "
                f"{r.get('peak_alloc_gib')} / {r.get('peak_reserved_gib')} |" for r in res["speed"]]
        out.append("")
    if res.get("estimator"):
        out += ["## Estimator on Gemma 3 270M (3 steps, every token labelled; the plan's kept blocks priced)", "",
                "| tokens x micro-batch (dtype) | measured reserved | estimated | error | measured allocated | estimated | error |",
                "|---|---|---|---|---|---|---|"]
        for r in res["estimator"]:
            e = r.get("estimate") or {}
            mr, ma = r.get("peak_reserved_gib"), r.get("peak_alloc_gib")
            er, ea = e.get("reserved_gib"), e.get("allocated_gib")
            pct = (lambda m, x: f"{100 * (x - m) / m:+.1f}%" if m and x else "-")
            dt_ = "" if r.get("dtype", "bf16") == "bf16" else " (fp16 + guard)"
            out.append(f"| {r.get('seq')} x {r.get('micro_batch')}{dt_} | {mr} | {er} | {pct(mr, er)} | {ma} | {ea} | "
                       f"{pct(ma, ea)} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="the GGUF file (Gemma 3 270M)")
    ap.add_argument("--smoke", action="store_true", help="CPU: the demo model as a tiny GGUF, 2 steps a variant")
    ap.add_argument("--steps", type=int, default=200)
    # run 5's set (bench/results/real_weights_run5.md): 11 variants + 4 estimator probes fill the H200
    # machine's 16 cores in ~4 minutes with the GGUF conversion
    ap.add_argument("--variants", default="sn-bf16-pack-nographs,sn-fp16-pack,sn-bf16-pack,sn-bf16-nopack-nographs,"
                    "sn-fp16-nopack,plain-bf16,plain-fp16,sn-bf16-pack-nographs-seed2,sn-fp16-pack-seed2,"
                    "sn-bf16-pack-nographs-nokern,sn-fp16-pack-nokern")
    ap.add_argument("--speed", action="store_true", help="bf16 and fp16 packed runs alone, after the others")
    ap.add_argument("--speed-steps", type=int, default=25)
    ap.add_argument("--speed-variants", default="sn-bf16-pack-nographs,sn-fp16-pack",
                    help="the runs alone (a bf16 '-guard' variant: the fp16 guard's patches in bf16, its cost alone)")
    ap.add_argument("--score-before-all", action="store_true", help="every variant scores the base model too")
    ap.add_argument("--speed-deadline-s", type=float, default=330, help="skip --speed when the rest took longer")
    ap.add_argument("--speed-first", action="store_true",
                    help="the --speed runs alone before the concurrent ones (run 5's, after them, were cut by its "
                         "deadline); the concurrent ones' deadline then counts what the speed runs took")
    ap.add_argument("--estimator", action="store_true", help="measure peaks at 2 lengths x 2 micro-batches")
    ap.add_argument("--estimator-fp16", default="",
                    help="SEQxMB,... also measured in fp16 + the guard (e.g. 2048x4,512x1: the guard's pricing)")
    ap.add_argument("--jobs", type=int, default=14, help="variants run at once")
    ap.add_argument("--deadline-s", type=float, default=1e9,
                    help="kill every child this many seconds after the start (results so far are written)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--rescore", metavar="JSON", help="today's estimator against a stored run (with --model-dir)")
    ap.add_argument("--model-dir", help="with --rescore: a directory with the model's config.json")
    a = ap.parse_args(argv)
    if a.rescore:
        res = rescore(Path(a.rescore), a.model_dir)
        res["rescored"] = "python bench/real_weights.py " + " ".join(sys.argv[1:])
        Path(a.rescore).write_text(json.dumps(res, indent=1))
        Path(a.rescore).with_suffix(".md").write_text(markdown(res))
        print(markdown(res).split("## Estimator")[1])
        return 0
    if a.one:
        spec = json.loads(a.one)
        fn = {"snugtune": run_snugtune, "plain": run_plain, "estimate": run_estimate_probe}[spec["kind"]]
        print("@@ " + json.dumps(fn(spec)), flush=True)
        return 0

    from concurrent.futures import ThreadPoolExecutor, as_completed

    t_start = time.time()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="real-weights-"))
    os.environ.setdefault("SNUGTUNE_CACHE", str(work / "cache"))
    from core import gguf_source

    if a.smoke:
        from core.demo import ensure_tiny_llama

        gguf = gguf_source.write_llama_gguf(ensure_tiny_llama(), work / "tiny.gguf")
        steps, n_train, n_test = 2, 64, 8
    else:
        if not a.gguf:
            ap.error("--gguf FILE (or --smoke)")
        gguf, steps, n_train, n_test = Path(a.gguf), a.steps, 2400, 128
    t0 = time.time()
    model_dir = str(gguf_source.ensure_converted(gguf))
    convert_s = round(time.time() - t0, 1)
    train, tests = date_task(n_train, n_test)
    data = work / "dates.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    tests_f = work / "tests.jsonl"
    tests_f.write_text("".join(json.dumps(r) + "\n" for r in tests))
    cpu = a.smoke
    base = {"model_dir": model_dir, "data": str(data), "tests": str(tests_f), "runs": str(work / "runs"),
            "steps": steps, "cpu": cpu}

    def spec_of(v: str, n_steps: int = steps) -> dict:
        parts = v.split("-")
        kind = "plain" if parts[0] == "plain" else "snugtune"
        return {**base, "variant": v, "kind": kind, "dtype": parts[1], "packing": "pack" in parts[2:],
                "graphs": "nographs" not in parts, "steps": n_steps, "seed": 43 if "seed2" in parts else 42,
                "lora_sum_fp32": "oldsum" not in parts, "force_guard": "guard" in parts and parts[1] == "bf16",
                "kernels": "nokern" not in parts, "score_before": v in score_before}

    log = open(out / "real_weights.log", "a")
    variants = [v for v in a.variants.split(",") if v]
    # the base model's held-out score (the same for all): measured by the first variant of each
    # kind unless --score-before-all
    score_before = set(variants) if a.score_before_all else {
        next((v for v in variants if v.startswith(k)), None) for k in ("sn-", "plain-")}
    if cpu:  # no fp16/bf16 on the CPU path: one of each kind is enough to exercise the code
        variants = ["sn-bf16-pack", "sn-bf16-nopack", "plain-bf16", "sn-bf16-pack-nographs-seed2",
                    "sn-bf16-pack-nographs-oldsum", "sn-bf16-pack-nographs-nokern"]
        score_before = {"sn-bf16-pack", "plain-bf16"}
    jobs = [spec_of(v) for v in variants]
    if a.estimator:
        for seq in ((512, 2048) if not cpu else (128,)):  # the CPU smoke: the code path, not the numbers
            for mb in ((1, 4) if not cpu else (1,)):
                # every token labelled (train_on_responses_only off): the estimator counts the loss's
                # working set for a full chunk of labelled rows, which a prompt-masked date row
                # (~1/3 of its tokens labelled) does not fill at 512 tokens (run 2's +20% there)
                jobs.append({**base, "variant": f"est-{seq}x{mb}", "kind": "estimate", "dtype": "bf16", "packing": True,
                             "graphs": False, "steps": 3, "seq": seq, "micro_batch": mb, "responses_only": False})
        for sm in ([x for x in a.estimator_fp16.split(",") if x] if not cpu else []):
            seq, mb = (int(x) for x in sm.split("x"))
            jobs.append({**base, "variant": f"est-fp16-{seq}x{mb}", "kind": "estimate", "dtype": "fp16", "packing": True,
                         "graphs": False, "steps": 3, "seq": seq, "micro_batch": mb, "responses_only": False})
    # --deadline-s: every child is killed at the deadline (counted from this script's start) and
    # the results so far are written after each child ends, so a call cut short still reports
    res = {"command": "python bench/real_weights.py " + " ".join(sys.argv[1:]), "gguf": str(gguf),
           "convert_s": convert_s, "steps": steps, "n_train": n_train, "n_test": n_test, "variants": [], "estimator": []}
    try:
        import torch

        res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        import transformers

        res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    except Exception:  # noqa: BLE001
        pass

    def write(results: list) -> None:
        res["variants"] = [r for r in results if r and not str(r.get("variant", "")).startswith("est-")]
        res["estimator"] = [r for r in results if r and str(r.get("variant", "")).startswith("est-")]
        by = {r["variant"]: r for r in res["variants"]}
        res["curves"] = []
        for x, y, what in PAIRS:
            if x in by and y in by and by[x].get("losses") and by[y].get("losses"):
                c = {"a": x, "b": y, "what": what, **curve_compare(by[x]["losses"], by[y]["losses"]),
                     "held_out": [(by[x].get("after") or {}).get("exact"), (by[y].get("after") or {}).get("exact")]}
                res["curves"].append(c)
        res["elapsed_s"] = round(time.time() - t_start, 1)
        (out / "real_weights.json").write_text(json.dumps(res, indent=1))
        (out / "real_weights.md").write_text(markdown(res))

    results: list = [None] * len(jobs)

    def speed_alone() -> None:
        res["speed"] = []
        for v in a.speed_variants.split(","):
            # each run alone; the later ones are left out when the call's time is short
            left = a.deadline_s - (time.time() - t_start)
            if v and time.time() - t0 < a.speed_deadline_s and left > 25:
                res["speed"].append(child({**spec_of(v, a.speed_steps), "score": False, "variant": v + "-alone",
                                           "timeout": left}, log))
            elif v:
                print(f"-- {v}-alone skipped: {time.time() - t0:.0f} s past the start (--speed-deadline-s)", flush=True)
            write(results)

    if a.speed and a.speed_first and not cpu:
        speed_alone()
    for j in jobs:
        j["timeout"] = max(20.0, a.deadline_s - (time.time() - t_start))
    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        futs = {ex.submit(child, s, log): i for i, s in enumerate(jobs)}
        for f in as_completed(futs):
            results[futs[f]] = f.result()
            write(results)
    write(results)
    if a.speed and not a.speed_first and not cpu:
        speed_alone()
    write(results)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
