"""Export a run: 16-bit merged weights, a GGUF for llama.cpp / LM Studio, or an Ollama folder.

All three start the same way: the base model is reloaded (not in 4-bit: merging into quantized
weights would round the adapter away), the adapter applied and merged (`merge_and_unload`).

- merged: saved with its tokenizer in the run's 16-bit dtype (below), normal file modes.
- GGUF: converted by core.gguf_export (snugtune's converter on llama.cpp's gguf-py), carrying
  the chat template the run trained with, then quantized by llama.cpp's own quantizer.
- Ollama: that GGUF plus a Modelfile (TEMPLATE in Ollama's syntax, PARAMETER stop, SYSTEM).

The 16-bit dtype: the run's compute dtype when it trained in bf16 or fp16 (the GPU's choice);
a CPU run trains in fp32, and then the base checkpoint's own 16-bit dtype is used, or bf16
when the checkpoint is fp32 (the demo model): bf16 keeps fp32's exponent range, so no weight
can overflow, and it is what released checkpoints of the supported models are in.

Every output is written under a temporary name beside its destination and renamed at the end,
so a destination that exists is complete; an existing destination is never overwritten; a
failure (a full disk) removes the temporary file.
"""
from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from core.config import RunConfig
from core.errors import UserError
from core.runs import CONFIG_FILE, file_size_limit, share_modes, umask_mode

Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _refuse_existing(*paths: Optional[Path]) -> None:
    for p in paths:
        if p is not None and (p.exists() or p.is_symlink()):
            raise UserError(f"{p} already exists; snugtune does not overwrite it",
                            hint="choose a new name, or remove the old one yourself")
        if p is not None and not p.parent.is_dir():
            raise UserError(f"the directory {p.parent} does not exist", hint="create it first, or choose another place")
        if p is not None:
            _probe_writable(p.parent)


def _probe_writable(folder: Path) -> None:
    """Write and remove an empty file in `folder`, before minutes of merging and converting: a
    read-only mount or a folder without write permission was a traceback at the very end (the
    probe, not os.access: root passes every permission check, not a read-only filesystem)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".snugtune-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        if _os_errno(exc) in (errno.ENOSPC, errno.EDQUOT):
            return  # a full disk is said by the write itself, with its figures and exit code 4
        raise UserError(f"cannot write in {folder} ({exc.strerror or exc})",
                        hint="choose a folder you can write to (an export is written beside its final name "
                        "and renamed)") from None


class DiskFullError(UserError):
    """The disk (or a limit on file size) stopped a write; exit code 4, as for a training run."""

    exit_code = 4


def _os_errno(exc: BaseException) -> Optional[int]:
    """The errno of an OSError, or the one safetensors' Rust writer names in its message
    (`SafetensorError: ... I/O error: No space left on device (os error 28)`)."""
    import re

    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    m = re.search(r"os error (\d+)", str(exc))
    return int(m.group(1)) if m else None


def _disk_error(exc: BaseException, where: Path) -> UserError:
    import errno

    code = _os_errno(exc)
    # a write that ended short ("524288 requested and 240200 written") carries no errno: the
    # disk filled, or the file reached the size limit
    short = code is None and "requested and" in str(exc)
    try:
        free = shutil.disk_usage(where.parent).free
    except OSError:
        free = None
    limit = file_size_limit()
    left = "; nothing was left behind"
    if code in (errno.ENOSPC, errno.EDQUOT) or (short and free is not None and free < 2**26):
        said = f" ({free / 2**20:,.0f} MB free)" if free is not None else ""
        return DiskFullError(f"the disk holding {where} is full{said}{left}",
                             hint="free some space or export somewhere else")
    if code == errno.EFBIG or (short and limit is not None):
        lim = f" ({limit / 2**20:,.0f} MB, `ulimit -f`)" if limit is not None else ""
        return DiskFullError(f"cannot write {where}: the file is larger than this system lets a file be{lim}{left}",
                             hint="raise the limit (`ulimit -f unlimited`), or export to a filesystem that takes "
                             "large files (FAT32 stops at 4 GiB)")
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return UserError(f"cannot write {where} ({why}){left}")


def _is_write_error(exc: BaseException) -> bool:
    """An OSError, or safetensors' own error type for a failed write (it is no OSError)."""
    return isinstance(exc, OSError) or (type(exc).__name__ == "SafetensorError" and _os_errno(exc) is not None)


