"""Step 3: the training data — a file or Hub dataset, its format and columns, three samples as
the model sees them (prompt masked, response trained) and the token-length histogram."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.text import Text
from textual import on
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.suggester import Suggester
from textual.widgets import Input, Label, Select, Static

from core.config import field_help
from tui.messages import DataInspected
from tui.screens.base import Cancelled, StepScreen, attr, run_command
from tui.widgets.histogram import render_histogram
from tui.keyorder import focus_now

FORMATS = [("auto-detect", "auto"), ("instruction", "instruction"), ("chat", "chat"), ("segments", "segments"),
           ("text", "text")]
DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt"}
# A subprocess tokenizing a large file may take a while; beyond this the user is told and can retry.
INSPECT_TIMEOUT_S = 300


class PathSuggester(Suggester):
    """Completes file system paths as they are typed (→ or End accepts the suggestion)."""

    def __init__(self):
        super().__init__(use_cache=False, case_sensitive=True)

    async def get_suggestion(self, value: str) -> str | None:
        if not value or value.startswith("builtin:"):
            return None
        head, _, partial = value.rpartition("/")
        directory = Path(os.path.expanduser(head or ".")) if head or not value.startswith("/") else Path("/")
        try:
            names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
                           if p.name.startswith(partial) and not p.name.startswith("."))
        except OSError:
            return None
        if not names:
            return None
        return (head + "/" if head or value.startswith("/") else "") + names[0]


def parse_columns(text: str) -> dict[str, str]:
    """`instruction=question, output=answer` -> {'instruction': 'question', 'output': 'answer'}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{part!r} is not field=column (e.g. instruction=question)")
        mapping[key.strip()] = value.strip()
    return mapping


COLUMNS_PLACEHOLDER = "e.g. instruction=question, output=answer"


def data_suffix(p: Path) -> str:
    """`.jsonl` for `a.jsonl` and for `a.jsonl.gz` (read gzipped, as core.data.data_type says)."""
    ext = p.suffix.lower()
    if ext == ".gz" and Path(p.stem).suffix.lower() in DATA_SUFFIXES - {".parquet", ".arrow"}:
        return Path(p.stem).suffix.lower()
    return ext


def local_problem(path: str) -> str | None:
    """A path that is clearly meant as a local file but is not there (said before any subprocess)."""
    if path.startswith("builtin:"):
        return None
    p = Path(path).expanduser()
    looks_local = data_suffix(p) in DATA_SUFFIXES or path.startswith((".", "/", "~")) or p.exists()
    if looks_local and not p.exists():
        return f"{path}: no such file (check the path; → completes it as you type)"
    if p.is_dir():
        return None  # a directory of data files is one dataset (the reader says what is in it)
    if looks_local and data_suffix(p) not in DATA_SUFFIXES:
        from core.data import unknown_type_error  # torch-free: the reader's own message and its hint

        hint = unknown_type_error(p).hint
        return (f"{path}: unsupported file type {p.suffix or '(none)'}; use .jsonl, .json, .csv, .tsv, .parquet, "
                ".arrow or .txt" + (f"\n  hint: {hint}" if hint else ""))
    return None


def format_kind(report: dict) -> str:
    fmt = attr(report, "format", default="?")
    return str(attr(fmt, "kind", default="?")) if isinstance(fmt, dict) else str(fmt)


def format_columns(report: dict) -> dict[str, str]:
    """The detected mapping format field -> column (core.data.DataFormat.columns)."""
    fmt = attr(report, "format", default={})
    cols = attr(fmt, "columns", default={}) if isinstance(fmt, dict) else {}
    return dict(cols) if isinstance(cols, dict) else {}


MASKED_STYLE, TRAINED_STYLE = "dim", "bold underline"
MASKED_GUTTER, TRAINED_GUTTER = "· ", "▌ "


