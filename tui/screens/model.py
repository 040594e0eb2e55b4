"""Step 2: which model — the built-in catalog, the local cache, or the Hub, with a fit badge."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.containers import Horizontal
from textual.widgets import DataTable, Input, Label, Select, Static

from core.errors import UserError
from tui.messages import ModelResolved, ModelsListed
from tui.screens.base import StepScreen, attr, estimator, hub_errors
from tui.keyorder import focus_now

SOURCES = [("Catalog", "catalog"), ("Local cache", "cache"), ("Hub", "hub")]
# The fixed columns keep their full words ("too big" is 7 cells); the model column takes the
# rest of the table's width, whatever the terminal's (issue 14: "too b" at 80 columns, names cut
# at 120 with 45 columns empty beside them).
def elide_middle(text: str, width: int) -> str:
    """`text` in `width` cells, its middle replaced by "…" when it does not fit: a model id's
    owner and its variant (the end: -Instruct, -Chat-v1.0, -3T) both stay readable."""
    if len(text) <= width:
        return text
    if width < 2:
        return text[:width]
    keep = width - 1
    head = keep // 2
    return text[:head] + "…" + text[len(text) - (keep - head):]


FIXED_COLUMNS = [("params", "params", 6), ("fit", "fit", 7), ("access", "gated", 6)]
MODEL_MIN_W = 16
SORTS = [("downloads", "downloads"), ("likes", "likes"), ("recent", "recent")]


def spec_id(spec: Any) -> str:
    return str(attr(spec, "id", "name_or_path", "name", "repo_id", default="?"))


def spec_params_b(spec: Any) -> float | None:
    n = attr(spec, "params_total", "hub_params", "params", "num_params")
    if n is None:
        b = attr(spec, "params_b", "params_billion")
        return None if b is None else float(b)
    return float(n) / 1e9


def params_label(spec: Any) -> str:
    """The parameter count as the CLI writes it (core.catalog.ModelSpec.size_label: 3.5M, 1.5B)."""
    label = attr(spec, "size_label")
    if isinstance(label, str):
        return label
    p = spec_params_b(spec)
    return "?" if p is None else format_params(p * 1e9)


def format_params(n: float) -> str:
    # the same rule as core.catalog.ModelSpec.size_label, for specs that are plain dicts
    if n >= 0.95e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.1f}M" if n < 100e6 else f"{n / 1e6:.0f}M"


def fit_badge(verdict: Any) -> Text:
    """The estimator's verdict as a word (colour is extra, the word carries it)."""
    v = str(verdict or "?").lower()
    if v in {"fits", "fit", "ok", "yes"}:
        return Text("fits", style="bold green")
    if v in {"tight", "close", "maybe"}:
        return Text("tight", style="bold yellow")
    if v in {"?", "none", "unknown"}:
        return Text("?", style="dim")
    return Text("too big", style="bold red")


def spec_details(spec: Any) -> str:
    rows = [spec_id(spec)]
    arch = attr(spec, "architecture", "arch", "model_type")
    if arch:
        rows.append(f"architecture  {arch}")
    if spec_params_b(spec) is not None or attr(spec, "size_label"):
        rows.append(f"parameters    {params_label(spec)}")
    if attr(spec, "gated"):
        rows.append("access        gated: accept the licence on the Hub, then `hf auth login`")
    for label, names in [("layers", ("num_layers", "num_hidden_layers", "n_layers")),
                         ("hidden", ("hidden_size", "hidden")),
                         ("MLP", ("intermediate_size", "ffn_size")),
                         ("heads", ("num_heads", "num_attention_heads")),
                         ("kv heads", ("num_kv_heads", "num_key_value_heads")),
                         ("vocab", ("vocab_size", "vocab")),
                         ("context", ("max_position_embeddings", "context_length", "max_seq_len"))]:
        value = attr(spec, *names)
        if value is not None:
            rows.append(f"{label:<13} {value:,}" if isinstance(value, int) else f"{label:<13} {value}")
    tied = attr(spec, "tie_word_embeddings", "tied_embeddings")
    if tied is not None:
        rows.append(f"tied embed.   {'yes' if tied else 'no'}")
    for label, names in [("downloads", ("downloads",)), ("likes", ("likes",))]:
        value = attr(spec, *names)
        if value is not None:
            rows.append(f"{label:<13} {value:,}" if isinstance(value, int) else f"{label:<13} {value}")
    note = attr(spec, "note", "description", "notes")
    if note:
        rows.append("")
        rows.append(str(note))
    return "\n".join(rows)


