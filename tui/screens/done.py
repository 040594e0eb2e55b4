"""Step 6: where the adapter is, a quick chat with it (the base model beside it where memory
allows), export (merged 16-bit weights, a GGUF, an Ollama folder), and saving the setup as a preset."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import ModalScreen
from textual.widgets import Checkbox, Input, OptionList, RichLog, Static

from tui.messages import ChatReply, JobDone
from tui.screens.base import Cancelled, StepScreen, run_command, subprocess_env
from tui.widgets.onoff import OnOff
from tui.keyorder import focus_now

# Loading a model for chat takes seconds on a GPU, longer on the CPU; a reply longer than this
# means the chat process is stuck, and the user is told so rather than waiting forever.
CHAT_REPLY_TIMEOUT_S = 600
EXPORT_TIMEOUT_S = 3600  # merging a 3B model on a slow disk takes minutes
# A quick check of what the adapter learned, not an essay: 64 new tokens answer in about a second
# on 2 CPU cores for the demo model; the CLI's 128 and the base model's answer beside it took the
# wizard 120-140 s per prompt with a random-init base writing to the cap (issue 14).
CHAT_MAX_NEW_TOKENS = 64


def chat_request(prompt: str, compare: bool, request_id: int) -> dict:
    """One request line of core.chat's protocol."""
    return {"prompt": prompt, "compare": compare, "id": request_id, "max_new_tokens": CHAT_MAX_NEW_TOKENS}


class ChatProcess:
    """`python -m core.chat RUN_DIR` speaking JSON lines (protocol in core/chat.py): it says
    {"event": "ready"} once the model is loaded, then answers each {"prompt", "compare", "id"}
    line with {"event": "reply", "id", "response", "base"} or {"event": "error", "error"}."""

    def __init__(self, run_dir: Path):
        # stderr (loading bars, warnings) to a file: an unread pipe would fill and block the process
        self.log_path = run_dir / "chat.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "core.chat", str(run_dir)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                                         env=subprocess_env())
        self.lock = threading.Lock()
        self.next_id = 0
        self.ready = False

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                try:
                    err = self.log_path.read_text(encoding="utf-8", errors="replace")
                except OSError:
                    err = ""
                lines = [ln for ln in err.strip().splitlines() if ln.strip()]
                raise RuntimeError(lines[-1] if lines else "the chat process ended")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library printing to stdout; the protocol lines are JSON
            if isinstance(obj, dict):
                return obj

    def ask(self, prompt: str, compare: bool) -> dict:
        """Send one prompt; return the reply (`response`, and `base` with compare) or an error."""
        with self.lock:
            assert self.proc.stdin is not None
            if not self.ready:
                first = self._read()
                if first.get("event") == "error":
                    return first
                self.ready = True
            self.next_id += 1
            self.proc.stdin.write(json.dumps(chat_request(prompt, compare, self.next_id)) + "\n")
            self.proc.stdin.flush()
            while True:
                obj = self._read()
                if obj.get("event") == "error" or obj.get("id") == self.next_id:
                    return obj

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


