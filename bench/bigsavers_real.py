"""The 8-bit head (core/bigsavers.py) on real pretrained weights: Gemma 3 270M, real English text.

The 8-bit head changes the loss's numbers (int8 rows, one fp32 scale a row); the tests bound
that on random weights. This checks it where it matters: the pretrained head of a 262k
vocabulary, on the model's own hidden states for real text. CPU, fp32, forward + the loss's
backward to the hidden states; compares the loss, the gradient the blocks would receive, and
the top-1 token, against the 16-bit head.

    python bench/bigsavers_real.py --model /work/gemma/hf     # a Gemma 3 270M directory (HF format)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model directory (Gemma 3 270M)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bigsavers_real_gemma3_270m.json"))
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core import savers
    from core.bigsavers import Int8Head

    src = Path(a.model)
    cfg = json.loads((src / "config.json").read_text())
    tmp = None
    if "quantization_config" in cfg:  # a GGUF-converted copy: load its safetensors as they are
        tmp = Path(tempfile.mkdtemp(prefix="bigsavers-real-"))
        for f in src.iterdir():
            (tmp / f.name).symlink_to(f.resolve())
        (tmp / "config.json").unlink()
        cfg.pop("quantization_config")
        (tmp / "config.json").write_text(json.dumps(cfg))
        src = tmp
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    # real English: this project's README, a prose part of it
    text = (REPO / "README.md").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, : a.tokens]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
    weight = model.get_output_embeddings().weight.detach()
    softcap = cfg.get("final_logit_softcapping")
    labels = ids.clone()
    out = {"model": cfg.get("_model_name_or_path") or cfg.get("model_type"), "tokens": int(ids.shape[1]),
           "vocab": int(weight.shape[0]), "hidden": int(weight.shape[1]), "dtype": "fp32 (CPU)"}
    res = {}
    for name, head in (("16-bit", weight.to(torch.bfloat16).float()), ("8-bit", Int8Head(weight.to(torch.bfloat16)))):
        # both heads from the checkpoint's bf16 weight (what the card holds), the loss in fp32
        h = hidden.clone().requires_grad_(True)
        loss = savers.chunked_lm_loss(h, head, labels, softcap=softcap)
        loss.backward()
        with torch.no_grad():
            logits = h.detach()[0] @ (head if torch.is_tensor(head) else head.dequantized()).t()
        res[name] = {"loss": float(loss.detach()), "grad": h.grad.detach().clone(), "top1": logits.argmax(-1)}
    g16, g8 = res["16-bit"]["grad"].flatten(), res["8-bit"]["grad"].flatten()
    out.update({
        "loss_16bit": round(res["16-bit"]["loss"], 6), "loss_8bit": round(res["8-bit"]["loss"], 6),
        "loss_rel_diff": round(abs(res["8-bit"]["loss"] / res["16-bit"]["loss"] - 1), 6),
        "grad_cosine": round(float(torch.nn.functional.cosine_similarity(g16, g8, dim=0)), 6),
        "grad_rel_norm_diff": round(float((g8 - g16).norm() / g16.norm()), 6),
        "top1_agreement": round(float((res["16-bit"]["top1"] == res["8-bit"]["top1"]).float().mean()), 4),
        "command": "python bench/bigsavers_real.py --model DIR (DIR: Gemma 3 270M converted from "
                   "gemma-3-270m-q4_k_m.gguf, bf16 safetensors)",
    })
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
