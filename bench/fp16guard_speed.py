"""What fp16 + the guard costs against bf16 on one GPU: tokens/s alone, GPU kernel time, peak memory.

Through snugtune's engine (core.train.Engine, as `snugtune train` runs it), random-init models of
real shapes (speed and memory do not depend on the weight values), plain-text rows packed to 128
tokens, micro-batch 8 (1,024 tokens a step), LoRA r=16 on all seven projections, no CUDA graphs
(fp16's loss scaler keeps fp16 out of them), the card's whole memory (so the plan keeps every block
un-checkpointed, as real_weights run 5 did on the H200). Variants, each its own process, one at a
time, nothing else on the GPU:

  bf16                  the kernels on (the default on CUDA)
  fp16-guard            fp16 + the fp16 guard, its norms through core/kernels.py's fused RMSNorm (session 7)
  fp16-guard-ownnorms   fp16 + the guard with its own PyTorch norms (core.fp16guard.FUSED_NORMS off: the
                        code before session 7; the GLU and rotary kernels on as before)

Per variant: tokens/s over steps W+1..W+N (the first W steps warm up: Triton compiles, the allocator
grows), then P steps under torch.profiler: the summed CUDA kernel time per 1,000 tokens (CUPTI; the
GPU's own work, beside the host-bound wall clock), and the peak allocated / reserved memory of the run.

    python bench/fp16guard_speed.py --out $OUT --deadline-s 190      # GPU: Gemma-3-270M, then Gemma-2-2B
    python bench/fp16guard_speed.py --smoke --out /tmp/fgs            # CPU: a tiny Gemma 3, fp32 (the plumbing)

Writes fp16guard_speed.json (everything, with the command) and fp16guard_speed.md to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

GIB = 2**30

# The real configs' numbers (google/gemma-3-270m's config.json as converted from its GGUF, /work/gemma/hf;
# google/gemma-2-2b's), written out so the bench needs neither file.
GEMMA3_270M = dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                   max_position_embeddings=32768, query_pre_attn_scalar=256, sliding_window=512,
                   rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                   layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)
GEMMA2_2B = dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                 max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
                 hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
TINY = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=3072,
            max_position_embeddings=256, query_pre_attn_scalar=32, sliding_window=64,
            layer_types=["sliding_attention", "full_attention"])
SHAPES = {"gemma-3-270m": GEMMA3_270M, "gemma-2-2b": GEMMA2_2B, "tiny": TINY}
# variant -> (compute dtype, the guard's norms fused)
VARIANTS = {"bf16": ("bf16", True), "fp16-guard": ("fp16", True), "fp16-guard-ownnorms": ("fp16", False)}
WORDS = 3000  # the tokenizer's words: every word one token


def build(name: str, root: Path, dev: str) -> Path:
    """A random-init model of the shape, saved in bf16, with a word-level tokenizer of WORDS words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    path = root / name
    if (path / "config.json").exists():
        return path
    kw = dict(SHAPES[name])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    with torch.device(dev):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.save_pretrained(path)
    del m
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


# ~32 tokens a text (a word a token, + bos / eos): four fill a packed 128-token row
def text_rows(n: int, words: int = 30, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(f"w{rng.randrange(WORDS)}" for _ in range(words))} for _ in range(n)]


# ---- one variant (a child process) ----------------------------------------------------------------