def _check_space(where: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(where).free
    if free < need_bytes:
        raise UserError(f"{where} has {free / 2**30:.1f} GiB free; this export needs about {need_bytes / 2**30:.1f} GiB",
                        hint="free some space or export somewhere else")


# ---- loading and merging ------------------------------------------------------------------------


@dataclass
class Merged:
    model: object
    tokenizer: object
    cfg: RunConfig
    run_dir: Path
    adapter: Path
    dtype: str  # "bf16" or "fp16": what --merged writes
    kind: Optional[str]  # the trained data format: instruction, chat, text


def sixteen_bit_dtype(run_dir: Path, cfg: RunConfig, base_config: dict) -> str:
    """'bf16' or 'fp16': the run's compute dtype, else (fp32 CPU runs) the checkpoint's 16-bit dtype, else bf16."""
    from core.events import read_events

    compute = None
    for ev in read_events(run_dir):
        if ev.get("event") == "run_started":
            compute = (ev.get("model") or {}).get("compute_dtype") or compute
    if compute is None and cfg.model.compute_dtype in ("bf16", "fp16"):
        compute = cfg.model.compute_dtype
    if compute in ("bf16", "fp16"):
        return compute
    own = str(base_config.get("dtype") or base_config.get("torch_dtype") or "")
    return "fp16" if own in ("float16", "fp16") else "bf16"


def quiet_transformers() -> None:
    from core.chat import quiet_transformers as quiet

    quiet()


def load_merged(run_dir: str | Path, progress: Progress = _stderr, full_precision: bool = False) -> Merged:
    """The run's adapter merged into its base. full_precision: keep the checkpoint's own
    dtype (fp32 for the demo) instead of casting to the 16-bit export dtype, for the GGUF
    path, which rounds once to its own type."""
    quiet_transformers()
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.chat import adapter_dir, check_base_model, trained_format
    from core.model import load_tokenizer, resolve_model_source

    run_dir = Path(run_dir).resolve()
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    cfg = RunConfig.from_toml(run_dir / CONFIG_FILE)
    adapter = adapter_dir(run_dir)
    if adapter.name != "adapter":
        progress(f"run {run_dir.name} has not finished: exporting its newest checkpoint ({adapter.name})")
    check_base_model(run_dir, cfg)
    source = resolve_model_source(cfg.model.name_or_path, cfg.model.revision)
    base_cfg = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code).to_dict()
    dtype = sixteen_bit_dtype(run_dir, cfg, base_cfg)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    progress(f"merging the adapter ({adapter.relative_to(run_dir)}) into {cfg.model.name_or_path} ...")
    # dtype "auto": the checkpoint's own dtype, on the CPU, so a merge never competes with a
    # training run for GPU memory.
    base = AutoModelForCausalLM.from_pretrained(source, revision=cfg.model.revision, dtype="auto",
                                                trust_remote_code=cfg.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    if not full_precision:
        merged = merged.to(torch_dtype)
    merged.config.torch_dtype = torch_dtype if not full_precision else merged.dtype
    tok = load_tokenizer(str(adapter) if (adapter / "tokenizer_config.json").is_file() else source, cfg)
    return Merged(merged, tok, cfg, run_dir, adapter, dtype, trained_format(run_dir))


def _tmp_beside(dest: Path, is_dir: bool) -> Path:
    try:
        if is_dir:
            return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        if _os_errno(exc) in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"cannot write in {dest.parent} ({exc.strerror or exc})",
                        hint="choose a folder you can write to") from None
    os.close(fd)
    return Path(name)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextmanager
def _staged_dir(out_dir: Path):
    """A temporary folder beside out_dir to write into; renamed to out_dir (normal file modes)
    when the block ends, removed when it fails: an out_dir that exists is complete."""
    tmp = _tmp_beside(out_dir, is_dir=True)
    try:
        yield tmp
        share_modes(tmp)
        tmp.rename(out_dir)
    except BaseException as exc:
        _remove(tmp)
        if _is_write_error(exc):
            raise _disk_error(exc, out_dir) from None
        raise


# ---- merged -------------------------------------------------------------------------------------


