"""Export a run to GGUF at several weight types and check each in llama.cpp against transformers.

    python bench/gguf_export_check.py RUN_DIR --out DIR [--quants f16,q8_0,q4_k_m] [--json FILE]

One merge (core.export.load_merged), then per weight type: the GGUF written by snugtune's
export (converter + llama.cpp's quantizer), its size and time; llama.cpp's tokenization of each
prompt compared with the transformers tokenizer's; greedy decoding of N tokens per prompt in
llama.cpp (through llama-cpp-python) compared token by token with the merged model's greedy
decoding in transformers (float32 compute over the merged weights). This is the real-weights
form of tests/test_export_gguf.py; the results are committed under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "What does the len function do in Python?",
    "Explain what a dictionary is.",
    "Write one sentence about the ocean.",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quants", default="f16,q8_0,q4_k_m")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch

    from core.chat import render_prompt
    from core.export import load_merged, quiet_transformers, save_gguf
    from core.gguf_export import llama_cpp_greedy

    quiet_transformers()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    m = load_merged(args.run, full_precision=True)
    merge_s = time.time() - t0
    results = {"run": str(args.run), "model": m.cfg.model.name_or_path, "weights_dtype": str(m.model.dtype),
               "machine": f"{platform.machine()} {platform.processor() or ''}, CPU only".strip(),
               "tokens_per_prompt": args.tokens, "prompts": PROMPTS, "merge_s": round(merge_s, 1), "quants": {}}
    files = {}
    for q in args.quants.split(","):
        path = out / f"{Path(args.run).name}-{q}.gguf"
        t = time.time()
        save_gguf(m, path, q, progress=lambda s: print(" ", s, file=sys.stderr))
        files[q] = path
        results["quants"][q] = {"file": path.name, "bytes": path.stat().st_size, "export_s": round(time.time() - t, 1)}

    model = m.model.float().eval()  # the merged weights as written, computed in float32
    prompts, ref = [], []
    for p in PROMPTS:
        text = render_prompt(m.tokenizer, m.cfg, p, kind=m.kind)
        ids = m.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=m.tokenizer.pad_token_id)
        prompts.append((text, ids))
        ref.append(g[0, len(ids):].tolist())
    results["transformers"] = [m.tokenizer.decode(r) for r in ref]
    for q, path in files.items():
        got = llama_cpp_greedy(path, prompts, args.tokens)
        same = sum(a == b for r, (_, g) in zip(ref, got) for a, b in zip(r, g))
        first_diff = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), None) for r, (_, g) in zip(ref, got)]
        results["quants"][q].update({
            "agreement": round(same / (len(ref) * args.tokens), 3),
            "tokens_same": same, "tokens_total": len(ref) * args.tokens,
            "first_difference_at": first_diff,
            "tokenization_matches": [theirs == ids for (theirs, _), (_, ids) in zip(got, prompts)],
            "text": [m.tokenizer.decode(g) for _, g in got],
        })
    print(f"| weights | file size | export time | greedy agreement with transformers ({len(PROMPTS)}x{args.tokens} tokens) | tokenization matches |")
    print("|---|---|---|---|---|")
    for q, r in results["quants"].items():
        print(f"| {q} | {r['bytes'] / 1e6:.1f} MB | {r['export_s']:.0f} s | {r['agreement']:.0%} "
              f"(first difference at token {r['first_difference_at']}) | {all(r['tokenization_matches'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