def run_one(spec: dict) -> dict:
    import math

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from core import fp16guard
    from core.config import RunConfig
    from core.events import read_events
    from core.runs import create_run_dir
    from core.train import Engine
    from gpu_time import summarize

    fp16guard.FUSED_NORMS = spec["fused"]
    cuda = torch.cuda.is_available()
    W, N, P = spec["warmup"], spec["steps"], spec["prof_steps"]
    cfg = RunConfig.from_dict({
        "gpu": {"profile": "auto" if cuda else "cpu"},
        "model": {"name_or_path": spec["model_dir"], "compute_dtype": spec["dtype"] if cuda else "fp32",
                  "load_in_4bit": True},
        "data": {"path": spec["data"], "format": "text", "max_seq_len": 128, "packing": True, "eval_fraction": 0.0},
        "lora": {"r": 16, "alpha": 32},
        "train": {"micro_batch": 8, "grad_accum": 1, "max_steps": W + N + P, "learning_rate": 2e-4,
                  "lr_scheduler": "cosine", "warmup_ratio": 0.03, "save_steps": 100_000, "logging_steps": 1,
                  "cuda_graphs": "off", "seed": 42},
        "output": {"runs_dir": spec["runs"]},
    })
    marks: list = []
    holder: dict = {}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == W + N and "prof" not in holder:  # the last P steps, profiled
                if cuda:
                    torch.cuda.synchronize()
                holder["prof"] = profile(activities=acts)
                holder["prof"].__enter__()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.monotonic())
            if state.global_step == W + N + P and "prof" in holder and "done" not in holder:
                holder["prof"].__exit__(None, None, None)
                holder["done"] = True

        def on_train_end(self, args, state, control, **kw):
            if cuda:
                holder["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 4)
                holder["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 4)

    run_dir = create_run_dir(cfg)
    t0 = time.time()
    rc = Engine(run_dir, callbacks=[Probe()], install_signal_handlers=False).run()
    ev = read_events(run_dir)
    steps = [e for e in ev if e["event"] == "step_logged"]
    started = next((e for e in ev if e["event"] == "run_started"), {})
    savers = started.get("savers") or {}
    losses = [e["loss"] for e in steps]
    res = {"variant": spec["variant"], "shape": spec["shape"], "rc": rc, "steps": len(steps),
           "wall_s": round(time.time() - t0, 1), "compute_dtype": (started.get("model") or {}).get("compute_dtype"),
           "fp16_guard": savers.get("fp16_guard"), "kernels": savers.get("kernels"),
           "uncheckpointed_blocks": savers.get("uncheckpointed_blocks"),
           "losses_finite": bool(losses) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses),
           "skipped_steps": sum(1 for e in steps if not (isinstance(e.get("grad_norm"), (int, float))
                                                           and math.isfinite(e["grad_norm"]))),
           "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
           "peak_alloc_gib": holder.get("peak_alloc_gib"), "peak_reserved_gib": holder.get("peak_reserved_gib")}
    from core import kernels as K  # (imported by the engine on CUDA already)

    res["kernels_broken"] = K.BROKEN  # a kernel that failed: from then on PyTorch's path, said once
    if rc != 0:
        res["error"] = (ev[-1].get("error") if ev else "no events")[:1500]
        return res
    tok = [e["tokens_seen"] for e in steps]
    if len(marks) >= W + N and len(tok) >= W + N:
        # marks[i] is step i+1's end: steps W+1 .. W+N
        res["tokens_per_step"] = round((tok[W + N - 1] - tok[W - 1]) / N, 1)
        res["tokens_per_s"] = round((tok[W + N - 1] - tok[W - 1]) / (marks[W + N - 1] - marks[W - 1]), 1)
        res["wall_ms_per_1k_tokens"] = round(1e6 / res["tokens_per_s"], 3)
    if holder.get("done") and len(tok) >= W + N + P:
        ptok = tok[W + N + P - 1] - tok[W + N - 1]
        s = summarize(holder["prof"], "cuda" if cuda else "cpu", ptok, P)
        res.update({"gpu_ms_per_1k_tokens": s["gpu_ms_per_1k_tokens"], "kernels_per_step": s["kernels_per_step"],
                    "gpu_by_kind_ms_per_1k": s["by_kind_ms_per_1k"], "gpu_top_kernels": s["top_kernels"][:8],
                    "profiled_tokens": ptok})
    return res


# ---- the parent ---------------------------------------------------------------------------------------

def _child(argv: list, timeout: float, env: dict) -> tuple[dict | None, str]:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=min(timeout, 86400))
    except subprocess.TimeoutExpired:
        return None, f"killed after {timeout:.0f} s (--deadline-s)"
    lines = [ln[3:] for ln in p.stdout.splitlines() if ln.startswith("@@ ")]
    if lines:
        return json.loads(lines[-1]), ""
    return None, f"rc {p.returncode}: {p.stderr[-1500:]}"