def _wrap_pieces(pieces: list[tuple[str, bool]], width: int | None) -> list[list[tuple[str, bool]]]:
    """One line of (text, trained) pieces as the visual lines of `width` cells (None: one line).

    Breaks after spaces where it can (a word longer than the width is cut), so each visual line can
    carry its own gutter: Rich's wrapping gave continued lines none, and under NO_COLOR (no dim)
    a continued prompt line read like trained text."""
    if width is None or width < 8 or cell_len("".join(t for t, _ in pieces)) <= width:
        return [pieces]
    chars = [(c, trained) for text, trained in pieces for c in text]
    lines: list[list[tuple[str, bool]]] = []
    start = 0
    while start < len(chars):
        used, end, brk = 0, start, None
        while end < len(chars) and used + cell_len(chars[end][0]) <= width:
            used += cell_len(chars[end][0])
            if chars[end][0] == " ":
                brk = end + 1
            end += 1
        if end < len(chars) and brk is not None and brk > start:
            end = brk
        end = max(end, start + 1)
        run: list[tuple[str, bool]] = []
        piece = chars[start:end]
        if end < len(chars) and len(piece) > 1 and piece[-1][0] == " ":
            piece = piece[:-1]  # the space a line breaks at is not drawn (underlined, it showed)
        for c, trained in piece:
            if run and run[-1][1] == trained:
                run[-1] = (run[-1][0] + c, trained)
            else:
                run.append((c, trained))
        lines.append(run)
        start = end
    return lines


def render_samples(samples: list[Any], width: int | None = None) -> Text:
    """Each sample as the model reads it: the prompt (masked, not learned) dim with a `·` gutter;
    the response (trained) bold and underlined with a `▌` gutter, so the two are told apart with
    colours, with 16 colours and with none. `width`: the cells a line may take; lines are wrapped
    here so that every visual line, a continued one too, starts with its gutter."""
    out = Text()
    body = None if width is None else width - len(MASKED_GUTTER)
    for n, sample in enumerate(samples):
        out.append(f"── sample {n + 1} ", style="bold")
        # the legend kept short: at 80 columns the box is about 42 cells wide
        out.append(f"({MASKED_GUTTER.strip()} read, {TRAINED_GUTTER.strip()} trained)\n" if n == 0 else "\n",
                   style="dim")
        context = attr(sample, "context", default=None)
        if isinstance(context, dict) and context:
            # what the sample holds besides its last exchange: system prompt, history, tool calls
            from core.data import context_summary

            out.append(f"  [{context_summary(context)}]\n", style="italic")
        segments = attr(sample, "segments", default=None)
        if segments is None:
            segments = [{"text": str(attr(sample, "text", default=sample)), "trained": True}]
        # the sample's text as lines of (text, trained) pieces
        lines: list[list[tuple[str, bool]]] = [[]]
        for seg in segments:
            trained = bool(attr(seg, "trained", default=False))
            for i, part in enumerate(str(attr(seg, "text", default="")).split("\n")):
                if i:
                    lines.append([])
                if part:
                    lines[-1].append((part, trained))
        for i, line in enumerate(lines):
            if i:
                out.append("\n")
            for j, visual in enumerate(_wrap_pieces(line, body)):
                if j:
                    out.append("\n")
                if not visual:
                    continue  # a blank line: no gutter (it holds no text of either kind)
                # the gutter belongs to whichever segment puts text first on the visual line
                trained = visual[0][1]
                out.append(TRAINED_GUTTER if trained else MASKED_GUTTER, style="bold green" if trained else "dim")
                for text, t in visual:
                    out.append(text, style=TRAINED_STYLE if t else MASKED_STYLE)
        out.append("\n")
    return out


class SamplesView(Static):
    """The samples, wrapped at this widget's own width (again when it changes: a terminal resized,
    the scroll bar's gutter), so every visual line keeps its masked/trained gutter."""

    def show(self, samples: list[Any], head: Text | None = None) -> None:
        self._samples, self._head = samples, head
        self._draw()

    def say(self, text: Text) -> None:
        """A message in place of samples (reading…, an error): Rich wraps it."""
        self._samples = None
        self.update(text)

    def _draw(self) -> None:
        width = self.content_region.width or None
        shown = Text()
        if self._head is not None:
            shown.append_text(self._head)
        shown.append_text(render_samples(self._samples, width))
        self.update(shown)

    def on_resize(self, event) -> None:
        if getattr(self, "_samples", None) is not None:
            self._draw()


