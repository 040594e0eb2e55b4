"""How much a training step of the engine holds, measured on the CPU: the allocator's own records.

The estimator's structure (which blocks' stores live beside which transients, what a kept block holds) does
not depend on the device, and the CPU allocator reports every allocation and free to torch.profiler
(`profile_memory=True`). This runs one micro-batch (forward + backward, the engine's savers installed with a
GPU plan, 4-bit weights, bf16 compute) of a small random-init Llama shape on the CPU, for several numbers of
un-checkpointed ("kept") blocks, and prints the peak of the live bytes allocated during the step beside the
estimate's activations for the same plan. The difference between two kept-block counts isolates what the
estimate prices per kept block and at the kept/recomputed boundary; absolute levels differ from a GPU's (the
CPU's attention and norms keep their own intermediates), so they are not compared.

    PYTHONPATH=. python bench/cpu_memory_structure.py [--tokens 1024] [--keeps 0,1,2,3,6]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 2**30


def live_peak(fn) -> tuple[int, int]:
    """(peak, end) of the bytes allocated during fn() and still live, from the profiler's memory records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    evs = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                 key=lambda e: e.start_ns())
    cur = peak = 0
    for e in evs:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, cur


def build(tmp: Path, h: int, inter: int, layers: int, heads: int, kv: int, vocab: int):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                    tie_word_embeddings=False, attn_implementation="sdpa")
    LlamaForCausalLM(c).to(torch.bfloat16).save_pretrained(tmp / "m")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    return tmp / "m", q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--keeps", default="0,1,2,3,6")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    os.environ["SNUGTUNE_KERNELS"] = "off"  # the CPU has no Triton path; the estimate prices transformers' modules
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core import estimate as E
    from core import plan as P
    from core import savers
    from core.catalog import spec_from_dir
    from core.config import RunConfig
    from core.gpu import GpuTarget

    tmp = Path(tempfile.mkdtemp(prefix="cms-"))
    path, q = build(tmp, a.hidden, a.inter, a.layers, 4, 2, a.vocab)
    spec = spec_from_dir(path)
    T = a.tokens
    cfg = RunConfig.from_dict({"model": {"name_or_path": str(path)}, "data": {"path": "(bench)", "max_seq_len": T},
                               "lora": {"r": 8, "alpha": 16},
                               "train": {"micro_batch": 1, "grad_accum": 1, "offload_activations": "off"}})
    gpu = GpuTarget(name="bench", label="bench", budget_gib=4.0, bf16=True, compute_capability=(8, 0),
                    fp16_tflops=300.0, bandwidth_gbs=3000.0, total_gib=4.0, cuda_context_gib=0.0, budget_source="vram")
    rows = []
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (1, T), generator=g)
    for keep in [int(k) for k in a.keeps.split(",")]:
        m = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16, device_map={"": "cpu"})
        savers.prepare_for_kbit_training(m, True)
        torch.manual_seed(0)
        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
        plan = replace(P.plan(cfg, spec, gpu, keep=keep), cuda_graphs=False, kernels=False)
        applied = savers.install_savers(m, plan)
        m.train()

        def step():
            out = m(input_ids=ids, labels=ids)
            out.loss.backward()

        step()  # warm (lazy buffers, the first dequantization caches)
        for p in m.parameters():
            p.grad = None
        peak, end = live_peak(step)
        est = E.estimate(spec, cfg, gpu, plan=plan, offload=False)
        c = est.components
        row = {"keep": keep, "applied_kept": applied.get("uncheckpointed_blocks"), "peak_gib": peak / GIB,
               "end_gib": end / GIB, "est_activations_gib": c["activations"], "est_logits_gib": c["logits"],
               "est_gradients_gib": c["gradients"], "est_phase": est.peak_phase}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del m
    base = rows[0]
    print("keep  measured peak - keep 0 (MiB)  estimate's activations - keep 0 (MiB)")
    for r in rows:
        print(f"{r['keep']:4d}  {(r['peak_gib'] - base['peak_gib']) * 1024:10.2f}  "
              f"{(r['est_activations_gib'] + r['est_logits_gib'] + r['est_gradients_gib'] - base['est_activations_gib'] - base['est_logits_gib'] - base['est_gradients_gib']) * 1024:10.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