def save_merged(m: Merged, out_dir: Path, progress: Progress = _stderr) -> Path:
    import torch

    out_dir = Path(out_dir).expanduser().resolve()
    _refuse_existing(out_dir)
    n_bytes = sum(p.numel() for p in m.model.parameters()) * 2
    _check_space(out_dir.parent, n_bytes + 2**26)
    model = m.model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[m.dtype])
    progress(f"writing {out_dir} ({m.dtype}) ...")
    with _staged_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        m.tokenizer.save_pretrained(str(tmp))
    return out_dir


def export_merged(run_dir: str | Path, out_dir: str | Path, progress: Progress = _stderr) -> Path:
    out_dir = Path(out_dir).expanduser().resolve()
    _refuse_existing(out_dir)
    return save_merged(load_merged(run_dir, progress), out_dir, progress)


# ---- the chat template a GGUF carries -----------------------------------------------------------


@dataclass
class Template:
    jinja: Optional[str]  # for tokenizer.chat_template
    go: str  # for an Ollama Modelfile
    stops: list[str]  # texts generation ends at
    eot_id: Optional[int]  # a turn-end token other than EOS, for tokenizer.ggml.eot_token_id
    system_ok: bool = True  # the Go template renders system messages


def _render(tok, msgs, gen):
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def _go_escape(s: str) -> str:
    if "{{" in s or "}}" in s:
        raise ValueError("template text holds braces")
    return s


def go_from_chat_template(tok) -> tuple[str, bool, str]:
    """Ollama's Go-template form of a tokenizer's Jinja chat template, found by rendering probe
    conversations and cutting the text around each message: a head (with the system prompt, or
    the template's default when there is none, as Qwen's has), then PRE content SUF per user and
    assistant message, then the generation prompt. The system prompt is taken from Ollama's
    `.System` (the SYSTEM line or the conversation's system messages), not from the messages.
    A template with no system turn of its own that folds the system prompt into the first user
    turn (Gemma's: `<start_of_turn>user\n{system}\n\n{user}<end_of_turn>`) is found the same
    way, from where the probe's system text lands, and its Go form puts `$.System` there, in the
    first user message, with the same text around it.
    The result is checked against the Jinja rendering of a longer conversation, with and without
    a system prompt: a template that does more (drops earlier reasoning) raises ValueError; one
    whose system prompt fits neither layout (Mistral's, in the last user turn) renders without
    system prompts (the returned flag False). Third: the text that ends an assistant turn."""
    U1, A1, U2, A2, U3, S1 = "\x01u1\x01", "\x01a1\x01", "\x01u2\x01", "\x01a2\x01", "\x01u3\x01", "\x01s1\x01"
    u1 = [{"role": "user", "content": U1}]
    ua = u1 + [{"role": "assistant", "content": A1}]
    uau = ua + [{"role": "user", "content": U2}]
    a = _render(tok, u1, False)
    g = _render(tok, u1, True)
    b = _render(tok, ua, False)
    d = _render(tok, uau, False)
    if not (g.startswith(a) and b.startswith(a) and d.startswith(b)):
        raise ValueError("the template is not append-only")
    gen = g[len(a):]
    pre_u, _, suf_u = d[len(b):].partition(U2)
    head_pre, _, suf_u0 = a.partition(U1)
    if suf_u0 != suf_u or not head_pre.endswith(pre_u):
        raise ValueError("user turns render differently")
    head = head_pre[: len(head_pre) - len(pre_u)]
    pre_a, _, suf_a = b[len(a):].partition(A1)
    sys_head = None  # (before, S1, after): the system prompt in a head of its own
    sys_fold = None  # (before, S1, after): the system prompt inside the first user turn, before its text
    try:
        s = _render(tok, [{"role": "system", "content": S1}] + u1, False)
        tail = pre_u + U1 + suf_u
        if s.count(S1) == 1:
            if s.endswith(tail) and S1 in s[: len(s) - len(tail)]:
                sys_head = s[: len(s) - len(tail)].partition(S1)
            elif s.startswith(head_pre) and s.endswith(U1 + suf_u):
                middle = s[len(head_pre): len(s) - len(U1 + suf_u)]
                if S1 in middle:
                    sys_fold = middle.partition(S1)
    except Exception:  # noqa: BLE001 - jinja raising on a system message: the template has no system role
        pass

    def emulate(msgs, gen_prompt=True):
        # what the Go template below renders, with Ollama's .System: the system messages' text
        system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
        out = (sys_head[0] + system + sys_head[2]) if system and sys_head else head
        first = True
        for m in msgs:
            if m["role"] == "user":
                fold = (sys_fold[0] + system + sys_fold[2]) if system and sys_fold and first else ""
                out += pre_u + fold + m["content"] + suf_u
                first = False
            elif m["role"] != "system":
                out += pre_a + m["content"] + suf_a
        return out + (gen if gen_prompt else "")

    probe = uau + [{"role": "assistant", "content": A2}, {"role": "user", "content": U3}]
    if emulate(probe) != _render(tok, probe, True):
        raise ValueError("a longer conversation renders differently")
    system_ok = sys_head is not None or sys_fold is not None
    if system_ok:
        sp = [{"role": "system", "content": S1}] + probe
        system_ok = emulate(sp) == _render(tok, sp, True)
    bos = tok.bos_token or ""

    def no_bos(text: str) -> str:
        # llama.cpp and Ollama put BOS in front themselves (tokenizer.ggml.add_bos_token)
        return _go_escape(text[len(bos):] if bos and text.startswith(bos) else text)

    fold = ""
    if system_ok and sys_head is not None:
        start = (f"{{{{ if .System }}}}{no_bos(sys_head[0])}{{{{ .System }}}}{_go_escape(sys_head[2])}"
                 f"{{{{ else }}}}{no_bos(head)}{{{{ end }}}}")
    elif system_ok:
        # .Messages holds the system messages too (Ollama's SYSTEM line is one, put first), and
        # inside range the dot is a message: the prompt is $.System. $first marks the first user
        # message (Go's text/template has had assignment with = since Go 1.11).
        start = "{{ $first := true }}" + no_bos(head)
        fold = (f"{{{{ if $first }}}}{{{{ if $.System }}}}{_go_escape(sys_fold[0])}{{{{ $.System }}}}"
                f"{_go_escape(sys_fold[2])}{{{{ end }}}}{{{{ $first = false }}}}{{{{ end }}}}")
    else:
        start = no_bos(head)
    go = (f'{start}{{{{ range .Messages }}}}'
          f'{{{{ if eq .Role "user" }}}}{_go_escape(pre_u)}{fold}{{{{ .Content }}}}{_go_escape(suf_u)}'
          f'{{{{ else if eq .Role "assistant" }}}}{_go_escape(pre_a)}{{{{ .Content }}}}{_go_escape(suf_a)}{{{{ end }}}}'
          f'{{{{ end }}}}{_go_escape(gen)}')
    return go, system_ok, suf_a


