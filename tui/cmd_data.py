"""`snugtune data inspect`: see the data the way the model will, before training on it.

No torch at module level: this module is imported by `snugtune --help` and the wizard. The
inspection itself (core.data, which loads a tokenizer) is imported inside the command; the
wizard runs `snugtune data inspect ... --json` as a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from core.errors import UserError

DEFAULT_MODEL = "builtin:tiny-llama"  # whose tokenizer measures a file given with --path alone


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="look at training data before training on it")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    ins = sub.add_parser(
        "inspect",
        help="show the detected format, a few samples as the model sees them, and token lengths",
        description="Show how a preset's data (or a file) will be read: the detected format and columns, "
        "the first samples exactly as the model sees them (the masked prompt, read but not learned, is "
        "dimmed or «marked»; the learned response is plain), and token-length statistics.",
    )
    ins.add_argument("preset", nargs="?", metavar="PRESET", help="a preset name or TOML path whose [data] to inspect")
    ins.add_argument("--path", metavar="FILE", help="a data file or Hub dataset id (instead of a preset)")
    ins.add_argument("--format", choices=["auto", "instruction", "chat", "segments", "text"], help="force the sample format")
    ins.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                     help="map a format field to a column, e.g. --column instruction=question (repeatable)")
    ins.add_argument("--model", metavar="ID", help=f"whose tokenizer and chat template to use "
                     f"(default: the preset's model, or {DEFAULT_MODEL} with --path)")
    ins.add_argument("--seq", type=int, metavar="N", help="max sequence length in tokens (data.max_seq_len)")
    ins.add_argument("--template", choices=["auto", "builtin"], help="the tokenizer's chat template, or the built-in one")
    ins.add_argument("--text-split", choices=["auto", "paragraph", "line", "document"],
                     help="how a .txt file becomes samples (data.text_split)")
    ins.add_argument("--long-samples", choices=["split", "truncate"],
                     help="plain text longer than --seq: split into windows or truncate (data.long_samples)")
    # Whose syntax the hints use: the wizard runs this command and has a Columns box, not --column.
    ins.add_argument("--hint-syntax", choices=["inspect", "wizard", "train"], default="inspect", help=argparse.SUPPRESS)
    ins.add_argument("-n", "--samples", type=int, default=3, metavar="N", help="how many samples to show (default 3)")
    ins.add_argument("--json", action="store_true", help="print the inspection as one JSON object")
    ins.set_defaults(func=cmd_inspect)


def _data_config(args):
    """The DataConfig and model to inspect, from a preset or --path, with the flags applied."""
    from core.config import ConfigError, DataConfig, RunConfig

    if bool(args.preset) == bool(args.path):
        raise UserError("give a preset or --path FILE (one of them)",
                        hint="e.g. `snugtune data inspect demo` or `snugtune data inspect --path data.jsonl`")
    if args.preset:
        try:
            from core.presets import load_preset
        except ImportError:  # presets not available: a TOML path still works
            if not args.preset.endswith(".toml"):
                raise UserError(f"{args.preset!r}: give the path of a preset's .toml file") from None
            load_preset = RunConfig.from_toml
        cfg = load_preset(args.preset)
        data, model = cfg.data.model_dump(), cfg.model.name_or_path
    else:
        data, model = {"path": args.path}, DEFAULT_MODEL
    if args.format:
        data["format"] = args.format
    if args.template:
        data["template"] = args.template
    if args.seq is not None:
        data["max_seq_len"] = args.seq
    if args.text_split:
        data["text_split"] = args.text_split
    if args.long_samples:
        data["long_samples"] = args.long_samples
    if args.column:
        columns = dict(data.get("columns") or {})
        for item in args.column:
            fld, sep, col = item.partition("=")
            if not sep or not fld.strip() or not col.strip():
                raise UserError(f"--column expects FIELD=COLUMN (e.g. instruction=question), got {item!r}")
            columns[fld.strip()] = col.strip()
        data["columns"] = columns
    try:
        data_cfg = DataConfig.model_validate(data)
    except Exception as exc:  # pydantic's ValidationError: say it the way config errors are said
        msgs = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in getattr(exc, "errors", lambda: [])()]
        raise ConfigError("; ".join(msgs) or str(exc), source="data") from None
    return data_cfg, args.model or model


def cmd_inspect(args) -> int:
    data_cfg, model = _data_config(args)
    from core.data import inspect  # loads transformers: only now

    report = inspect(data_cfg, model, n=max(0, args.samples), syntax=args.hint_syntax)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        print(format_report(report, color=color))
    return 0


# ---- text output -------------------------------------------------------------------------------

DIM, RESET = "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "«", "»"  # marks masked text when there is no colour


def format_report(report: dict, color: bool = False) -> str:
    fmt = report["format"]
    template = {"chat_template": "the tokenizer's chat template", "builtin": "snugtune's built-in template",
                "text": "plain text (no template)",
                "segments": "axolotl segments, as given (no template)"}[report["template"]]
    if report.get("template_note"):
        template += f" ({report['template_note']})"
    out = [
        f"data:     {report['path']} ({_n(report['samples_total'], 'sample')}; columns: {', '.join(report['columns'])})",
        f"format:   {fmt['kind']} - {fmt['reason']}",
        f"template: {template}; tokenizer {report['tokenizer']}",
        f"loss on:  {_loss_on(report)}",
    ]
    legend = f"{DIM}dimmed{RESET}" if color else f"{OPEN}marked{CLOSE}"
    from core.data import context_summary, dropped_and_cut

    for s in report["samples"]:
        trunc = f", truncated to {report['max_seq_len']}" if s["truncated"] else ""
        if s.get("windows", 1) > 1:
            trunc = f" of {s['full_tokens']}, split into {s['windows']} windows (the first shown)"
        out += ["", f"--- sample {s['index'] + 1}: {s['tokens']} tokens, {s['trained_tokens']} learned{trunc} "
                    f"(masked prompt {legend}) ---"]
        context = context_summary(s.get("context") or {})
        if context:
            out.append(f"[{context}]")
        body = "".join(
            seg["text"] if seg["trained"] else (f"{DIM}{seg['text']}{RESET}" if color else f"{OPEN}{seg['text']}{CLOSE}")
            for seg in clip_segments(s["segments"])
        )
        out.append(body.rstrip("\n"))
    out += ["", *format_length_stats(report["length_stats"], sampled=report.get("length_stats_sampled", False))]
    counts = report.get("counts") or {}
    cut = dropped_and_cut(counts)
    of = f"first {report['length_stats']['count']} samples" if report.get("counts_sampled") else "samples"
    out.append(f"dropped or cut ({of}): " + ("; ".join(cut) if cut else "none"))
    return "\n".join(out)


# A sample longer than this many characters is shown by its start and its end: a 4,096-token
# document printed whole pushed everything else of the report off the terminal.
CLIP_HEAD, CLIP_TAIL = 1200, 400


def clip_segments(segments: list[dict], head: int = CLIP_HEAD, tail: int = CLIP_TAIL) -> list[dict]:
    """The segments of a sample, the middle of a long one replaced by one line saying how much is
    left out (masked and trained parts keep their marks on both sides of the cut)."""
    total = sum(len(seg["text"]) for seg in segments)
    if total <= head + tail + 200:
        return segments

    def take(segs: list[dict], n: int) -> list[dict]:
        out = []
        for seg in segs:
            if n <= 0:
                break
            out.append({**seg, "text": seg["text"][:n]})
            n -= len(seg["text"])
        return out

    start = take(segments, head)
    rev = [{**seg, "text": seg["text"][::-1]} for seg in reversed(segments)]
    end = [{**seg, "text": seg["text"][::-1]} for seg in reversed(take(rev, tail))]
    gap = {"text": f"\n[... {total - head - tail:,} characters not shown ...]\n", "trained": True}
    return start + [gap] + end


def _loss_on(report: dict) -> str:
    # Plain text has no prompt: every token is learned whatever train_on_responses_only says, and
    # segments learn what their labels say.
    kind = (report.get("format") or {}).get("kind")
    if kind == "text":
        return "every token (plain text has no prompt to mask)"
    if kind == "segments":
        return "the segments labelled true"
    return "responses only (the prompt is read, not learned)" if report["train_on_responses_only"] else "every token"


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def format_length_stats(st: dict, sampled: bool = False, width: int = 40) -> list[str]:
    if not st["count"]:
        return ["lengths:  no samples"]
    of = f"first {_n(st['count'], 'sample')}" if sampled else _n(st["count"], "sample")
    lines = [
        f"lengths ({of}, tokens): mean {st['mean']}, p50 {st['p50']}, p95 {st['p95']}, max {st['max']}; "
        f"longer than max_seq_len={st['max_seq_len']}: {st['truncated']} ({st['truncated_share']:.1%})"
    ]
    edges, counts = st["histogram"]["edges"], st["histogram"]["counts"]
    top = max(counts) or 1
    for lo, hi, c in zip(edges, edges[1:], counts):
        bar = "#" * max(1 if c else 0, round(width * c / top))
        lines.append(f"  {lo:>6}-{hi - 1:<6} {bar} {c}")
    return lines
