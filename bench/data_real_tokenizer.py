"""Every dataset shape of issue 12 through a real pretrained tokenizer: `python bench/data_real_tokenizer.py
[--tokenizer /work/gemma/hf] [--out bench/results/data_real_tokenizer.json]`.

CI has no real weights; this is the check on one. For each shape file of tests/test_data_formats.py
(written again here into a temp dir) it runs the data pipeline with the real tokenizer twice: as
it is (Gemma 3 270M is a base model: no chat template, so the built-in template), with the
Qwen2.5-style tool template of the tests set on a copy (the chat-template path, tool calls
included), and with a Gemma-3-instruct-style template (BOS in the template, no tools) on another. Per shape it records the template used, the learned and read token counts of the first
sample, whether BOS leads it exactly once, whether the first learned piece decodes back to the
text it came from, and whether tokenizing the segments one by one gave the same ids as tokenizing
the sample whole (a merge across a prompt/response boundary would make them differ). Refused
shapes record their message.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


# Gemma 3 instruction-tuned style, written for this check: BOS first, the system prompt folded into
# the first user turn, roles user/model, no tool support (so tool data takes the built-in layout).
GEMMA_STYLE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (first if loop.first else '') + m['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="/work/gemma/hf")
    ap.add_argument("--out", default=str(ROOT / "bench/results/data_real_tokenizer.json"))
    args = ap.parse_args()

    from test_data_formats import ACCEPTED, MAPPED, REFUSED, TOOL_TEMPLATE, _write

    from core.config import DataConfig
    from core.data import (IGNORE_INDEX, _tokenize_many, build_datasets, load_tokenizer, prepare, render,
                           template_name, template_supports_tools)
    from core.errors import UserError

    base = load_tokenizer(args.tokenizer)
    tool = copy.deepcopy(base)
    tool.chat_template = TOOL_TEMPLATE
    gemma = copy.deepcopy(base)
    gemma.chat_template = GEMMA_STYLE
    out = {"tokenizer": args.tokenizer, "vocab": len(base), "has_chat_template": bool(base.chat_template),
           "bos": base.bos_token, "eos": base.eos_token, "shapes": {}}
    with tempfile.TemporaryDirectory() as d:
        for name, spec in {**ACCEPTED, **REFUSED}.items():
            path = _write(Path(d) / name, spec[0], spec[1])
            data_cfg = DataConfig(path=str(path), columns=MAPPED.get(name, {}), max_seq_len=512, eval_fraction=0.0)
            row: dict = {}
            for label, tok in (("as_is", base), ("tool_template", tool), ("gemma_style", gemma)):
                try:
                    fmt, records, _ = prepare(data_cfg)
                    segs = render(records[0], fmt, tok, data_cfg)
                    (ids, labels), = _tokenize_many([segs], tok, True)
                    whole = tok("".join(s.text for s in segs), add_special_tokens=False)["input_ids"]
                    first_learned = next((s.text for s in segs if s.trained), "")
                    piece = tok(first_learned, add_special_tokens=False)["input_ids"]
                    _, _, info = build_datasets(data_cfg, tok)
                    row[label] = {
                        "template": template_name(fmt, tok, data_cfg),
                        "tokens": len(ids),
                        "learned": sum(1 for x in labels if x != IGNORE_INDEX),
                        "bos_once_at_start": ids[:1] == [tok.bos_token_id] and ids.count(tok.bos_token_id) == 1,
                        "learned_piece_round_trips": tok.decode(piece) == first_learned,
                        "same_ids_as_whole": ids == whole,
                        "train_samples": info["train_samples"],
                        "dropped_and_cut": info["dropped_and_cut"],
                        "first_sample": [[s.text, s.trained] for s in segs],
                    }
                except UserError as exc:
                    row[label] = {"refused": exc.message.replace(d, "<tmp>")}
            out["shapes"][name] = row
    out["template_supports_tools"] = {"as_is": template_supports_tools(base), "tool_template": template_supports_tools(tool),
                                      "gemma_style": template_supports_tools(gemma)}
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, row in out["shapes"].items():
        for label, r in row.items():
            if "refused" in r:
                print(f"{name:24} {label:13} refused: {r['refused'][:90]}")
            else:
                print(f"{name:24} {label:13} {r['template']:13} tokens {r['tokens']:4} learned {r['learned']:4} "
                      f"bos-once {r['bos_once_at_start']!s:5} round-trip {r['learned_piece_round_trips']!s:5} "
                      f"ids==whole {r['same_ids_as_whole']!s:5} {'; '.join(r['dropped_and_cut'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