def trained_template(m: Merged) -> Template:
    """The chat template, Ollama template and stop texts matching how the run's data was rendered."""
    from core.data import DataFormat, template_name
    from core.gguf_export import builtin_go_template, builtin_jinja

    tok = m.tokenizer
    eos = tok.eos_token or ""
    kind = m.kind if m.kind in ("instruction", "chat", "text") else (
        m.cfg.data.format if m.cfg.data.format in ("instruction", "chat", "text") else "chat")
    if kind == "text":
        return Template(getattr(tok, "chat_template", None), "{{ .Prompt }}", [eos] if eos else [], None)
    if template_name(DataFormat(kind, {}, ""), tok, m.cfg.data) == "chat_template":
        stops = [eos] if eos else []
        eot = None
        try:
            go, system_ok, suf_a = go_from_chat_template(tok)
        except Exception:  # noqa: BLE001 - ValueError from the checks, or the template's own jinja errors: no Ollama TEMPLATE (save_ollama says so)
            go, system_ok, suf_a = None, False, ""
            try:  # the end-of-turn marker still matters to the GGUF
                conv = [{"role": "user", "content": "\x01u\x01"}, {"role": "assistant", "content": "\x01a\x01"}]
                suf_a = _render(tok, conv, False).partition("\x01a\x01")[2]
            except Exception:  # noqa: BLE001
                pass
        for t in tok.all_special_tokens:
            if t and t in suf_a and t not in stops:
                stops.append(t)
                if t != eos and eot is None:
                    eot = tok.convert_tokens_to_ids(t)
        return Template(tok.chat_template, go, stops, eot, system_ok)
    return Template(builtin_jinja(kind, eos), builtin_go_template(kind, eos), [eos] if eos else [], None)


