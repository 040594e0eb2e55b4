"""Chat with a run's adapter: in the terminal, or as JSON lines over stdin/stdout.

`python -m core.chat RUN_DIR [--compare]` is the wizard's channel (it never imports torch):
it prints one JSON object a line. First {"event": "ready", ...} (or {"event": "error", ...});
then for every request line {"prompt": "...", "max_new_tokens": 128, "temperature": 0.0,
"compare": false, "id": ...} one {"event": "reply", "id": ..., "response": "...", "base": "..."}
("base" only with compare: the same prompt answered with the adapter switched off).
{"cmd": "quit"} or the end of stdin ends it. Bad requests get {"event": "error", "error": ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import IO, Optional

import torch

from core.config import RunConfig
from core.errors import UserError
from core.runs import CONFIG_FILE, EMPTY_REPLY, last_checkpoint

# A few sentences: enough to judge an answer, quick on a CPU. SNUGTUNE_CHAT_MAX_NEW_TOKENS lowers
# it for every chat that does not ask for a length (the wizard's): the end-to-end test uses 8.
DEFAULT_MAX_NEW_TOKENS = int(os.environ.get("SNUGTUNE_CHAT_MAX_NEW_TOKENS") or 128)


def quiet_transformers() -> None:
    """No "Loading weights" bars or FutureWarnings in chat and export output: noise to a user
    who asked for an answer or a file (and the wizard reads these streams)."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes on the CPU logs that an optional kernels package is missing; nothing to act on
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def adapter_dir(run_dir: Path) -> Path:
    """The final adapter, or (for a stopped run) the newest checkpoint's adapter."""
    final = run_dir / "adapter"
    if (final / "adapter_config.json").is_file():
        return final
    ckpt = last_checkpoint(run_dir)
    if ckpt is not None and (ckpt / "adapter_config.json").is_file():
        return ckpt
    from core.runs import run_status

    status = run_status(run_dir).get("status")
    if status == "running":
        hint = "wait for the run to save its first checkpoint (train.save_steps), or to finish"
    else:  # failed, stopped or died before its first checkpoint: waiting would never end
        what = f"the run {status} before it saved one" if status in ("failed", "stopped", "died") else "none was saved"
        hint = f"{what}: `snugtune resume {run_dir.name}` trains it again from the start"
    raise UserError(f"run {run_dir.name} has no adapter yet (no adapter/ and no checkpoint)", hint=hint)


def check_base_model(run_dir: Path, cfg: RunConfig) -> None:
    """A run whose base model was a local folder or GGUF file that is gone (moved, deleted, an
    unmounted disk): say so in the run's terms. The loader's own message ("model directory ...
    not found; give an existing local model directory") tells a chat or export user to give
    something they never give here."""
    name = str(cfg.model.name_or_path)
    if not name.startswith(("/", "./", "../", "~")) and not name.lower().endswith(".gguf"):
        return  # a Hub id or builtin: the loader says what is wrong with those
    if Path(name).expanduser().exists():
        return
    where = Path(run_dir) / CONFIG_FILE
    raise UserError(
        f"the run's base model {name} is not there any more (moved or deleted after training); the "
        f"adapter in {run_dir} needs it",
        hint=f"put it back, or set model.name_or_path in {where} to where it is now",
    )


def trained_format(run_dir: Path) -> Optional[str]:
    """The data format the run trained on ('instruction', 'chat', 'text'), from its event log."""
    from core.events import read_events

    for ev in read_events(run_dir):
        if ev.get("event") == "data_prepared":
            return ev.get("format")
    return None


def render_prompt(tokenizer, cfg: RunConfig, prompt: str, history: Optional[list[dict]] = None,
                  kind: Optional[str] = None) -> str:
    """The text the model sees for a user turn, laid out the way its training data was."""
    from core.data import render_prompt as data_render_prompt

    messages = list(history or []) + [{"role": "user", "content": prompt}]
    return data_render_prompt(tokenizer, cfg.data, messages, kind=kind if kind in ("instruction", "chat") else None)