class DoneScreen(StepScreen):
    STEP = 5
    BINDINGS = StepScreen.BINDINGS + [
        Binding("ctrl+e", "export", "Export", priority=True),
        Binding("ctrl+l", "app.runs", "Runs", priority=True),
    ]

    def compose_body(self):
        yield Static("", id="adapter-info", markup=False)
        yield OnOff("Base model's answer beside it (adapter switched off, twice the wait)",
                    value=self.compare_default(), id="compare", compact=True)
        with Horizontal(id="chat-logs"):
            yield RichLog(id="chat-adapter", wrap=True, markup=False)
            yield RichLog(id="chat-base", wrap=True, markup=False)
        yield Input(placeholder="Ask the fine-tuned model something; Enter sends", id="chat-input", compact=True)

    def compare_default(self) -> bool:
        # Off: the base model's answer doubles the wait (on the CPU, a random-init base writes to
        # the token cap every time). One key away for those who want it.
        return False

    def on_mount(self) -> None:
        self.chat: ChatProcess | None = None
        run_dir = self.app.run_dir
        result = self.app.run_result or {}
        # where the run folder is now (one renamed or moved since keeps its old path in the event)
        adapter = str(run_dir / "adapter") if run_dir else result.get("adapter_path")
        info = Text()
        info.append("Adapter saved in ", style="bold")
        info.append(str(adapter), style="bold underline")
        bits = []
        if result.get("steps") is not None:
            from tui.screens.base import plural

            bits.append(plural(result["steps"], "step"))
        if isinstance(result.get("final_loss"), (int, float)):
            bits.append(f"final loss {result['final_loss']:.4f}")
        if result.get("runtime_s") is not None:
            from tui.screens.base import fmt_duration

            bits.append(f"{fmt_duration(result['runtime_s'])}")
        if bits:
            info.append("\n" + " · ".join(bits), style="dim")
        if run_dir:
            info.append(f"\nfrom a shell: snugtune chat {run_dir.name}", style="dim")
        self.query_one("#adapter-info", Static).update(info)
        self.query_one("#chat-adapter", RichLog).border_title = "fine-tuned"
        self.query_one("#chat-base", RichLog).border_title = "base model"
        self._show_compare(self.query_one("#compare", Checkbox).value)
        focus_now(self.query_one("#chat-input", Input))
        self.set_status("Enter: send a prompt · ctrl+e: export · ctrl+s: save as preset")

    def on_unmount(self) -> None:
        if self.chat is not None:
            self.chat.close()

    @on(Checkbox.Changed, "#compare")
    def _compare(self, event: Checkbox.Changed) -> None:
        self._show_compare(event.value)

    def _show_compare(self, on_: bool) -> None:
        self.query_one("#chat-base", RichLog).display = on_

    # ---- chat ------------------------------------------------------------------------

    @on(Input.Submitted, "#chat-input")
    def _ask(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt or self.app.run_dir is None:
            return
        event.input.value = ""
        for log_id in ("#chat-adapter", "#chat-base"):
            log = self.query_one(log_id, RichLog)
            log.write(Text(f"> {prompt}", style="bold"))
        loaded = self.chat is not None and self.chat.ready and self.chat.proc.poll() is None
        self.set_status("thinking…" if loaded else "loading the model for chat, then answering…")
        self.ask(prompt, self.query_one("#compare", Checkbox).value)

    @work(thread=True, exit_on_error=False, name="chat", exclusive=False, group="chat")
    def ask(self, prompt: str, compare: bool) -> None:
        if self.chat is None or self.chat.proc.poll() is not None:
            self.chat = ChatProcess(self.app.run_dir)
        try:
            reply = self.chat.ask(prompt, compare)
        except (RuntimeError, OSError) as exc:
            self.chat = None
            self.post_message(ChatReply("adapter", "", error=str(exc)))
            return
        if reply.get("event") == "error":
            self.post_message(ChatReply("adapter", "", error=str(reply.get("error"))))
            return
        self.post_message(ChatReply("adapter", str(reply.get("response", ""))))
        if compare and reply.get("base") is not None:
            self.post_message(ChatReply("base", str(reply["base"])))

    @on(ChatReply)
    def _reply(self, msg: ChatReply) -> None:
        if msg.error:
            self.set_status(f"chat: {msg.error}", "error")
            return
        from core.runs import EMPTY_REPLY

        target = "#chat-base" if msg.who == "base" else "#chat-adapter"
        self.query_one(target, RichLog).write(Text(msg.text) if msg.text.strip() else Text(EMPTY_REPLY, style="dim"))
        self.set_status("answered · Enter: ask again · ctrl+e: export · ctrl+s: save as preset")

    # ---- export ------------------------------------------------------------------------
    # Merged weights, a GGUF (quant choice, estimated size) or an Ollama folder, written by
    # `snugtune export` in a subprocess (core/export.py); its progress lines are shown as they
    # come. Nothing is overwritten: a destination that exists is refused before anything starts.

    def action_export(self) -> None:
        if self.app.run_dir is None:
            return
        self.app.push_screen(ExportChoiceScreen(self.app.run_dir), self._export_choice)

    def _export_choice(self, choice: tuple[str, str] | None) -> None:
        from tui.screens.modals import PromptScreen

        if not choice:
            return
        kind, quant = choice
        run_dir = self.app.run_dir
        default = free_path({"merged": run_dir / "merged", "gguf": run_dir / f"{run_dir.name}-{quant}.gguf",
                             "ollama": run_dir / "ollama"}[kind])
        what = {"merged": "the merged 16-bit model to (a new directory)",
                "gguf": f"the {quant} GGUF to (a new file)",
                "ollama": f"the Ollama folder ({quant} GGUF + Modelfile) to (a new directory)"}[kind]
        self.app.push_screen(PromptScreen(f"Write {what}", "a path that does not exist yet", value=str(default)),
                             lambda d: self.export(kind, quant, d) if d else None)

    @work(thread=True, exit_on_error=False, name="export", exclusive=True, group="export")
    def export(self, kind: str, quant: str, destination: str) -> None:
        from textual.worker import get_current_worker

        dest = Path(destination).expanduser()
        if dest.exists():
            self.post_message(JobDone("export", False, f"{dest} already exists; choose a new name"))
            return
        self.post_message(JobDone("export-started", True, str(dest)))
        cmd = [sys.executable, "-m", "tui.cli", "export", str(self.app.run_dir), f"--{kind}", str(dest)]
        if kind != "merged":
            cmd += ["--quant", quant]
        log_path = self.app.run_dir / "export.log"
        worker = get_current_worker()
        with open(log_path, "ab") as log:
            start = log.tell()
            # its own session: an export the wizard quits during finishes on its own (a
            # half-written model is worse), and its output goes to a file nothing has to drain
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                    env=subprocess_env())
        self.app.export_job = (proc, dest, log_path)  # said on quit while it runs (tui.app.still_running_note)
        deadline = time.monotonic() + EXPORT_TIMEOUT_S
        seen = start
        while True:
            done = proc.poll() is not None
            try:
                with open(log_path, "rb") as fh:
                    fh.seek(seen)
                    chunk = fh.read()
            except OSError:
                chunk = b""
            if chunk:
                seen += len(chunk)
                lines = [ln for ln in chunk.decode(errors="replace").splitlines() if ln.strip()]
                if lines and not done:
                    self.post_message(JobDone("export-progress", True, lines[-1].strip()))
            if done:
                break
            if worker.is_cancelled:
                return
            if time.monotonic() > deadline:
                stop_export(proc)
                self.post_message(JobDone("export", False, f"export took over {EXPORT_TIMEOUT_S}s and was stopped"))
                return
            worker.cancelled_event.wait(0.3)
        text = log_path.read_bytes()[start:].decode(errors="replace")
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        if proc.returncode != 0:
            self.post_message(JobDone("export", False, export_error(lines, proc.returncode)))
        else:
            run_line = next((ln.strip() for ln in lines if ln.strip().startswith(("ollama create", "run it:"))), "")
            self.post_message(JobDone("export", True, str(dest), extra={"run": run_line}))

    @on(JobDone)
    def _job(self, msg: JobDone) -> None:
        if msg.what == "export-started":
            self.set_status(f"exporting to {msg.output}…")
        elif msg.what == "export-progress":
            self.set_status(f"exporting: {msg.output}")
        elif msg.ok:
            run = (msg.extra or {}).get("run")
            self.set_status(f"exported: {msg.output}" + (f" · {run}" if run else ""), "ok")
        else:
            self.set_status(f"export failed: {msg.output}", "error")