def data_system_prompt(cfg: RunConfig) -> Optional[str]:
    """The system prompt most of the training samples carry, if any (for Ollama's SYSTEM)."""
    try:
        from core.data import detect_format, load_records, to_messages

        records = load_records(cfg.data)
        fmt = detect_format(records, cfg.data)
        counts = collections.Counter()
        for r in records[:2000]:
            msgs = to_messages(r, fmt)
            if msgs and msgs[0]["role"] == "system" and msgs[0]["content"].strip():
                counts[msgs[0]["content"]] += 1
        if counts:
            text, n = counts.most_common(1)[0]
            if n * 2 >= min(len(records), 2000):
                return text
    except (UserError, OSError, KeyError, ValueError):
        return None  # the data moved or changed since training: no SYSTEM line, nothing else lost
    return None


# ---- GGUF and Ollama ------------------------------------------------------------------------------


def save_gguf(m: Merged, out_path: Path, quant: str = "q4_k_m", progress: Progress = _stderr,
              template: Optional[Template] = None) -> Path:
    from core import gguf_export as ge

    if quant not in ge.QUANTS:
        raise UserError(f"--quant {quant!r} is not one of {', '.join(ge.QUANTS)}")
    out_path = Path(out_path).expanduser().resolve()
    _refuse_existing(out_path)
    config = m.model.config.to_dict()
    ge.check_convertible(config)
    if quant not in ("f16", "bf16"):
        ge.require_llama_cpp()  # before the long conversion, not after it
    template = template or trained_template(m)
    vocab = ge.read_vocab(m.tokenizer, int(config["vocab_size"]))
    vocab.chat_template = template.jinja
    if template.eot_id is not None:
        vocab.special["eot"] = int(template.eot_id)
    n_params = sum(p.numel() for p in m.model.parameters())
    import torch

    full = m.model.dtype == torch.float32
    # the 16-bit GGUF that llama.cpp quantizes from: f32 for an fp32 checkpoint (the demo), so
    # the weights are rounded once; the export dtype otherwise
    inter = quant if quant in ("f16", "bf16") else ("f32" if full else ("f16" if m.dtype == "fp16" else "bf16"))
    need = n_params * {"f32": 4, "f16": 2, "bf16": 2}[inter]
    if inter != quant:
        need += ge.estimate_size_bytes(n_params, quant)
    _check_space(out_path.parent, need + 2**26)
    tmp = _tmp_beside(out_path, is_dir=False)
    tmp_q = None
    try:
        state = m.model.state_dict()
        last = [0]

        def on_tensor(i, n):
            pct = 100 * i // n
            if pct >= last[0] + 10 or i == n:
                last[0] = pct
                progress(f"writing GGUF tensors: {i}/{n}")

        progress(f"converting to GGUF ({inter}) ...")
        ge.write_gguf(state, config, vocab, tmp, outtype=inter, name=m.run_dir.name,
                      on_tensor=on_tensor)
        del state
        if inter != quant:
            progress(f"quantizing to {quant} with llama.cpp ...")
            tmp_q = _tmp_beside(out_path, is_dir=False)
            for warning in ge.quantize(tmp, tmp_q, quant):
                # e.g. rows not a multiple of 256 cannot be k-quants: llama.cpp used another type there
                progress(f"llama.cpp: {warning}")
            tmp.unlink()
            tmp, tmp_q = tmp_q, None
        os.chmod(tmp, umask_mode(0o666))
        tmp.rename(out_path)
    except BaseException as exc:
        _remove(tmp)
        if tmp_q is not None:
            _remove(tmp_q)
        if _is_write_error(exc):
            raise _disk_error(exc, out_path) from None
        raise
    return out_path


def modelfile_text(gguf_name: str, template: Template, system: Optional[str]) -> str:
    def quoted(s: str) -> str:
        return '"""' + s.replace('"""', '\\"\\"\\"') + '"""'

    lines = [f"# written by snugtune: the run's weights and the chat layout it trained with", f"FROM ./{gguf_name}", ""]
    lines.append(f"TEMPLATE {quoted(template.go)}")
    for s in template.stops:
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    if system and template.system_ok:
        lines.append(f"SYSTEM {quoted(system)}")
    return "\n".join(lines) + "\n"


