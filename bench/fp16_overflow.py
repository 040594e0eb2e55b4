"""Where does fp16 overflow? Forward hooks on every module of a model, on the CPU.

Runs the model once in fp32 (reference) and once in fp16 on the same short text, and records
each module's largest |output| (fp32 run) and whether its fp16 output is non-finite. fp16's
largest finite value is 65,504: any module whose fp32 output exceeds it overflows in fp16.

    python bench/fp16_overflow.py /work/gemma/hf                   # real weights
    python bench/fp16_overflow.py --random-config gemma2-2b        # activation statistics of a random init

Torch runs fp16 matmuls on the CPU (slowly): keep the text short.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

FP16_MAX = 65504.0
TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
        "Neil Armstrong said: 'That's one small step for man.' def add(a, b): return a + b")


def stats(model, ids) -> dict:
    out: dict[str, dict] = {}
    hooks = []

    def mk(name):
        def hook(mod, inp, o):
            t = o[0] if isinstance(o, (tuple, list)) else o
            if not torch.is_tensor(t) or not t.is_floating_point():
                return
            x = inp[0] if inp and torch.is_tensor(inp[0]) else None
            finite = bool(torch.isfinite(t).all())
            out[name] = {"max": float(t.detach().float().abs().nan_to_num(posinf=math.inf).max()),
                         "in_max": float(x.detach().float().abs().max()) if x is not None and x.is_floating_point() else None,
                         "finite": finite, "type": type(mod).__name__}
        return hook

    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(mk(name)))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    out["<logits>"] = {"max": float(logits.float().abs().max()), "finite": bool(torch.isfinite(logits).all())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--random-config", help="a model_type/shape to build with random weights instead")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--out")
    a = p.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    if a.model:
        tok = AutoTokenizer.from_pretrained(a.model)
        ids = tok(TEXT, return_tensors="pt").input_ids[:, : a.tokens]
        cfg = AutoConfig.from_pretrained(a.model)
        if hasattr(cfg, "quantization_config"):  # a copy converted from a GGUF keeps this record: dense here
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_pretrained(a.model, config=cfg, dtype=torch.float32)
    else:
        from bench.fp16_configs import random_config

        cfg = random_config(a.random_config)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        ids = torch.randint(4, cfg.vocab_size, (1, a.tokens))
    model.eval()
    t0 = time.time()
    ref = stats(model, ids)
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits.float()
    model.half()
    half = stats(model, ids)
    from core import fp16guard

    fp16guard.install(model, torch.float16)
    with torch.no_grad():
        g = model(input_ids=ids).logits.float()
    guarded = {"logits_finite": bool(torch.isfinite(g).all()),
               "max_abs_logit_diff_vs_fp32": float((g - ref_logits).abs().max()),
               "top1_agreement_vs_fp32": float((g.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
               "nll_fp32": float(torch.nn.functional.cross_entropy(ref_logits[0, :-1], ids[0, 1:])),
               "nll_fp16_guarded": float(torch.nn.functional.cross_entropy(g[0, :-1], ids[0, 1:]))}
    rows = []
    for name, r in ref.items():
        h = half.get(name, {})
        rows.append({"module": name, "type": r.get("type"), "fp32_max": r["max"], "fp32_in_max": r.get("in_max"),
                     "fp16_finite": h.get("finite")})
    over = [r for r in rows if r["fp32_max"] > FP16_MAX]
    first_bad = next((r["module"] for r in rows if r["fp16_finite"] is False), None)
    summary = {"model": a.model or a.random_config, "tokens": int(ids.shape[1]), "seconds": round(time.time() - t0, 1),
               "over_fp16_max_in_fp32": [(r["module"], r["type"], round(r["fp32_max"])) for r in over],
               "first_nonfinite_in_fp16": first_bad, "fp16_with_guard": guarded, "logits_finite_fp16": half["<logits>"]["finite"],
               "largest": sorted(((round(r["fp32_max"]), r["module"]) for r in rows), reverse=True)[:15]}
    print(json.dumps(summary, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
