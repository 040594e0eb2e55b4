"""Why snugtune's bf16 learned slower than guarded fp16 in its first steps (real_weights run 3): the LoRA sum's rounding.

Run 3 of bench/real_weights.py (H200, Gemma 3 270M) had snugtune's bf16 loss curve 6.2% above
guarded fp16's (noise floor 0.5-0.7%), nearly all of it in steps 3-10, with the plain recipe's
bf16 curve level with fp16's. The first two losses agreed to 0.5%; the third, after the first
update with a learning rate above 0 (step 2's warm-up lr, 3.3e-5), was 1.518 in bf16 against
1.392 in fp16: one Adam step did less in bf16. This measures that step on the real weights, on
the CPU, through snugtune's own training model (core.model.load_for_training: NF4 base, the
fused NF4 + LoRA node of core.savers, the chunked loss, the fp16 guard in fp16):

1. From the same LoRA init (B = 0), one update of B is computed once in fp32: Adam's first step,
   lr x sign(gradient) (what bias-corrected Adam takes on its first nonzero-lr step), on one batch
   of 8 date rows.
2. The same update is put into each precision's model; the loss on 16 other rows is measured
   before and after. `drop_vs_fp32` is that loss drop over fp32's: 1.0 means the update reached
   the forward whole.
3. For one projection (block 6's MLP gate) `kept` is how much of the exact LoRA term
   s (x A^T) dB^T survives in the 16-bit output: <realized, exact> / |exact|^2 on the same input.

Precisions: fp32 (the reference), bf16 and guarded fp16, each with the LoRA sum as before this
change (`oldsum`: the base output rounded to 16 bits, then the LoRA term added to it and rounded
again) and as now (core.savers.LORA_SUM_FP32: summed in fp32, rounded once).

    python bench/lora_sum_precision.py /tmp/h10/ghf --out bench/results/lora_sum_precision_gemma3_270m.json
    python bench/lora_sum_precision.py --smoke        # the demo model, seconds (tests)

MODEL_DIR: a bf16 safetensors copy of Gemma 3 270M (/work/gemma/hf without its
quantization_config key).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = [("fp32", "fp32", True), ("bf16-oldsum", "bf16", False), ("bf16", "bf16", True),
         ("fp16-guard-oldsum", "fp16", False), ("fp16-guard", "fp16", True)]


def _cfg(model_dir: str, data: str, dtype: str):
    from core.config import RunConfig

    return RunConfig.from_dict({
        "gpu": {"profile": "cpu"},
        "model": {"name_or_path": model_dir, "compute_dtype": dtype, "load_in_4bit": True},
        "data": {"path": data, "format": "instruction", "max_seq_len": 128, "packing": False, "eval_fraction": 0.0,
                 "train_on_responses_only": True},
        "lora": {"r": 16, "alpha": 32},
        "train": {"micro_batch": 8, "grad_accum": 1, "max_steps": 10, "seed": 42},
        "output": {"runs_dir": "/tmp"},
    })


def _batch(rows, pad_id):
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id)
    lab = torch.full((len(rows), n), -100)
    att = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        lab[i, :k] = torch.tensor(r["labels"])
        att[i, :k] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


def _lora(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _probe(model):
    from core.savers import _decoder_layers, _unwrap

    layers = _decoder_layers(_unwrap(model))
    return layers[min(6, len(layers) - 1)].mlp.gate_proj


def _loss(model, batch) -> float:
    import torch

    with torch.no_grad():
        return float(model(**batch).loss)


def main(argv=None) -> int:
    import torch

    from bench.real_weights import date_task
    from core import savers
    from core.data import build_datasets
    from core.model import load_for_training, select_device

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?")
    p.add_argument("--smoke", action="store_true", help="the demo model (tests)")
    p.add_argument("--lr", type=float, nargs="+", default=[3.3e-5, 2e-4],
                   help="update sizes (run 3's step-2 warm-up lr and its peak)")
    p.add_argument("--modes", default=",".join(m[0] for m in MODES))
    p.add_argument("--out")
    a = p.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(2)
    if a.smoke:
        from core.demo import ensure_tiny_llama

        model_dir = str(ensure_tiny_llama())
    elif a.model:
        model_dir = a.model
    else:
        p.error("MODEL_DIR (or --smoke)")
    work = Path("/tmp") / f"lora-sum-{int(t0)}"
    work.mkdir(parents=True, exist_ok=True)
    train, _ = date_task(24, 1, seed=5)
    data = work / "dates.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    modes = [m for m in MODES if m[0] in a.modes.split(",")]
    res: dict = {"model": model_dir, "torch": torch.__version__, "lrs": a.lr, "modes": {}}
    init = update = None
    probe_x: dict = {}
    base_loss = {}
    for name, dtype, fp32_sum in modes:
        savers.LORA_SUM_FP32 = fp32_sum
        cfg = _cfg(model_dir, str(data), dtype)
        torch.manual_seed(0)
        model, tok, info = load_for_training(cfg, select_device(cfg), model_dir)
        rows, _, _ = build_datasets(cfg.data, tok)
        tr, ev = _batch(rows[:8], tok.pad_token_id), _batch(rows[8:24], tok.pad_token_id)
        params = _lora(model)
        if init is None:
            init = {n: q.detach().clone() for n, q in params.items()}
        else:
            with torch.no_grad():
                for n, q in params.items():
                    q.copy_(init[n])
        model.eval()
        r = {"compute": dtype, "lora_sum_fp32": fp32_sum, "fp16_guard": info.get("fp16_guard"),
             "fused_lora_4bit": (info.get("savers") or {}).get("fused_lora_4bit")}
        r["loss_before"] = _loss(model, ev)
        if update is None:  # the fp32 reference's gradient: B's (A's is 0 while B = 0)
            model.train()
            model.zero_grad(set_to_none=True)
            model(**tr).loss.backward()
            update = {n: -torch.sign(q.grad.detach()) for n, q in params.items() if q.grad is not None}
            r["updated_tensors"] = len(update)
            model.zero_grad(set_to_none=True)
            model.eval()
        # the probe's input (captured once, from the fp32 model) fed to every precision's projection
        pr = _probe(model)
        if not probe_x:
            def grab(mod, inp, out):  # (returns None: a hook's return value would replace the output)
                probe_x.setdefault("x", inp[0].detach().float().clone())

            h = pr.register_forward_hook(grab)
            _loss(model, ev)
            h.remove()
        x = probe_x["x"].to(next(q for q in params.values()).device)
        xin = x.to(torch.float32 if dtype == "fp32" else getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype]))
        with torch.no_grad():
            out0 = pr(xin).float()
        for lr in a.lr:
            with torch.no_grad():
                for n, q in params.items():
                    q.copy_(init[n] + lr * update[n] if n in update else init[n])
            after = _loss(model, ev)
            with torch.no_grad():
                out1 = pr(xin).float()
                adapter = pr.active_adapters[0]
                key = {"A": pr.lora_A[adapter].weight, "B": pr.lora_B[adapter].weight}
                s = float(next(iter(pr.scaling.values())))
                exact = s * (x @ key["A"].float().t()) @ key["B"].float().t()
                real = out1 - out0
                kept = float((real * exact).sum() / (exact * exact).sum().clamp_min(1e-30))
                rel = float(exact.abs().mean() / out0.abs().mean().clamp_min(1e-30))
            r[f"lr={lr:g}"] = {"loss_after": after, "drop": r["loss_before"] - after, "probe_kept": round(kept, 4),
                               "probe_term_over_output": round(rel, 6)}
        res["modes"][name] = r
        print(name, json.dumps(r), flush=True)
        del model
    savers.LORA_SUM_FP32 = True
    ref = res["modes"].get("fp32")
    if ref:
        for name, r in res["modes"].items():
            for lr in a.lr:
                k = f"lr={lr:g}"
                r[k]["drop_vs_fp32"] = round(r[k]["drop"] / ref[k]["drop"], 4) if ref[k]["drop"] else None
    res["seconds"] = round(time.time() - t0, 1)
    res["command"] = "python bench/lora_sum_precision.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {n: {k: (v.get("drop_vs_fp32"), v.get("probe_kept")) for k, v in r.items() if k.startswith("lr=")}
               for n, r in res["modes"].items()}
    res["summary (drop_vs_fp32, probe_kept)"] = summary
    print(json.dumps(summary, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
