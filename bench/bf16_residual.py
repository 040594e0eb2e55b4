"""Does a bf16 residual stream cost Gemma accuracy? fp32 vs bf16 vs bf16 with the stream in fp32, on the CPU.

Run 3 of bench/real_weights.py (H200) found snugtune's bf16 loss ~6% above both guarded fp16
(whose residual stream is fp32) and the plain recipe's bf16 (fp32 upcast, so an fp32 stream)
over the first 20 steps. Gemma's residual stream reaches ~10^5, where bf16's step between two
numbers is 512: a block's small additions there round away. This measures it on the real
weights without a GPU: the same date-task texts through the model in fp32 (reference), in bf16
(all of it, as snugtune's bf16 path computes: bf16 weights, bf16 stream) and in bf16 with the
fp16 guard's patches (core.fp16guard.install with bf16: embedding output and post-norm outputs
fp32, so the stream adds in fp32). Reported: the mean NLL, the logits' error against fp32, top-1
agreement, and the cosine of the gradient of block 0's q_proj weight (the learning signal at the
far end of the backward) with fp32's.

    python bench/bf16_residual.py MODEL_DIR --out bench/results/bf16_residual_gemma3_270m.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def texts(n: int) -> list[str]:
    from bench.real_weights import date_task

    rows, _ = date_task(n, 1, seed=11)
    return [f"{r['instruction']}\n{r['output']}" for r in rows]


def run(model, batch, probe) -> dict:
    import torch

    model.zero_grad(set_to_none=True)
    out = model(**batch)
    logits = out.logits.float()
    lab = batch["input_ids"][:, 1:]
    mask = batch["attention_mask"][:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), lab, reduction="none")
    loss = nll[mask].mean()
    loss.backward()
    g = probe(model).weight.grad.detach().float().flatten().clone()
    return {"loss": loss.detach(), "logits": logits.detach()[:, :-1][mask], "grad": g}


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core import fp16guard

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--out")
    a = p.parse_args(argv)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.model)
    batch = tok(texts(a.samples), return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    base.config.use_cache = False

    def probe(m):
        return m.model.layers[0].self_attn.q_proj

    ref = run(base, batch, probe)
    res = {"model": a.model, "samples": a.samples, "tokens": int(batch["attention_mask"][:, 1:].sum()),
           "torch": torch.__version__, "fp32": {"nll": round(float(ref["loss"]), 5)}}
    for name, guard in (("bf16", False), ("bf16_fp32_stream", True)):
        m = copy.deepcopy(base).to(torch.bfloat16)
        if guard:
            fp16guard.install(m, torch.bfloat16)
        r = run(m, batch, probe)
        d = (r["logits"] - ref["logits"]).abs()
        res[name] = {
            "nll": round(float(r["loss"]), 5),
            "nll_minus_fp32": round(float(r["loss"] - ref["loss"]), 5),
            "logits_mean_abs_err": round(float(d.mean()), 5),
            "top1_agree": round(float((r["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean()), 4),
            "grad_cos_q_proj0": round(float(torch.nn.functional.cosine_similarity(r["grad"], ref["grad"], dim=0)), 5),
            "grad_norm_ratio_q_proj0": round(float(r["grad"].norm() / ref["grad"].norm()), 5),
        }
        del m
    res["seconds"] = round(time.time() - t0, 1)
    res["command"] = "python bench/bf16_residual.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