def gguf_not_loadable(spec: Any) -> str | None:
    """Why a GGUF model cannot be trained (its architecture is none that transformers' GGUF loader
    dequantizes, core.gguf_source.ARCH_TO_MODEL_TYPE), or None. The wizard process imports no
    transformers, so the table stands in for transformers' own list; training says the exact one."""
    if attr(spec, "source", default="") != "gguf":
        return None
    from core.gguf_source import ARCH_TO_MODEL_TYPE

    mt = str(attr(spec, "model_type", default="") or "")
    if not mt or mt in ARCH_TO_MODEL_TYPE.values() or mt in ARCH_TO_MODEL_TYPE:
        return None
    return (f"its architecture {mt!r} is none transformers can dequantize from GGUF, so it cannot train; "
            "pick its original weights (a Hub id or folder) instead")


class ModelScreen(StepScreen):
    STEP = 1

    def compose_body(self):
        yield Label("Which model? Type to filter, ↑↓ to pick, Enter; or a Hub id / local path.", classes="title")
        with Horizontal(classes="row"):
            yield Input(self.app.get_value("model.name_or_path", ""), placeholder="search or model id", id="query",
                        compact=True)
            yield Select(SOURCES, value="catalog", allow_blank=False, id="source", compact=True)
            yield Select(SORTS, value="downloads", allow_blank=False, id="sort", compact=True)
        with Horizontal(id="model-body"):
            table = DataTable(id="models", cursor_type="row", zebra_stripes=False)
            yield table
            yield Static("", id="details")

    def on_mount(self) -> None:
        self.specs: list[Any] = []
        self.gpu = self.app.gpu_target()
        table = self.query_one("#models", DataTable)
        table.add_column("model", key="model", width=MODEL_MIN_W)
        for label, key, width in FIXED_COLUMNS:
            table.add_column(label, key=key, width=width)
        self.searched: str | None = None
        self.load_source("catalog")
        if self.app.spec is None and self.app.get_value("model.name_or_path"):
            self.resolve(self.app.get_value("model.name_or_path"))
        focus_now(self.query_one("#query", Input))

    def on_resize(self, event) -> None:
        self.call_after_refresh(self.fit_columns)

    def fit_columns(self) -> None:
        """Give the model column all the width the fixed columns leave."""
        tables = self.query("#models").results(DataTable)
        table = next(tables, None)
        if table is None or not table.size.width:  # the step was left before the refresh came
            return
        pad = 2 * table.cell_padding
        fixed = sum(w + pad for _label, _key, w in FIXED_COLUMNS)
        # the vertical scrollbar is there when the rows outnumber the lines
        scrollbar = table.styles.scrollbar_size_vertical if table.row_count + 1 > table.size.height else 0
        width = max(MODEL_MIN_W, table.size.width - fixed - pad - scrollbar)
        for col in table.columns.values():
            if str(col.key.value) == "model" and col.width != width:
                col.width = width
                table._require_update_dimensions = True
                table.refresh()
        # names longer than the column lose their middle, not their end: at 80 columns two
        # TinyLlama ids both read "TinyLlama/TinyLlama-1.1B-…" cut at the end
        for i, spec in enumerate(getattr(self, "specs", [])):
            label = elide_middle(spec_id(spec), width)
            try:
                if str(table.get_cell(str(i), "model")) != label:
                    table.update_cell(str(i), "model", Text(label, no_wrap=True), update_width=False)
            except Exception:  # noqa: BLE001 - rows replaced meanwhile; their own refresh follows
                break

    # ---- listing -------------------------------------------------------------------

    def load_source(self, source: str) -> None:
        from core import catalog

        query = self.query_one("#query", Input).value.strip()
        if source == "catalog":
            specs = list(catalog.builtin_catalog())
            wanted = self._filter_text(query)
            matching = [s for s in specs if wanted.lower() in spec_id(s).lower()
                        or wanted.lower() in str(attr(s, "model_type", default="")).lower()]
            if wanted and not matching:
                # nothing matches: the whole catalog stays listed (still a choice) beside the hint
                self.show_specs(specs)
                self.set_status(f"no catalog model matches {query!r} · Enter looks it up as a Hub id or local path")
                return
            specs = matching
            self.show_specs(specs)
            self.set_status(f"{len(specs)} models in the built-in catalog"
                            + (f" matching {query!r}" if wanted else "")
                            + " · Enter on a row chooses it")
        elif source == "cache":
            self.set_status("scanning the local Hugging Face cache…")
            self.list_cache()
        else:
            self.set_status("asking the Hub…")
            self.search_hub(query if not self._looks_like_id(query) else "", self.query_one("#sort", Select).value)

    def _filter_text(self, query: str) -> str:
        """What the catalog is filtered by: the typed text, also with `/` or `builtin:` in it
        (issue 14: `builtin:` matched nothing); not a local path, nor the chosen model's own id
        (coming back to this step shows the whole list with the choice highlighted)."""
        if not query or query == self.app.get_value("model.name_or_path"):
            return ""
        if query.startswith((".", "~")) or Path(query).expanduser().exists():
            return ""
        return query

    @staticmethod
    def _looks_like_id(text: str) -> bool:
        return "/" in text or ":" in text or Path(text).expanduser().exists()

    @work(thread=True, exit_on_error=False, name="cache scan", exclusive=True, group="list")
    def list_cache(self) -> None:
        from core import catalog

        try:
            self.post_message(ModelsListed("cache", list(catalog.scan_cache())))
        except UserError as exc:
            self.post_message(ModelsListed("cache", [], str(exc)))

    @work(thread=True, exit_on_error=False, name="Hub search", exclusive=True, group="list")
    def search_hub(self, query: str, sort: str) -> None:
        from core import catalog

        try:
            self.post_message(ModelsListed("hub", list(catalog.search_hub(query, sort=sort))))
        except hub_errors() as exc:
            self.post_message(ModelsListed("hub", [], str(exc)))

    @on(ModelsListed)
    def _listed(self, msg: ModelsListed) -> None:
        if msg.error:
            if msg.source == "hub":
                self.set_status(f"Hub unreachable: {msg.error} — the catalog and local cache still work "
                                "(pick them under the source menu)", "warning")
            else:
                self.set_status(msg.error, "error")
            return
        self.show_specs(msg.specs)
        where = {"cache": "in the local cache", "hub": "from the Hub"}[msg.source]
        self.set_status(f"{len(msg.specs)} models {where}" if msg.specs else f"no models {where}")

    def show_specs(self, specs: list[Any]) -> None:
        estimate = estimator()
        table = self.query_one("#models", DataTable)
        table.clear()
        self.specs = list(specs)
        chosen = self.app.get_value("model.name_or_path")
        cfg = None
        try:
            cfg = self.app.estimate_config()
        except UserError:
            pass
        for i, spec in enumerate(self.specs):
            verdict = None
            if cfg is not None and self.gpu is not None and estimate is not None:
                try:
                    est = estimate.estimate(spec, cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": spec_id(spec)})}), self.gpu)
                    verdict = attr(est, "verdict")
                except Exception:  # noqa: BLE001 - a spec the estimator cannot size gets "?" not a crash
                    verdict = None
            gated = Text("gated", style="bold yellow") if attr(spec, "gated") else Text("")
            # a name longer than its column ends in an ellipsis rather than mid-word
            table.add_row(Text(spec_id(spec), no_wrap=True, overflow="ellipsis"), params_label(spec), fit_badge(verdict), gated, key=str(i))
        self.call_after_refresh(self.fit_columns)
        ids = [spec_id(s) for s in self.specs]
        if chosen in ids:
            table.move_cursor(row=ids.index(chosen))
        elif self.specs:
            table.move_cursor(row=0)

    @on(Select.Changed, "#source")
    @on(Select.Changed, "#sort")
    def _source_changed(self, event: Select.Changed) -> None:
        self.load_source(self.query_one("#source", Select).value)

    # ---- choosing -----------------------------------------------------------------

    @on(DataTable.RowHighlighted, "#models")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is None or event.row_key.value is None:
            return
        spec = self.specs[int(event.row_key.value)]
        self.query_one("#details", Static).update(spec_details(spec))

    @on(DataTable.RowSelected, "#models")
    def _selected(self, event: DataTable.RowSelected) -> None:
        spec = self.specs[int(event.row_key.value)]
        self.choose(spec)
        self.app.action_next_step()

    def choose(self, spec: Any) -> None:
        self.app.spec = spec
        self.app.set_value("model.name_or_path", spec_id(spec))
        self.query_one("#query", Input).value = spec_id(spec)

    @on(Input.Changed, "#query")
    def _typed(self, event: Input.Changed) -> None:
        # the catalog filters as the user types (pure Python, instant); cache and Hub wait for Enter
        if self.query_one("#source", Select).value == "catalog":
            self.load_source("catalog")

    @on(Input.Submitted, "#query")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        source = self.query_one("#source", Select).value
        ids = {spec_id(sp) for sp in self.specs}
        # an id or path is looked up, unless it is part of catalog ids still listed (`builtin:`,
        # `meta-llama/`): then Enter takes the highlighted row, as for any other filter
        partial = (source == "catalog" and text not in ids and bool(self._filter_text(text))
                   and any(text.lower() in i.lower() for i in ids))
        if self._looks_like_id(text) and not partial:
            self.set_status(f"looking up {text}…")
            self.resolve(text)
        elif source != "catalog" and text != self.searched:
            self.searched = text
            self.load_source(source)
        else:
            self._choose_highlighted()

    def _choose_highlighted(self) -> None:
        table = self.query_one("#models", DataTable)
        if self.specs and table.row_count:
            self.choose(self.specs[table.cursor_row])
            self.app.action_next_step()

    def on_key(self, event) -> None:
        # up/down in the search box move through the list: type, arrow, Enter
        if self.focused is self.query_one("#query", Input) and event.key in ("up", "down"):
            table = self.query_one("#models", DataTable)
            table.action_cursor_down() if event.key == "down" else table.action_cursor_up()
            event.stop()

    @work(thread=True, exit_on_error=False, name="model lookup", exclusive=True, group="resolve")
    def resolve(self, text: str) -> None:
        from core import catalog

        try:
            self.post_message(ModelResolved(text, spec=catalog.resolve_model(text)))
        except hub_errors() as exc:
            self.post_message(ModelResolved(text, error=str(exc)))

    @on(ModelResolved)
    def _resolved(self, msg: ModelResolved) -> None:
        if msg.error:
            # the typed text stays in the box; the reason goes under it
            # most messages already start with what was typed ("/x: no such model directory")
            said = msg.error if msg.error.startswith(msg.query) else f"{msg.query}: {msg.error}"
            self.set_status(said, "error")
            return
        self.choose(msg.spec)
        if spec_id(msg.spec) not in [spec_id(s) for s in self.specs]:
            self.show_specs([msg.spec] + self.specs)
        else:
            self.show_specs(self.specs)
        self.query_one("#details", Static).update(spec_details(msg.spec))
        foreign = gguf_not_loadable(msg.spec)
        if foreign:
            # chosen (an estimate still works from the header), but said now rather than at the
            # data preview or the engine's start
            self.set_status(f"chosen: {spec_id(msg.spec)}, but {foreign}", "warning")
            return
        self.set_status(f"chosen: {spec_id(msg.spec)} · ctrl+n goes on to the data", "ok")

    def save_state(self) -> None:
        table = self.query_one("#models", DataTable)
        # the highlighted row is the choice when the user presses Next from the table
        if self.specs and table.row_count and (self.app.spec is None or self.focused is not None):
            self.choose(self.specs[table.cursor_row])

    def leave_problem(self) -> str | None:
        if self.app.spec is None:
            return "choose a model first: Enter on a row, or type an id and press Enter"
        return None