def _size_label(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "size unknown"
    return f"~{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"~{n_bytes / 1e6:.0f} MB"


def export_sizes(run_dir: Path) -> dict[str, int | None]:
    """Estimated bytes of each export, from the parameter count the run logged (no torch here)."""
    from core.events import read_events
    from core.gguf_export import QUANTS, estimate_size_bytes

    n = embed = None
    for ev in read_events(run_dir):
        if ev.get("event") == "run_started":
            model = ev.get("model") or {}
            n = model.get("total_params")
            if n is not None:
                n -= int(model.get("trainable_params") or 0)  # the adapter merges into the weights it sits on
            try:
                cfg = json.loads((Path(model["source"]) / "config.json").read_text(encoding="utf-8"))
                embed = int(cfg["vocab_size"]) * int(cfg["hidden_size"])
            except (KeyError, OSError, ValueError, TypeError):
                embed = None
    sizes: dict[str, int | None] = {"merged": None if n is None else 2 * n}
    for q in QUANTS:
        sizes[q] = None if n is None else estimate_size_bytes(n, q, embed or 0)
    return sizes


# How long an interrupted export has to remove its temporary files before it is killed.
EXPORT_STOP_GRACE_S = 60.0


def stop_export(proc, grace_s: float = EXPORT_STOP_GRACE_S) -> None:
    """Stop an export: SIGINT first (its own session, so its group), on which it removes the
    half-written files it holds (core.export); SIGKILL, which was all it got, left them."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_path(p: Path) -> Path:
    """`p`, or `merged-2`, `x-q4_k_m-2.gguf` ... when it is taken: the second export of a run
    offered the first one's path, which the export then refused (it never overwrites)."""
    n = 2
    candidate = p
    while candidate.exists() or candidate.is_symlink():
        candidate = p.with_name(f"{p.name.removesuffix(p.suffix)}-{n}{p.suffix}" if p.suffix == ".gguf"
                                else f"{p.name}-{n}")
        n += 1
    return candidate


def export_error(lines: list[str], returncode: int) -> str:
    """The export's one message with its hint (`snugtune: error: X` then `  hint: Y`, as the CLI
    prints a UserError), without the CLI's prefix: the hint is how to fix it (for a GGUF without
    llama.cpp, the pip command), and the wizard dropped it."""
    for i, line in enumerate(lines):
        if line.startswith("snugtune: error:"):
            said = line[len("snugtune: error:"):].strip()
            hint = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].strip().startswith("hint:") else ""
            return said + (f" · {hint}" if hint else "")
    return lines[-1] if lines else f"exit code {returncode}"