def _ollama_template(m: Merged) -> Template:
    template = trained_template(m)
    if template.go is None:
        raise UserError("the tokenizer's chat template cannot be written as an Ollama TEMPLATE",
                        hint="export --gguf and run it in llama.cpp or LM Studio, which read the template from the GGUF")
    return template


def save_ollama(m: Merged, out_dir: Path, quant: str = "q4_k_m", progress: Progress = _stderr,
                gguf_from: Optional[Path] = None) -> Path:
    """The GGUF and a Modelfile in a new folder. `gguf_from`: the same run's GGUF at the same
    quantization, just written by this export: linked (or copied) rather than converted and
    quantized a second time, which for an 8B model is minutes and gigabytes more."""
    out_dir = Path(out_dir).expanduser().resolve()
    _refuse_existing(out_dir)
    template = _ollama_template(m)
    with _staged_dir(out_dir) as tmp:
        gguf_name = "model.gguf"
        if gguf_from is not None:
            try:
                os.link(gguf_from, tmp / gguf_name)
            except OSError:  # another filesystem, or one without hard links (FAT32, some mounts)
                shutil.copyfile(gguf_from, tmp / gguf_name)
        else:
            save_gguf(m, tmp / gguf_name, quant, progress, template=template)
        (tmp / "Modelfile").write_text(modelfile_text(gguf_name, template, data_system_prompt(m.cfg)), encoding="utf-8")
    return out_dir


def ollama_name(run_dir: Path) -> str:
    import re

    return re.sub(r"[^a-z0-9._-]+", "-", run_dir.name.lower()).strip("-.") or "snugtune-model"


def export(run_dir: str | Path, merged: Optional[str] = None, gguf: Optional[str] = None,
           ollama: Optional[str] = None, quant: str = "q4_k_m", progress: Progress = _stderr,
           out: Callable[[str], None] = print) -> list[Path]:
    """Any of the three exports from one merge; prints what was written and how to run it."""
    from core import gguf_export as ge

    if not (merged or gguf or ollama):
        raise UserError("nothing to export", hint="give --merged DIR, --gguf FILE.gguf and/or --ollama DIR")
    if quant not in ge.QUANTS:
        raise UserError(f"--quant {quant!r} is not one of {', '.join(ge.QUANTS)}")
    paths = [Path(p).expanduser().resolve() if p else None for p in (merged, gguf, ollama)]
    _refuse_existing(*paths)  # before loading anything heavy
    if (gguf or ollama) and quant not in ("f16", "bf16"):
        ge.require_llama_cpp()
    if gguf or ollama:
        ge._gguf()
    m = load_merged(run_dir, progress, full_precision=bool(gguf or ollama))
    written = []
    if gguf or ollama:
        ge.check_convertible(m.model.config.to_dict())
    if ollama:
        _ollama_template(m)  # refused before the GGUF is written, not after
    if paths[1]:
        written.append(save_gguf(m, paths[1], quant, progress))
        out(f"GGUF ({quant}): {paths[1]}  ({paths[1].stat().st_size / 1e6:.1f} MB)")
        out(f"  run it: llama-cli -m {paths[1]} -cnv   (or load the file in LM Studio)")
    if paths[2]:
        written.append(save_ollama(m, paths[2], quant, progress, gguf_from=paths[1]))
        out(f"Ollama folder: {paths[2]}")
        out(f"  ollama create {ollama_name(m.run_dir)} -f {paths[2] / 'Modelfile'}")
        out(f"  ollama run {ollama_name(m.run_dir)}")
    if paths[0]:
        written.append(save_merged(m, paths[0], progress))
        out(f"merged model: {paths[0]}  ({m.dtype})")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.export")
    p.add_argument("run")
    p.add_argument("--merged")
    p.add_argument("--gguf")
    p.add_argument("--ollama")
    p.add_argument("--quant", default="q4_k_m")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        export(args.run, args.merged, args.gguf, args.ollama, args.quant)
    except UserError as exc:
        print(f"snugtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