def inspect_command(app, path: str, fmt: str, columns: dict[str, str], model: str | None = None,
                    template: str | None = None) -> list[str]:
    """`snugtune data inspect --json` for the data on screen, with the model's tokenizer."""
    cmd = [sys.executable, "-m", "tui.cli", "data", "inspect", "--path", path, "--json", "--hint-syntax", "wizard",
           "--format", fmt, "--seq", str(app.get_value("data.max_seq_len", 1024))]
    template = template or app.get_value("data.template")
    if template:
        cmd += ["--template", template]
    model = model or app.get_value("model.name_or_path")
    if model:
        cmd += ["--model", model]
    for key, value in columns.items():
        cmd += ["--column", f"{key}={value}"]
    return cmd


# Offline, a catalog model whose tokenizer is not in the local cache cannot be loaded; the
# preview then uses the demo model's small byte-level tokenizer and the built-in template, so
# the data step (and settings, and the estimate, which need no tokenizer) stay reachable.
FALLBACK_MODEL = "builtin:tiny-llama"


def inspect_data(app, path: str, fmt: str, columns: dict[str, str]) -> tuple[dict | None, str | None]:
    """Run the inspection from a worker: (report, None), (None, the CLI's message), or
    (None, None) when the worker was cancelled. A report made without the model's own
    tokenizer carries `fallback`: why, said on screen."""
    cmd = inspect_command(app, path, fmt, columns)
    report, error = _run_inspect(cmd)
    model = app.get_value("model.name_or_path")
    if error and model and model != FALLBACK_MODEL and error.startswith("model.name_or_path"):
        reason = error.splitlines()[0].split(": ", 1)[-1]
        cmd = inspect_command(app, path, fmt, columns, model=FALLBACK_MODEL, template="builtin")
        report, second = _run_inspect(cmd)
        if report is None:
            return None, second if second is not None else None
        report["fallback"] = (f"{model}'s tokenizer is not available ({reason}): the preview uses the "
                              "built-in template and the demo's byte-level tokenizer, so token counts are "
                              "estimates; the engine uses the model's own when it loads it")
    return report, error if report is None else None


def _run_inspect(cmd: list[str]) -> tuple[dict | None, str | None]:
    try:
        returncode, stdout, stderr = run_command(cmd, INSPECT_TIMEOUT_S)
    except Cancelled:
        return None, None
    except subprocess.TimeoutExpired:
        return None, f"reading the data took over {INSPECT_TIMEOUT_S}s; try data.max_samples"
    if returncode != 0:
        # the CLI prints one `snugtune: error: ...` line (and a hint) for a UserError: show it as it is
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("snugtune: error:")]
        if errs:
            at = lines.index(errs[0])
            return None, errs[0].removeprefix("snugtune: error: ") + "".join("\n" + ln for ln in lines[at + 1:])
        return None, lines[-1] if lines else f"exit code {returncode}"
    try:
        return json.loads(stdout), None
    except json.JSONDecodeError:
        return None, "data inspect printed something that is not JSON: " + stdout[:200]