class ExportChoiceScreen(ModalScreen):
    """What to export: merged weights, a GGUF at a chosen quant, or an Ollama folder."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    CHOICES = [
        ("gguf:q4_k_m", "GGUF q4_k_m: llama.cpp, LM Studio (the usual choice)", "q4_k_m"),
        ("gguf:q5_k_m", "GGUF q5_k_m: a little larger, a little closer to the original", "q5_k_m"),
        ("gguf:q8_0", "GGUF q8_0: near-lossless", "q8_0"),
        ("gguf:f16", "GGUF f16: unquantized", "f16"),
        ("ollama:q4_k_m", "Ollama folder: q4_k_m GGUF + Modelfile", "q4_k_m"),
        ("merged:bf16", "Merged 16-bit weights (safetensors, for transformers / vLLM)", "merged"),
    ]

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    def compose(self):
        from textual.containers import Vertical
        from textual.widgets import Footer, Label, OptionList
        from textual.widgets.option_list import Option

        try:
            sizes = export_sizes(self.run_dir)
        except Exception:  # an unreadable event log: offer the exports without sizes
            sizes = {}
        with Vertical(classes="dialog"):
            yield Label("Export the fine-tuned model as", classes="dialog-title")
            yield OptionList(*[Option(f"{label}  ({_size_label(sizes.get(key))})", id=cid)
                               for cid, label, key in self.CHOICES], id="export-choice")
            yield Static("Enter: choose · Escape: cancel · GGUF needs pip install 'snugtune[gguf]'", classes="hint",
                         markup=False)  # "[gguf]" read as markup was dropped: "pip install 'snugtune'"
        yield Footer()

    @on(OptionList.OptionSelected, "#export-choice")
    def _chosen(self, event) -> None:
        kind, _, quant = str(event.option.id).partition(":")
        self.dismiss((kind, quant))

    def action_cancel(self) -> None:
        self.dismiss(None)
