"""snugtune vs the plain recipe on one GPU, side by side, each trial in its own process.

  python bench/run.py --part all          # (a) max length under 4 GiB, (b) speed, (c) loss
  python bench/run.py --part train        # (b) + (c) only
  python bench/run.py --part maxctx --shapes qwen2.5-3b,gemma-2-2b
  python bench/run.py --part smoke        # CPU: tiny model through every code path (no numbers)

Writes bench.json (every result line), bench.md (tables) and log under $OUT (or --out).
Budget: 4 GiB card = allocator capped at 3.65 GiB (0.35 GiB left for the CUDA context a
consumer card spends outside PyTorch), batch 1, LoRA r=16 on all seven projections.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CAP_GIB = 3.65

# BASELINE.md, measured with shared/reference/{maxctx.py,peer_unsloth}: the plain recipe's and
# Unsloth's longest sequence under the same cap. Cited, not re-measured, unless --plain-check.
PLAIN_MAX = {"qwen2.5-0.5b": 1088, "llama-3.2-1b": 704, "qwen2.5-1.5b": 576, "smollm2-1.7b": 2112,
             "gemma-2-2b": 0, "qwen2.5-3b": 192}
UNSLOTH_MAX = {"qwen2.5-0.5b": 32576, "llama-3.2-1b": 16576, "qwen2.5-1.5b": 16320, "smollm2-1.7b": 16192,
               "gemma-2-2b": 0, "qwen2.5-3b": 7616}
# target, search step, upper end of the search (Qwen2.5-0.5B stops at its 32k position limit)
MAXCTX = {"qwen2.5-0.5b": (32768, 2048, 32768), "llama-3.2-1b": (24576, 4096, 49152),
          "qwen2.5-1.5b": (24576, 4096, 49152), "smollm2-1.7b": (20480, 4096, 49152),
          "gemma-2-2b": (4096, 1024, 16384), "qwen2.5-3b": (10240, 2048, 32768)}


def run_trial(spec: dict, timeout: float, log) -> list[dict]:
    env = dict(os.environ)
    if spec.get("system") != "plain":
        # snugtune's launcher sets this before CUDA starts; the plain recipe runs as written
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env.update(spec.pop("env", {}))
    t0 = time.time()
    res = []
    try:
        p = subprocess.run([sys.executable, os.path.join(HERE, "trial.py"), json.dumps(spec)], env=env,
                           capture_output=True, text=True, timeout=max(5, timeout))
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = "timeout", -9
    for line in out.splitlines():
        if line.startswith("@@ "):
            r = json.loads(line[3:])
            res.append(r)
            print(json.dumps(r), file=log, flush=True)
            print(line[3:][:300], flush=True)
    if rc != 0:
        tail = err[-1500:] if isinstance(err, str) else str(err)
        res.append({"part": "error", "spec": spec, "rc": rc, "stderr_tail": tail})
        print(f"!! {spec.get('part')} {spec.get('system')} {spec.get('shape')} rc={rc}\n{tail}", flush=True)
    print(f"-- {spec.get('part')} {spec.get('system')} {spec.get('shape')} {spec.get('variant', '')}"
          f" {time.time() - t0:.0f}s", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=["all", "train", "maxctx", "smoke"])
    ap.add_argument("--shapes", default="llama-3.2-1b,smollm2-1.7b,qwen2.5-0.5b,qwen2.5-1.5b,gemma-2-2b,qwen2.5-3b")
    ap.add_argument("--up-trials", type=int, default=1, help="lengths tried above the target once it fits")
    ap.add_argument("--deadline-s", type=float, default=520, help="stop starting trials after this many seconds")
    ap.add_argument("--loss-steps", type=int, default=20, help="steps of the per-step loss comparison (c)")
    ap.add_argument("--profile", action="store_true", help="write a per-op profile of two steps for each system")
    ap.add_argument("--plain-check", action="store_true", help="re-verify the plain recipe's limits (slow)")
    ap.add_argument("--variants", default="snugtune,snugtune-compile",
                    help="snugtune variants in the train part: snugtune (auto), snugtune-keep0 "
                    "(every block checkpointed), snugtune-compile, snugtune-graphs (CUDA-graph steps), "
                    "snugtune-graphs-keep0")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    root = tempfile.mkdtemp()
    t_start = time.time()
    left = lambda: args.deadline_s - (time.time() - t_start)  # noqa: E731
    results = []
    log = open(os.path.join(args.out, "bench.jsonl"), "w")
    cmd = "python bench/run.py " + " ".join(sys.argv[1:])

    if args.part == "smoke":
        base = dict(root=root, shape="tiny")
        results += run_trial(dict(base, part="train", system="plain", seq=128, loss_steps=3, steps=2, mixed_n=8,
                                  pack_len=512), 300, log)
        results += run_trial(dict(base, part="train", system="snugtune", seq=128, loss_steps=3, steps=2, mixed_n=8,
                                  pack_len=512, cap_gib=CAP_GIB), 300, log)
        results += run_trial(dict(base, part="maxctx", system="snugtune", target=256, step=128, max_len=512,
                                  cap_gib=CAP_GIB, time_s=60), 300, log)
    if args.part in ("all", "train"):
        shape = "qwen2.5-1.5b"
        results += run_trial(dict(part="train", system="plain", shape=shape, root=root, profile=args.profile,
                                  loss_steps=args.loss_steps),
                             min(240, left()), log)
        for v in [x for x in args.variants.split(",") if x]:
            spec = dict(part="train", system="snugtune", variant=v, shape=shape, root=root, cap_gib=CAP_GIB,
                        loss_steps=args.loss_steps,
                        mixed=(v in ("snugtune", "snugtune-graphs")))
            if v.endswith("keep0"):
                spec["env"] = {"SNUGTUNE_KEEP_LAYERS": "0"}
            if v.startswith("snugtune-graphs"):
                spec["graphs"] = True
            if v == "snugtune-compile":
                spec["compile"] = True
            if args.profile:
                spec["profile"] = True
            if left() > 30:
                results += run_trial(spec, min(240, left()), log)
    if args.part in ("all", "maxctx"):
        for shape in [s for s in args.shapes.split(",") if s]:
            target, step, hi = MAXCTX[shape]
            if left() < 40:
                results.append({"part": "skipped", "shape": shape, "why": "deadline"})
                continue
            per = min(150, left() - 10)
            results += run_trial(dict(part="maxctx", system="snugtune", shape=shape, root=root, cap_gib=CAP_GIB,
                                      target=target, step=step, max_len=hi, time_s=per - 45,
                                      up_trials=args.up_trials), per, log)
            if args.plain_check and left() > 60:
                p = PLAIN_MAX[shape]
                results += run_trial(dict(part="plain_maxctx", system="plain", shape=shape, root=root,
                                          cap_gib=CAP_GIB, lengths=[max(128, p), p + 128]), min(120, left()), log)
    meta = {"command": cmd, "wall_s": round(time.time() - t_start, 1)}
    try:
        import torch
        import transformers
        import peft

        meta.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
        import bitsandbytes

        meta["bitsandbytes"] = bitsandbytes.__version__
    except Exception as e:  # the table still gets written
        meta["env_error"] = repr(e)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    md = render(meta, results)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md)
    print(md)


def _label(r: dict) -> str:
    """A result's row name: its variant (snugtune, snugtune-graphs, ...) or its system (plain)."""
    return r.get("variant") or r["system"]


