"""The chunked loss's tail kernel (core.kernels.ce_tail) on real pretrained weights: Gemma 3 270M.

    TRITON_INTERPRET=1 python bench/ce_tail_real.py --model /tmp/gemma-hf --out bench/results/ce_tail_real_gemma3_270m.json

The model is the converted HF copy of the base Gemma 3 270M (bf16, its `quantization_config` key
dropped in a copy; see bench/kernels_real.py). Its own final hidden states for real text (this
repository's README, Gemma's tokenizer) go through snugtune's chunked loss (core.savers.chunked_lm_loss,
262,144-row tied head, bf16) twice: with the tail in PyTorch operations (savers.CE_TAIL = None, the
path before the kernel and the fallback) and with the kernel (through Triton's interpreter on the CPU;
the GPU compilation is checked against the same operations by bench/kernels_check.py). Both are scored
against the loss and the hidden-state gradient computed in float64 from the same bf16 inputs, and
against each other. What a training step sees of the tail is exactly these two: the loss and the
gradient the head hands back.
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
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=128, help="tokens a loss chunk")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ce_tail_real_gemma3_270m.json"))
    args = ap.parse_args()
    import torch

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        print("CPU: run with TRITON_INTERPRET=1 (Triton's interpreter)", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core import kernels, savers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(open(os.path.join(REPO, "README.md")).read(), return_tensors="pt").input_ids[:, : args.tokens + 1]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(dev).eval()
    with torch.no_grad():
        out = model.model(input_ids=ids[:, :-1].to(dev))
    hidden = out.last_hidden_state[0].detach()  # T x h, bf16: what the head reads
    weight = model.lm_head.weight.detach()  # V x h, bf16 (tied to the embedding)
    labels = ids[0, 1:].to(dev)

    # float64 reference from the same bf16 inputs
    h64, w64 = hidden.double(), weight.double()
    z = h64 @ w64.t()
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(1, labels[:, None]).squeeze(1)
    loss64 = nll.mean()
    p = (z - lse[:, None]).exp()
    p[torch.arange(p.shape[0]), labels] -= 1.0
    grad64 = (p @ w64) / p.shape[0]
    del z, p

    def run(tail):
        savers.CE_TAIL = tail
        try:
            h = hidden.clone().requires_grad_(True)
            t0 = time.time()
            loss = savers.chunked_lm_loss(h[None], weight, shift_labels=labels[None], chunk_tokens=args.chunk)
            loss.backward()
            return float(loss), h.grad.double(), time.time() - t0
        finally:
            savers.CE_TAIL = None

    def score(loss, grad, ref_loss, ref_grad):
        cos = torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
        return {"loss": loss, "loss_rel_diff": abs(loss - float(ref_loss)) / abs(float(ref_loss)),
                "grad_cosine": float(cos), "grad_rel_l2": float((grad - ref_grad).norm() / ref_grad.norm()),
                "grad_max_abs_diff": float((grad - ref_grad).abs().max())}

    loss_ops, grad_ops, s_ops = run(None)
    loss_k, grad_k, s_k = run(kernels.ce_tail)
    res = {
        "model": "Gemma 3 270M (base), bf16 safetensors converted from the GGUF",
        "tokens": int(labels.numel()), "chunk_tokens": args.chunk, "vocab": int(weight.shape[0]),
        "text": "README.md of this repository, Gemma's tokenizer",
        "device": dev + (" (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""),
        "torch": torch.__version__,
        "loss_float64": float(loss64),
        "ops_vs_float64": score(loss_ops, grad_ops, loss64, grad64),
        "kernel_vs_float64": score(loss_k, grad_k, loss64, grad64),
        "kernel_vs_ops": score(loss_k, grad_k, loss_ops, grad_ops),
        "wall_s": {"ops": round(s_ops, 2), "kernel": round(s_k, 2)},
        "command": "TRITON_INTERPRET=1 python bench/ce_tail_real.py " + " ".join(sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