class ChatSession:
    """A base model with a run's adapter loaded, answering prompts."""

    def __init__(self, run_dir: str | Path, device: Optional[str] = None):
        quiet_transformers()  # before peft imports bitsandbytes, which logs as it loads
        from peft import PeftModel

        from core.model import load_base_model, load_tokenizer, pick_compute_dtype, resolve_model_source

        self.run_dir = Path(run_dir).resolve()
        if not (self.run_dir / CONFIG_FILE).is_file():
            raise UserError(f"{self.run_dir} is not a run directory (no {CONFIG_FILE})")
        self.cfg = RunConfig.from_toml(self.run_dir / CONFIG_FILE)
        self.adapter = adapter_dir(self.run_dir)
        self.kind = trained_format(self.run_dir)
        check_base_model(self.run_dir, self.cfg)
        source = resolve_model_source(self.cfg.model.name_or_path, self.cfg.model.revision)
        # Chat wherever there is room: the GPU if present, else the CPU (whatever the run planned).
        use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        self.device = {"type": "cuda", "index": 0, "bf16": torch.cuda.get_device_capability(0)[0] >= 8} if use_cuda \
            else {"type": "cpu", "index": None, "bf16": False}
        self.tokenizer = load_tokenizer(str(self.adapter), self.cfg) if (self.adapter / "tokenizer_config.json").is_file() \
            else load_tokenizer(source, self.cfg)
        compute = pick_compute_dtype(self.cfg.model.compute_dtype, self.device)
        base = load_base_model(source, self.cfg, self.device, compute=compute)
        if compute == "fp16":  # Gemma's activations overflow fp16 in generation as in training
            from core import fp16guard

            if fp16guard.needs_fp16_guard(base.config, self.cfg.model.fp16_guard)[0]:
                fp16guard.install(base, torch.float16)
        self.model = PeftModel.from_pretrained(base, str(self.adapter))
        self.model.eval()

    @torch.no_grad()
    def _generate(self, text: str, max_new_tokens: int, temperature: float) -> str:
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        dev = next(self.model.parameters()).device
        enc = {k: v.to(dev) for k, v in enc.items()}
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False)
        out = self.model.generate(**enc, **kwargs)
        new = out[0, enc["input_ids"].shape[1]:]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    def ask(self, prompt: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
            compare: bool = False, history: Optional[list[dict]] = None) -> dict:
        text = render_prompt(self.tokenizer, self.cfg, prompt, history, kind=self.kind)
        reply = {"response": self._generate(text, max_new_tokens, temperature)}
        if compare:
            with self.model.disable_adapter():
                reply["base"] = self._generate(text, max_new_tokens, temperature)
        return reply


def _write(out: IO[str], obj: dict) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def serve(run_dir: str | Path, stdin: IO[str], stdout: IO[str], compare: bool = False) -> int:
    """The JSON-lines protocol (see the module docstring)."""
    try:
        session = ChatSession(run_dir)
    except UserError as exc:
        _write(stdout, {"event": "error", "error": str(exc), "kind": "user"})
        return 2
    _write(stdout, {"event": "ready", "adapter": str(session.adapter), "model": session.cfg.model.name_or_path,
                    "device": session.device["type"]})
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as exc:
            _write(stdout, {"event": "error", "error": f"not a JSON object: {exc}", "kind": "user"})
            continue
        if req.get("cmd") == "quit":
            break
        prompt = req.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            _write(stdout, {"event": "error", "id": req.get("id"), "error": "missing 'prompt' (a non-empty string)",
                            "kind": "user"})
            continue
        try:
            reply = session.ask(
                prompt,
                max_new_tokens=int(req.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
                temperature=float(req.get("temperature", 0.0)),
                compare=bool(req.get("compare", compare)),
                history=req.get("history"),
            )
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the session
            _write(stdout, {"event": "error", "id": req.get("id"), "error": f"{type(exc).__name__}: {exc}",
                            "kind": "internal"})
            continue
        _write(stdout, {"event": "reply", "id": req.get("id"), **reply})
    return 0


def interactive(run_dir: str | Path, compare: bool = False, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                temperature: float = 0.0) -> int:
    """A terminal chat: type a prompt, read the answer (and the base model's, with compare)."""
    print("loading the model and adapter ...", file=sys.stderr)
    session = ChatSession(run_dir)
    print(f"chatting with {session.cfg.model.name_or_path} + {session.adapter}  (empty line or Ctrl-D ends)",
          file=sys.stderr)
    while True:
        try:
            prompt = input("you> ")
        except EOFError:
            print()
            return 0
        if not prompt.strip():
            return 0
        reply = session.ask(prompt, max_new_tokens=max_new_tokens, temperature=temperature, compare=compare)
        print(f"tuned> {reply['response'] or EMPTY_REPLY}")
        if compare:
            print(f"base > {reply['base'] or EMPTY_REPLY}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.chat", description="chat with a run's adapter over JSON lines")
    p.add_argument("run_dir")
    p.add_argument("--compare", action="store_true", help="also answer with the base model (adapter off)")
    args = p.parse_args(argv)
    # stdout carries the protocol alone: whatever a library prints goes to stderr instead.
    protocol = sys.stdout
    sys.stdout = sys.stderr
    return serve(args.run_dir, sys.stdin, protocol, compare=args.compare)


if __name__ == "__main__":
    sys.exit(main())