def markdown(res: dict) -> str:
    out = ["# fp16 + guard against bf16, each run alone (bench/fp16guard_speed.py)", "", f"command: `{res['command']}`", "",
           f"machine: {res.get('device')}; versions: {res.get('versions')}; {res.get('conditions')}", "",
           "| shape | variant | tokens/s alone | wall ms / 1k tokens | GPU kernel ms / 1k tokens | kernels a step | "
           "peak allocated / reserved GiB | kept blocks | losses finite | skipped | the guard's norms |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        g = str(r.get("fp16_guard") or "-")
        norms = "fused" if "fused" in g else ("own (PyTorch)" if g != "-" else "-")
        out.append(f"| {r.get('shape')} | {r.get('variant')} | {r.get('tokens_per_s', '-')} | "
                   f"{r.get('wall_ms_per_1k_tokens', '-')} | {r.get('gpu_ms_per_1k_tokens', '-')} | "
                   f"{r.get('kernels_per_step', '-')} | {r.get('peak_alloc_gib')} / {r.get('peak_reserved_gib')} | "
                   f"{r.get('uncheckpointed_blocks', '-')} | {r.get('losses_finite')} | {r.get('skipped_steps')} | "
                   f"{norms} |" + (f" error: {str(r.get('error'))[:200]}" if r.get("error") else ""))
    if res.get("skipped"):
        out += ["", "skipped (the call's deadline): " + ", ".join(res["skipped"])]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU: a tiny Gemma 3 in fp32, 4 steps a variant")
    ap.add_argument("--shapes", default="gemma-3-270m,gemma-2-2b")
    ap.add_argument("--variants", default="bf16,fp16-guard,fp16-guard-ownnorms")
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prof-steps", type=int, default=2)
    ap.add_argument("--deadline-s", type=float, default=1e9, help="no new run past this many seconds from the start")
    ap.add_argument("--min-left-s", type=float, default=35,
                    help="start a run only with this much time left (twice that for Gemma-2-2B)")
    ap.add_argument("--again", default="", help="SHAPE:VARIANT,... run once more at the end, time allowing (noise)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print("@@ " + json.dumps(run_one(json.loads(a.one))), flush=True)
        return 0
    if a.build:
        b = json.loads(a.build)
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        t = time.time()
        p = build(b["shape"], Path(b["root"]), dev)
        print("@@ " + json.dumps({"path": str(p), "build_s": round(time.time() - t, 1)}), flush=True)
        return 0

    t_start = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fp16guard-speed-"))
    data = work / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in text_rows(2000)))
    shapes = ["tiny"] if a.smoke else [s for s in a.shapes.split(",") if s]
    W, N, P = (1, 2, 1) if a.smoke else (a.warmup, a.steps, a.prof_steps)
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", PYTHONUNBUFFERED="1",
               SNUGTUNE_CACHE=str(work / "cache"))
    res = {"command": "python bench/fp16guard_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "conditions": f"random-init weights, packed 128-token rows x micro-batch 8, LoRA r=16 on 7 projections, "
                         f"no CUDA graphs, the whole card; steps: {W} warm-up, {N} timed, {P} profiled",
           "runs": [], "builds": {}, "skipped": []}
    try:
        import importlib.metadata as md

        res["versions"] = {k: md.version(k) for k in ("torch", "transformers", "triton", "bitsandbytes", "peft")}
    except Exception:  # noqa: BLE001
        pass

    def write():
        res["elapsed_s"] = round(time.time() - t_start, 1)
        (out / "fp16guard_speed.json").write_text(json.dumps(res, indent=1))
        (out / "fp16guard_speed.md").write_text(markdown(res))

    todo = [(shape, v) for shape in shapes for v in a.variants.split(",") if v]
    if not a.smoke:
        todo += [tuple(x.split(":", 1)) for x in a.again.split(",") if x and x.split(":")[0] in shapes]

    def built(shape: str) -> dict:
        """The shape's model directory, built (in its own process) the first time a run needs it."""
        if shape not in res["builds"]:
            b, err = _child([sys.executable, __file__, "--build", json.dumps({"shape": shape, "root": str(work)})],
                            max(1.0, a.deadline_s - (time.time() - t_start)), env)
            res["builds"][shape] = b or {"error": err}
            print(f"-- built {shape}: {b or err}", flush=True)
            write()
        return res["builds"][shape]

    for shape, v in todo:
        need = a.min_left_s * (2 if "2b" in shape else 1)
        if a.deadline_s - (time.time() - t_start) < need:
            res["skipped"].append(f"{shape} {v}")
            print(f"-- {shape} {v} skipped: the deadline", flush=True)
            continue
        b = built(shape)
        if "path" not in b:
            continue
        need = a.min_left_s * (2 if "2b" in shape else 1)
        left = a.deadline_s - (time.time() - t_start)
        if left < need:
            res["skipped"].append(f"{shape} {v}")
            print(f"-- {shape} {v} skipped: {left:.0f} s left", flush=True)
            continue
        dtype, fused = VARIANTS[v]
        spec = {"variant": v, "shape": shape, "model_dir": b["path"], "data": str(data), "runs": str(work / "runs"),
                "dtype": dtype, "fused": fused, "warmup": W, "steps": N, "prof_steps": P}
        r, err = _child([sys.executable, __file__, "--one", json.dumps(spec)], left, env)
        r = r or {"variant": v, "shape": shape, "rc": "failed", "error": err}
        res["runs"].append(r)
        print(f"-- {shape} {v}: {r.get('tokens_per_s')} tokens/s, GPU {r.get('gpu_ms_per_1k_tokens')} ms/1k, "
              f"peak {r.get('peak_alloc_gib')} GiB {('ERROR ' + str(r.get('error'))[:300]) if r.get('error') else ''}",
              flush=True)
        write()
    try:
        import torch

        res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        pass
    write()
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