def render(meta, results) -> str:
    L = [f"Command: `{meta['command']}` — {meta.get('gpu', '?')}, torch {meta.get('torch')}, transformers "
         f"{meta.get('transformers')}, peft {meta.get('peft')}, bitsandbytes {meta.get('bitsandbytes')}; "
         f"allocator capped at {CAP_GIB} GiB for snugtune (4 GiB card), wall {meta['wall_s']} s.", ""]
    mx = {r["shape"]: r for r in results if r.get("part") == "maxctx_result"}
    trials = [r for r in results if r.get("part") == "maxctx"]
    if mx or trials:
        L += ["### (a) Longest sequence that trains under 4 GiB (batch 1, 3 steps)", "",
              "| model shape | plain recipe | Unsloth | snugtune | target | met | snugtune peak alloc / reserved GiB at max | first length that failed |",
              "|---|---|---|---|---|---|---|---|"]
        for shape, (target, _, hi) in MAXCTX.items():
            r = mx.get(shape)
            pv = [t for t in trials if t["system"] == "plain" and t["shape"] == shape]
            pok = max([t["seq"] for t in pv if t["ok"]], default=None)
            plain = (f"{pok:,} (verified)" if pok else f"{PLAIN_MAX[shape]:,}" if PLAIN_MAX[shape] else "does not fit")
            uns = f"{UNSLOTH_MAX[shape]:,}" if UNSLOTH_MAX[shape] else "does not fit"
            if r is None:
                L.append(f"| {shape} | {plain} | {uns} | not run | {target:,} | | | |")
                continue
            at = r.get("at_max") or {}
            best = r["max_seq"]
            cap_note = " (search limit)" if r.get("searched_to") else ""
            L.append(f"| {shape} | {plain} | {uns} | {best:,}{cap_note} | {target:,} | "
                     f"{'yes' if best >= target else 'NO'} | {at.get('peak_alloc_gib', '')} / "
                     f"{at.get('peak_reserved_gib', '')} | {r.get('first_fail') or ''} |")
        L.append("")
    sp = [r for r in results if r.get("part") == "speed"]
    if sp:
        base = next((r for r in sp if r["system"] == "plain"), None)
        L += ["### (b) Speed, Qwen2.5-1.5B, 1,024 tokens, batch 1 (same run)", "",
              "| system | tokens/s | s/step | peak reserved GiB | ratio |", "|---|---|---|---|---|"]
        for r in sp:
            ratio = f"{r['tok_s'] / base['tok_s']:.2f}" if base else ""
            L.append(f"| {_label(r)} | {r['tok_s']:,.0f} | {r['s_per_step']} | "
                     f"{r.get('peak_reserved_gib', '')} | {ratio} |")
        L.append("")
    mxd = [r for r in results if r.get("part") == "mixed"]
    if mxd:
        base = next((r for r in mxd if r["system"] == "plain"), None)
        L += ["### (b') Mixed-length instruction-style set (log-normal lengths, median ~180, tail to 2,048)", "",
              "plain: batches of 4 padded to the longest, uncapped; snugtune: packed rows (position ids "
              "restarting per sample, batch 1) under the 3.65 GiB cap.", "",
              "| system | samples | useful tokens | tokens processed | steps | useful tokens/s | peak reserved GiB | ratio |",
              "|---|---|---|---|---|---|---|---|"]
        for r in mxd:
            ratio = f"{r['useful_tok_s'] / base['useful_tok_s']:.2f}" if base else ""
            pl = f" (rows of {r['pack_len']:,})" if r.get("pack_len") else " (batches of 4, padded)"
            L.append(f"| {_label(r)}{pl} | {r['samples']} | {r['useful_tokens']:,} | "
                     f"{r['processed_tokens']:,} | {r['steps']} | {r['useful_tok_s']:,.0f} | "
                     f"{r.get('peak_reserved_gib', '')} | {ratio} |")
        L.append("")
    ls = [r for r in results if r.get("part") == "loss"]
    base = next((r for r in ls if r["system"] == "plain"), None)
    if base:
        L += ["### (c) Loss per step, same data (Markov-chain tokens) and seed, lr 1e-3", "",
              "| step | plain | " + " | ".join(_label(r) for r in ls if r is not base)
              + " | max rel. diff |", "|---|---|" + "---|" * (len(ls) - 1) + "---|"]
        worst = 0.0
        for i, lp in enumerate(base["losses"]):
            row = [f"{r['losses'][i]:.4f}" for r in ls if r is not base and i < len(r["losses"])]
            d = max([abs(r["losses"][i] - lp) / abs(lp) for r in ls if r is not base and i < len(r["losses"])],
                    default=0.0)
            worst = max(worst, d)
            L.append(f"| {i + 1} | {lp:.4f} | " + " | ".join(row) + f" | {d * 100:.3f}% |")
        L += ["", f"Largest relative difference over all steps: {worst * 100:.3f}%.", ""]
    errs = [r for r in results if r.get("part") in ("error", "skipped")]
    if errs:
        L += ["### Trials that failed or were skipped", ""]
        for r in errs:
            L.append(f"- {json.dumps(r)[:400]}")
        L.append("")
    applied = next((r.get("applied") for r in ls if r["system"] != "plain"), None)
    if applied:
        L += [f"snugtune savers applied at 1,024 tokens: `{json.dumps(applied)}`", ""]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