class DataScreen(StepScreen):
    STEP = 2
    BINDINGS = StepScreen.BINDINGS + [Binding("ctrl+o", "browse", "Browse files", priority=True)]

    def action_browse(self) -> None:
        from tui.screens.modals import FilePickerScreen

        typed = Path(self.query_one("#path", Input).value.strip() or ".").expanduser()
        root = typed if typed.is_dir() else typed.parent if typed.parent.is_dir() else Path.cwd()
        self.app.push_screen(FilePickerScreen(root.resolve(), DATA_SUFFIXES), self._picked)

    def _picked(self, path: str | None) -> None:
        if path:
            self.query_one("#path", Input).value = path
            self.inspect()

    def compose_body(self):
        # 78 characters: one line at 80 columns
        yield Label("Training data: .jsonl .json .csv .tsv .parquet .arrow .txt, folder, Hub id",
                    classes="title")
        with Horizontal(classes="row"):
            yield Label("Data", classes="field-label")
            yield Input(self.app.get_value("data.path", ""), placeholder="path/to/train.jsonl or owner/dataset",
                        id="path", suggester=PathSuggester(), compact=True)
        with Horizontal(classes="row"):
            yield Label("Format", classes="field-label")
            yield Select(FORMATS, value=self.app.get_value("data.format", "auto"), allow_blank=False,
                         id="format", compact=True)
        # a row of its own: beside Format it had 26 cells at 80 columns, and a detected mapping
        # (instruction=instruction, input=input, output=output) was cut after its first field
        with Horizontal(classes="row"):
            yield Label("Columns", classes="field-label")
            cols = self.app.get_value("data.columns", {}) or {}
            yield Input(", ".join(f"{k}={v}" for k, v in cols.items()), placeholder=COLUMNS_PLACEHOLDER,
                        id="columns", compact=True, tooltip=field_help("data.columns"))
        with Horizontal(id="data-body"):
            with VerticalScroll(id="samples-box"):
                yield SamplesView(Text("Enter a path above to see three samples as the model will read them.",
                                       style="dim"), id="samples")
            yield Static("", id="lengths", markup=False)

    def on_mount(self) -> None:
        self.report = self.app.data_report
        self.inspected_for: tuple | None = None
        self.wanted: tuple = ()
        if self.report is not None:
            self.show_report(self.report)
            self.inspected_for = self._key()
        elif self.app.get_value("data.path"):
            self.inspect()
        focus_now(self.query_one("#path", Input))

    def _key(self) -> tuple:
        return (self.query_one("#path", Input).value.strip(), self.query_one("#format", Select).value,
                self.query_one("#columns", Input).value.strip())

    # ---- inspecting ----------------------------------------------------------------

    @on(Input.Submitted, "#path")
    @on(Input.Submitted, "#columns")
    def _submitted(self, event: Input.Submitted) -> None:
        self.inspect()

    @on(Select.Changed, "#format")
    def _format_changed(self, event: Select.Changed) -> None:
        if self.query_one("#path", Input).value.strip() and self.inspected_for and event.value != self.inspected_for[1]:
            self.inspect()

    def inspect(self) -> None:
        path = self.query_one("#path", Input).value.strip()
        if not path:
            self.set_status("type the path of a data file or a Hub dataset id", "error")
            return
        problem = local_problem(path)
        if problem:
            self.report = None
            self.app.data_report = None
            self.query_one("#columns", Input).placeholder = COLUMNS_PLACEHOLDER
            self.query_one("#samples", SamplesView).say(Text(problem, style="red"))
            self.query_one("#lengths", Static).update("")
            self.set_status(problem, "error")
            return
        try:
            columns = parse_columns(self.query_one("#columns", Input).value)
        except ValueError as exc:
            self.set_status(f"columns: {exc}", "error")
            return
        self.save_state()
        self.wanted, cached = self.app.read_data(path, self.query_one("#format", Select).value, columns)
        if cached is not None:
            # read before (this visit or an earlier one) and unchanged on disk: no second read
            self._inspected(DataInspected(path, report=cached, key=self.wanted))
            return
        self.set_status(f"reading {path} and counting tokens…")
        self.query_one("#samples", SamplesView).say(Text("reading…", style="dim"))
        self.query_one("#lengths", Static).update("")

    @on(DataInspected)
    def _inspected(self, msg: DataInspected) -> None:
        if msg.key != self.wanted:
            return  # a preview the user has since replaced (a thread cannot be cancelled mid-run)
        if msg.error:
            self.report = None
            self.app.data_report = None
            # the previous file's detected mapping must not stand as this file's (it read as the
            # mapping in use, and as what to type over)
            self.query_one("#columns", Input).placeholder = COLUMNS_PLACEHOLDER
            self.query_one("#samples", SamplesView).say(Text(msg.error, style="red"))
            # the previous file's lengths and histogram must not stand beside this file's error
            self.query_one("#lengths", Static).update("")
            self.set_status(msg.error.splitlines()[0], "error")
            return
        self.report = msg.report
        self.app.data_report = msg.report
        self.inspected_for = self._key()
        self.show_report(msg.report)
        fmt = format_kind(msg.report)
        n = attr(msg.report, "samples_total", "num_samples", default=None)
        said = f"{msg.path}: {fmt} format" + (f", {n} samples" if n is not None else "")
        if msg.report.get("fallback"):
            self.set_status(said + " · token counts estimated (the model's tokenizer is not here) · ctrl+n: settings",
                            "warning")
        else:
            self.set_status(said + " · ctrl+n: settings", "ok")

    def show_report(self, report: dict) -> None:
        samples = attr(report, "samples", default=[])[:3]
        head = Text(f"! {report['fallback']}\n", style="bold yellow") if report.get("fallback") else None
        self.query_one("#samples", SamplesView).show(samples, head)
        self.query_one("#lengths", Static).update(self.lengths_text(report))
        cols = format_columns(report)
        if cols and not self.query_one("#columns", Input).value.strip():
            # the detected mapping shows as the placeholder: typing over it corrects it
            self.query_one("#columns", Input).placeholder = ", ".join(f"{k}={v}" for k, v in cols.items())

    def lengths_text(self, report: dict) -> Text:
        stats = attr(report, "length_stats", "lengths", default={}) or {}
        max_len = int(self.app.get_value("data.max_seq_len", 1024))
        out = Text()
        out.append(f"format  {format_kind(report)}\n", style="bold")
        n = attr(report, "samples_total", "num_samples")
        if n is not None:
            out.append(f"samples {n}\n")
        for k, v in format_columns(report).items():
            out.append(f"  {k} ← {v}\n")
        out.append("tokens per sample" + (" (estimated)" if report.get("fallback") else "") + "\n", style="bold")
        bits = [f"{k} {attr(stats, k)}" for k in ("p50", "p95", "max") if attr(stats, k) is not None]
        if bits:
            out.append("  " + " · ".join(str(b) for b in bits) + "\n")
        frac = attr(stats, "truncated_share", "truncated_fraction")
        if frac is not None:
            share = float(frac)
            out.append(f"cut at {max_len}: {share:.0%} of samples\n",
                       style="bold red" if share > 0.05 else "bold")  # >5% cut is worth a warning colour
        for line in attr(report, "dropped_and_cut", default=None) or []:
            out.append(f"{line}\n", style="bold yellow")  # everything dropped or cut, counted
        hist = attr(stats, "histogram", default=None) or {}
        edges = attr(hist, "edges", "bins", default=[])
        counts = attr(hist, "counts", default=[])
        if counts:
            out.append_text(render_histogram(edges, counts, max_len, width=14))
            out.append("\n")
        return out

    # ---- leaving -------------------------------------------------------------------

    def save_state(self) -> None:
        self.app.set_value("data.path", self.query_one("#path", Input).value.strip())
        self.app.set_value("data.format", self.query_one("#format", Select).value)
        try:
            self.app.set_value("data.columns", parse_columns(self.query_one("#columns", Input).value) or None)
        except ValueError:
            pass

    def leave_problem(self) -> str | None:
        path = self.query_one("#path", Input).value.strip()
        if not path:
            return "choose the training data first"
        problem = local_problem(path)
        if problem:
            return problem
        try:
            parse_columns(self.query_one("#columns", Input).value)
        except ValueError as exc:
            return f"columns: {exc}"
        if self.report is None or self.inspected_for != self._key():
            self.inspect()
            return "press Enter in the path to preview the data first (reading it now)"
        return None
