"""core/kernels.py on real pretrained weights: Gemma 3 270M, one forward and backward with and without.

    TRITON_INTERPRET=1 python bench/kernels_real.py --model /tmp/gemma-hf --out bench/results/kernels_real.json

The model is the converted HF copy of the base Gemma 3 270M (bf16 safetensors, /work/gemma/hf, its
`quantization_config` key dropped in a copy). The kernels run through Triton's interpreter on the
CPU (the GPU machine has no copy of these weights: the 540 MB do not fit its 64 MiB carry); their
GPU compilations are checked against the same transformers modules by bench/kernels_check.py.
Real text: this repository's README, tokenized by Gemma's own tokenizer. Gemma's RMSNorm (1 + w,
fp32 math, q/k norms too), GeGLU (gelu tanh) and rotary (two bases: local and global layers) are
what is exercised. Norm weights frozen (as under LoRA); every other weight gets a gradient, so the
gradient cosine covers the kernels' backward in every block. Reported beside the same numbers for
the bf16 reference against an fp32 run of the model: the scale of bf16's own rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/gemma-hf")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kernels_real.json"))
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1" and not __import__("torch").cuda.is_available():
        print("CPU: run with TRITON_INTERPRET=1 (Triton's interpreter)", file=sys.stderr)
        return 2
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core import kernels as K

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens].to(dev)

    def load(dtype):
        m = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(dev)
        for n, p in m.named_parameters():
            p.requires_grad_("norm" not in n)
        m.train()  # dropout is 0 in Gemma 3's config; train() as in training
        return m

    def run(m):
        m.zero_grad(set_to_none=True)
        t0 = time.time()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.detach().float().flatten() for n, p in m.named_parameters() if p.grad is not None}
        return float(out.loss.detach()), grads, time.time() - t0

    def compare(a, b):
        la, ga = a[0], a[1]
        lb, gb = b[0], b[1]
        flat_a = torch.cat([ga[n] for n in ga])
        flat_b = torch.cat([gb[n] for n in ga])
        per = {n: float(F.cosine_similarity(ga[n].double(), gb[n].double(), dim=0)) for n in ga}
        worst = min(per, key=per.get)
        return {"loss": [la, lb], "loss_rel_diff": abs(la - lb) / abs(lb),
                "grad_cosine": float(F.cosine_similarity(flat_a.double(), flat_b.double(), dim=0)),
                "grad_rel_l2": float((flat_a - flat_b).norm() / flat_b.norm()),
                "worst_tensor": worst, "worst_tensor_cosine": per[worst], "tensors": len(ga)}

    torch.manual_seed(0)
    m = load(torch.bfloat16)
    ref = run(m)
    what = K.install(m)
    ker = run(m)
    del m
    m32 = load(torch.float32)
    f32 = run(m32)
    del m32
    res = {
        "model": "Gemma 3 270M (base), bf16 safetensors converted from the GGUF (/work/gemma/hf)",
        "tokens": int(ids.shape[1]), "text": "README.md of this repository, Gemma's tokenizer",
        "device": dev + (" (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""),
        "torch": torch.__version__, "installed": what,
        "kernels_vs_transformers_bf16": compare(ker, ref),
        "transformers_bf16_vs_fp32": compare(ref, f32),
        "kernels_bf16_vs_fp32": compare(ker, f32),
        "seconds": {"transformers_bf16": round(ref[2], 1), "kernels_bf16": round(ker[2], 1), "fp32": round(f32[2], 1)},
        "command": "TRITON_INTERPRET=1 python bench/kernels_real.py " + " ".join(sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
