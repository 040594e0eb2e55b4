"""Export a run: merge its LoRA adapter into the base weights as a plain transformers model.

The base is reloaded in its own 16-bit dtype (not 4-bit: merging into quantized weights would
round the adapter away), the adapter applied and merged (`merge_and_unload`), and the result
saved with its tokenizer. It is written to OUT_DIR.tmp and renamed, so an OUT_DIR that exists
is complete; an existing OUT_DIR is never overwritten.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from core.config import RunConfig
from core.errors import UserError
from core.runs import CONFIG_FILE


def export_merged(run_dir: str | Path, out_dir: str | Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.chat import adapter_dir
    from core.model import load_tokenizer, resolve_model_source

    run_dir = Path(run_dir).resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists; snugtune does not overwrite it",
                        hint="choose a new output directory, or remove the old one yourself")
    if not out_dir.parent.is_dir():
        raise UserError(f"the parent directory {out_dir.parent} does not exist")
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    cfg = RunConfig.from_toml(run_dir / CONFIG_FILE)
    adapter = adapter_dir(run_dir)
    source = resolve_model_source(cfg.model.name_or_path, cfg.model.revision)
    # dtype "auto": the checkpoint's own dtype (bf16/fp16 for released models), on the CPU, so a
    # merge never competes with training for GPU memory.
    base = AutoModelForCausalLM.from_pretrained(source, revision=cfg.model.revision, dtype="auto",
                                                trust_remote_code=cfg.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    tok = load_tokenizer(str(adapter) if (adapter / "tokenizer_config.json").is_file() else source, cfg)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        merged.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {tmp} ({exc.strerror})") from None
    tmp.rename(out_dir)
    return out_dir


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m core.export RUN_DIR OUT_DIR", file=sys.stderr)
        return 2
    try:
        print(export_merged(argv[0], argv[1]))
    except UserError as exc:
        print(f"snugtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
