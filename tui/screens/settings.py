"""Step 4: LoRA and training settings beside the VRAM estimate, updated as the user types."""
from __future__ import annotations

import copy
import re
from typing import Any, Callable

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.timer import Timer
from textual.widgets import Checkbox, Input, Label, Select, Static

from core.config import ConfigError, RunConfig, field_help
from core.errors import UserError
from tui.messages import DataInspected, ModelResolved
from tui.screens.base import StepScreen, attr, estimator, fmt_duration, hub_errors, plural
from tui.widgets.onoff import OnOff
from tui.widgets.vrambar import VramBar
from tui.keyorder import focus_now

# Typing pauses shorter than this are one edit: the estimate waits for the pause.
DEBOUNCE_S = 0.25

def _optimizers() -> list[tuple[str, str]]:
    from core.plan import OPTIMIZERS as names  # the one list (core.plan; the config validates against it)

    return [(v, v) for v in names]


OPTIMIZERS = _optimizers()


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise ValueError("not a whole number") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("not a number (e.g. 0.05 or 2e-4)") from None


def _optional_int(text: str) -> int | None:
    return _int(text) if text else None


def _targets(text: str) -> str | list[str]:
    # "q_proj, v_proj" or the TOML list the help text shows, ['q_proj', 'v_proj']
    text = text.strip().strip("[]")
    if text.strip("'\" ") in ("", "all-linear"):
        return "all-linear"
    names = [t.strip().strip("'\"").strip() for t in text.split(",") if t.strip().strip("'\"").strip()]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", n)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a module name; use all-linear or names like q_proj, v_proj")
    return names


def _show_targets(value: Any) -> str:
    return ", ".join(value) if isinstance(value, list) else str(value)


def _optional_float(text: str) -> float | None:
    return _float(text) if text else None


def _name(text: str) -> str | None:
    # blank: the run is named after the preset or the data file (core.runs); RunConfig checks the pattern
    return text or None


def _show_opt(v: Any) -> str:
    return "" if v is None else str(v)


# (dotted key, label, parse, show). Text fields: parse raises ValueError with the reason.
TEXT_FIELDS: list[tuple[str, str, Callable[[str], Any], Callable[[Any], str]]] = [
    ("lora.r", "LoRA rank", _int, str),
    ("lora.alpha", "LoRA alpha", _float, lambda v: f"{v:g}"),
    ("lora.dropout", "LoRA dropout", _float, lambda v: f"{v:g}"),
    ("lora.target_modules", "LoRA targets", _targets, _show_targets),
    ("data.max_seq_len", "Sequence len", _int, str),
    ("train.micro_batch", "Micro-batch", _int, str),
    ("train.grad_accum", "Grad accum", _int, str),
    ("train.epochs", "Epochs", _float, lambda v: f"{v:g}"),
    ("train.max_steps", "Max steps", _optional_int, _show_opt),
    ("train.learning_rate", "Learning rate", _float, lambda v: f"{v:g}"),
]

# The "advanced" group: what LlamaBoard users look for, reachable before only through TOML or --set.
ADVANCED_TEXT_FIELDS: list[tuple[str, str, Callable[[str], Any], Callable[[Any], str]]] = [
    ("output.name", "Run name", _name, _show_opt),
    ("train.warmup_ratio", "Warmup ratio", _float, lambda v: f"{v:g}"),
    ("train.weight_decay", "Weight decay", _float, lambda v: f"{v:g}"),
    ("data.eval_fraction", "Eval fraction", _float, lambda v: f"{v:g}"),
    ("train.eval_steps", "Eval steps", _optional_int, _show_opt),
    ("train.save_steps", "Save steps", _int, str),
]
PLACEHOLDERS = {"train.max_steps": "blank: use epochs", "train.eval_steps": "blank: each epoch's end",
                "output.name": "blank: from the preset or data file"}

SELECT_FIELDS = [
    ("train.optimizer", "Optimizer", tuple(v for v, _ in OPTIMIZERS), False),
    ("train.lr_scheduler", "Scheduler", ("cosine", "linear", "constant", "constant_with_warmup"), True),
    ("data.template", "Template", ("auto", "builtin"), True),
]
CHECKBOX_FIELDS = [
    ("train.gradient_checkpointing", "Gradient checkpointing", False),
    ("data.packing", "Packing", True),
]


def all_text_fields():
    return TEXT_FIELDS + ADVANCED_TEXT_FIELDS


def field_default(dotted: str) -> Any:
    section, _, name = dotted.partition(".")
    field = RunConfig.model_fields[section].annotation.model_fields[name]
    return field.get_default(call_default_factory=True)


def field_id(dotted: str) -> str:
    return dotted.replace(".", "-")


def config_errors(exc: ConfigError) -> dict[str, str]:
    """A ConfigError as {dotted key: reason}; one error has .key, several are '; '-joined."""
    if exc.key:
        return {exc.key: exc.reason}
    found = {}
    for part in exc.reason.split("; "):
        m = re.match(r"^([a-z_]+\.[a-z_]+)(?:\.\S+)?: (.*)$", part)
        if m:
            found.setdefault(m.group(1), m.group(2))
    return found or {"": str(exc)}


class SettingsScreen(StepScreen):
    STEP = 3
    BINDINGS = StepScreen.BINDINGS + [Binding("ctrl+f", "autofit", "Auto-fit", priority=True),
                                      Binding("ctrl+y", "app.show_command", "Command", priority=True)]

    def compose_body(self):
        with Horizontal(id="settings-body"):
            with VerticalScroll(id="fields"):
                yield from self._text_rows(TEXT_FIELDS)
                yield from self._select_rows(False)
                yield from self._checkbox_rows(False)
                yield Label("Advanced", classes="group-title")
                yield from self._text_rows(ADVANCED_TEXT_FIELDS)
                yield from self._select_rows(True)
                yield from self._checkbox_rows(True)
            with Vertical(id="estimate-panel"):
                yield Label("Peak memory (estimate)", classes="panel-title", id="estimate-title")
                yield VramBar(id="vram")
                yield Static("", id="totals")
                yield Static("", id="timing")

    def _text_rows(self, fields):
        for dotted, label, _parse, show in fields:
            fid = field_id(dotted)
            value = self.app.get_value(dotted, field_default(dotted))
            with Horizontal(classes="row"):
                yield Label(label, classes="field-label")
                yield Input(show(value) if value is not None else "", id=fid, compact=True,
                            placeholder=PLACEHOLDERS.get(dotted, ""))
            yield Static("", id=f"{fid}-error", classes="field-error", markup=False)
            yield Static(field_help(dotted), classes="hint", markup=False)

    def _select_rows(self, advanced: bool):
        for dotted, label, choices, adv in SELECT_FIELDS:
            if adv != advanced:
                continue
            with Horizontal(classes="row"):
                yield Label(label, classes="field-label")
                yield Select([(c, c) for c in choices], value=self.app.get_value(dotted, field_default(dotted)),
                             allow_blank=False, id=field_id(dotted), compact=True)
            yield Static(field_help(dotted), classes="hint", markup=False)

    def _checkbox_rows(self, advanced: bool):
        for dotted, label, adv in CHECKBOX_FIELDS:
            if adv != advanced:
                continue
            yield OnOff(label, value=bool(self.app.get_value(dotted, field_default(dotted))),
                           id=field_id(dotted), compact=True, classes="field-check")
            yield Static(field_help(dotted), classes="hint", markup=False)

    def text_fields(self):
        return all_text_fields()

    def on_mount(self) -> None:
        self._timer: Timer | None = None
        self.field_errors: dict[str, str] = {}
        self.verdict: str | None = None
        self.estimate_error: str | None = None
        self.data_error: str | None = None
        self.gpu = self.app.gpu_target()
        # the fields paint first; the model lookup and the estimate (and their imports, which
        # would hold the GIL against the first paint) follow a frame later
        if self.app.spec is None and self.app.get_value("model.name_or_path"):
            self.call_after_refresh(self.resolve, self.app.get_value("model.name_or_path"))
        self.call_after_refresh(self.refresh_estimate)
        self.data_pending = self.app.data_report is None and bool(self.app.get_value("data.path"))
        if self.data_pending:
            # samples and lengths give the time per epoch; read them in the background
            self.call_after_refresh(self.read_data)
        focus_now(self.query_one(f"#{field_id(TEXT_FIELDS[0][0])}", Input))

    @work(thread=True, exit_on_error=False, name="model lookup", exclusive=True, group="resolve")
    def resolve(self, name: str) -> None:
        from core import catalog

        try:
            self.post_message(ModelResolved(name, spec=catalog.resolve_model(name)))
        except hub_errors() as exc:
            self.post_message(ModelResolved(name, error=str(exc)))

    def read_data(self) -> None:
        path = self.app.get_value("data.path")
        self.data_wanted, cached = self.app.read_data(path, self.app.get_value("data.format", "auto"),
                                                      self.app.get_value("data.columns", {}) or {})
        if cached is not None:
            self._data_read(DataInspected(path, report=cached, key=self.data_wanted))

    @on(DataInspected)
    def _data_read(self, msg: DataInspected) -> None:
        if msg.key != getattr(self, "data_wanted", ()):
            return
        self.data_pending = False
        self.data_error = msg.error.splitlines()[0] if msg.error else None
        if msg.report is not None:
            self.app.data_report = msg.report
        # the data step shows an error in full; here the timing panel says why epochs are unknown
        self.show_estimate()

    @on(ModelResolved)
    def _resolved(self, msg: ModelResolved) -> None:
        if msg.error:
            self.set_status(f"model {msg.query}: {msg.error} (ctrl+b twice to choose another)", "error")
            return
        self.app.spec = msg.spec
        self.refresh_estimate()

    # ---- reading the fields ----------------------------------------------------------

    def read_fields(self) -> tuple[dict, dict[str, str]]:
        """The configuration with the on-screen values, and {key: reason} for the bad ones.
        Bad values stay in their boxes; the configuration keeps the last good value."""
        data = copy.deepcopy(self.app.cfg_data)
        errors: dict[str, str] = {}
        for dotted, _label, parse, _show in all_text_fields():
            raw = self.query_one(f"#{field_id(dotted)}", Input).value.strip()
            section, _, key = dotted.partition(".")
            try:
                value = parse(raw)
            except ValueError as exc:
                errors[dotted] = str(exc)
                continue
            if value is None:
                data.setdefault(section, {}).pop(key, None)
            else:
                data.setdefault(section, {})[key] = value
        for dotted, *_ in SELECT_FIELDS:
            section, _, key = dotted.partition(".")
            data.setdefault(section, {})[key] = self.query_one(f"#{field_id(dotted)}", Select).value
        for dotted, *_ in CHECKBOX_FIELDS:
            section, _, key = dotted.partition(".")
            data.setdefault(section, {})[key] = self.query_one(f"#{field_id(dotted)}", Checkbox).value
        # Validate through RunConfig; each reason lands beside its own field, and that field
        # falls back to its last good value so the other fields are still checked.
        for _ in range(len(all_text_fields()) + len(SELECT_FIELDS) + len(CHECKBOX_FIELDS)):
            try:
                RunConfig.from_dict(_filled(data))
                break
            except ConfigError as exc:
                progressed = False
                for key, reason in config_errors(exc).items():
                    section, _, name = key.partition(".")
                    if not name or name not in data.get(section, {}):
                        continue
                    errors.setdefault(key, reason)
                    good = self.app.cfg_data.get(section, {}).get(name)
                    if good is None or good == data[section][name]:
                        data[section].pop(name)
                    else:
                        data[section][name] = good
                    progressed = True
                if not progressed:
                    errors.setdefault("", str(exc))
                    break
        return data, errors

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _changed(self, event) -> None:
        if isinstance(event, Input.Changed) and self._says_the_config(event.input):
            # set by the program (mount, auto-fit): nothing new to estimate, and the status
            # line keeps what auto-fit said
            return
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(DEBOUNCE_S, self.refresh_estimate)

    def _says_the_config(self, box: Input) -> bool:
        for dotted, _label, parse, _show in self.text_fields():
            if field_id(dotted) == box.id:
                if dotted in getattr(self, "field_errors", {}):
                    return False
                try:
                    return parse(box.value.strip()) == self.app.get_value(dotted, field_default(dotted))
                except ValueError:
                    return False
        return False

    def refresh_estimate(self) -> None:
        data, errors = self.read_fields()
        self.field_errors = errors
        for dotted, *_ in all_text_fields():
            box = self.query_one(f"#{field_id(dotted)}-error", Static)
            reason = errors.get(dotted)
            box.update(Text(f"✗ {reason}", style="bold red") if reason else "")
            box.display = bool(reason)
            self.query_one(f"#{field_id(dotted)}", Input).set_class(bool(reason), "-invalid")
        self.app.cfg_data = data
        if errors:
            first = next(iter(errors))
            self.set_status(f"{first or 'settings'}: {errors[first]}", "error")
        self.show_estimate()

    # ---- the estimate ----------------------------------------------------------------

    def show_estimate(self) -> None:
        est_mod = estimator()
        totals = self.query_one("#totals", Static)
        spec = self.app.spec
        if est_mod is None:
            totals.update(Text("the estimator (core.estimate) is not installed", style="red"))
            return
        if spec is None or self.gpu is None:
            totals.update(Text("waiting for the model's numbers…" if spec is None
                               else "no GPU profile: choose one in step 1 (ctrl+b ×3)", style="dim"))
            return
        try:
            cfg = self.app.estimate_config()
            est = est_mod.estimate(spec, cfg, self.gpu)
            plain = est_mod.estimate(spec, cfg, self.gpu, recipe="plain")
        except UserError as exc:
            # e.g. targets that match no layer of this model: said here, and Next waits for a fix
            self.estimate_error = str(exc)
            totals.update(Text(str(exc), style="red"))
            key = str(exc).split(" ", 1)[0]
            if key in {d for d, *_ in all_text_fields()}:  # the estimator names the field: show it there
                box = self.query_one(f"#{field_id(key)}-error", Static)
                box.update(Text("✗ " + str(exc).split(" ", 1)[1].splitlines()[0], style="bold red"))
                box.display = True
            if not self.field_errors:
                self.set_status(str(exc).splitlines()[0], "error")
            return
        self.estimate_error = None
        step_s = None
        if hasattr(est_mod, "estimate_step_time"):
            try:
                step_s = float(est_mod.estimate_step_time(spec, cfg, self.gpu))
            except (UserError, TypeError, ValueError):
                step_s = None
        self.render_estimate(est, plain, step_s, cfg)

    def render_estimate(self, est: Any, plain: Any, step_s: float | None, cfg: RunConfig) -> None:
        """Show an estimate (core.estimate.Estimate, or anything with its fields) and its verdict."""
        from tui.screens.model import fit_badge

        self.app.last_estimate = est
        components = dict(attr(est, "components", default={}) or {})
        budget = attr(est, "budget_gib", default=None) or attr(self.gpu, "budget_gib", "total_gib")
        total = float(attr(est, "total_gib", default=sum(components.values())))
        plain_total = float(attr(plain, "total_gib", default=0.0))
        self.query_one("#vram", VramBar).show(components, budget, total, plain_total)
        self.query_one("#estimate-title", Label).update(f"Peak memory on {attr(self.gpu, 'name', default='the GPU')}")
        self.verdict = str(attr(est, "verdict", default="?"))
        out = Text()
        out.append(f"snugtune     {_gib(total)}  ")
        out.append_text(fit_badge(self.verdict))
        out.append(f"\nplain recipe {_gib(plain_total)}  ")
        out.append_text(fit_badge(attr(plain, "verdict")))
        if budget:
            out.append(f"\nbudget       {_gib(float(budget))}", style="dim")
        too_long = position_warning(self.app.spec, cfg.data.max_seq_len)
        if too_long:
            out.append(f"\n! {too_long}", style="bold yellow")
        self.query_one("#totals", Static).update(out)
        timing = self.timing_text(step_s, cfg)
        plan = attr(est, "plan", default=None)
        if plan is not None and hasattr(plan, "blocks_at"):
            # what the engine will do with this memory (core.plan): the decisions that change it
            b = plan.blocks_at(plan.tokens)
            line = f"\nplan: {b.checkpointed} blocks checkpointed, {b.kept} kept"
            line += ", inputs offloaded" if b.offloaded else ""
            line += f"; {plan.compute_dtype}, {plan.optimizer}; CUDA graphs {'on' if plan.cuda_graphs else 'off'}"
            timing.append(line, style="dim")
        self.query_one("#timing", Static).update(timing)
        if not self.field_errors:
            if fit_badge(self.verdict).plain == "too big":
                self.set_status(f"does not fit: {total:.2f} GiB > {float(budget or 0):.2f} GiB budget — "
                                "ctrl+f auto-fits, or lower sequence length / micro-batch", "error")
            elif too_long:
                self.set_status(f"{too_long} (Sequence len)", "warning")
            elif few := self.few_steps(cfg):
                self.set_status(f"{few} · ctrl+n trains as set", "warning")
            else:
                self.set_status(f"estimated peak {total:.2f} GiB of {float(budget or 0):.2f} GiB · ctrl+n to train")

    def timing_text(self, step_s: float | None, cfg: RunConfig) -> Text:
        if step_s is None:
            return Text("")
        steps = self.steps_per_epoch(cfg)
        # durations as the rest of the wizard writes them (89s, 22m28s); decimals only below 10 s
        out = Text(f"≈ {step_s:.2f}s per step" if step_s < 10 else f"≈ {fmt_duration(step_s)} per step",
                   style="bold")
        if steps:
            out.append(f"\n{_about(step_s * steps)} per epoch ({plural(steps, 'step')})", style="bold")
        elif self.data_error:
            out.append(f"\nper epoch: unknown, the data could not be read ({self.data_error})", style="dim")
        if cfg.train.max_steps:
            out.append(f"\nmax_steps {cfg.train.max_steps}: {_about(step_s * cfg.train.max_steps)}")
        return out

    def few_steps(self, cfg: RunConfig) -> str | None:
        """core.plan's note when the whole run is too few optimizer steps to learn much (epochs-based)."""
        from core.plan import few_steps_note, planned_steps

        per_epoch = self.steps_per_epoch(cfg)
        if not per_epoch or cfg.train.max_steps:
            return None
        return few_steps_note(planned_steps(per_epoch, 1, 1, cfg.train.epochs, None), per_epoch, None, wizard=True)

    def steps_per_epoch(self, cfg: RunConfig) -> int | None:
        from core.plan import planned_steps  # the engine's own count (core.train uses it too)

        report = self.app.data_report or {}
        stats = attr(report, "length_stats", default={}) or {}
        mean = attr(stats, "mean")
        n = attr(report, "samples_total", "num_samples", default=None)
        if not n:
            return None
        tokens = float(mean) * int(n) if mean is not None else None
        # packed: rows are max_seq_len tokens of samples laid end to end; unpacked: one a sample
        rows = max(1, -(-int(tokens) // cfg.data.max_seq_len)) if (tokens is not None and cfg.data.packing) else int(n)
        return planned_steps(rows, cfg.train.micro_batch, cfg.train.grad_accum, 1.0, None)

    # ---- auto-fit ---------------------------------------------------------------------

    def action_autofit(self) -> None:
        est_mod = estimator()
        if est_mod is None or self.app.spec is None or self.gpu is None:
            self.set_status("auto-fit needs the model and a GPU profile", "error")
            return
        self.save_state()  # what is typed counts, even inside the debounce
        try:
            # the auto-fit `snugtune estimate --autofit` runs: the model's position limit, the card,
            # and a fitting setting kept unless another is faster by the estimate
            result = shared_autofit()(self.app.spec, self.app.estimate_config(), self.gpu)
        except UserError as exc:
            self.set_status(f"auto-fit: {exc}", "error")
            return
        notes = list(attr(result, "notes", default=[]) or [])
        if not attr(result, "fits", default=False):
            tips = list(attr(result, "suggestions", default=[]) or [])
            self.set_status("auto-fit: " + ("; ".join(notes) or "nothing fits this card")
                            + (" — to fit: " + "; ".join(tips[:2]) if tips
                               else " — choose a smaller model or a larger budget"), "error")
            return
        # core.estimate.FitResult: the longest sequence and largest micro-batch that fit,
        # with gradient accumulation keeping the effective batch
        new = {"data.max_seq_len": result.max_seq_len, "train.micro_batch": result.micro_batch,
               "train.grad_accum": result.grad_accum}
        for dotted, value in new.items():
            self.query_one(f"#{field_id(dotted)}", Input).value = str(value)
            self.app.set_value(dotted, value)
        self.refresh_estimate()
        said = "auto-fit: " + ("; ".join(notes) if notes else "the settings already fit; nothing changed")
        too_long = position_warning(self.app.spec, int(result.max_seq_len))
        if too_long:
            self.set_status(f"{said}; but {too_long}", "warning")
        else:
            self.set_status(said, "ok")

    # ---- leaving -------------------------------------------------------------------

    def save_state(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.refresh_estimate()

    def leave_problem(self) -> str | None:
        if self.field_errors:
            key = next(iter(self.field_errors))
            return f"{key}: {self.field_errors[key]}"
        try:
            self.app.config()
        except ConfigError as exc:
            return str(exc)
        if self.estimate_error:
            return self.estimate_error.splitlines()[0]
        if self.verdict is not None and fit_badge_word(self.verdict) == "too big":
            return "these settings do not fit the card's memory: ctrl+f auto-fits them"
        return None


def shared_autofit():
    """The auto-fit `snugtune estimate --autofit` runs: core.estimate.fit_for once issue 9 has
    made it the one auto-fit (it respects the model's positions), core.estimate.autofit before.
    One function, so the wizard and the CLI cannot disagree (issue 14: the wizard's ignored the
    model's context length); tests/test_tui_issue14.py compares the two."""
    from core import estimate

    return getattr(estimate, "fit_for", None) or estimate.autofit


def position_warning(spec: Any, seq: int) -> str | None:
    """Said when the sequence is longer than the positions the model was trained with."""
    limit = attr(spec, "max_position_embeddings")
    if isinstance(limit, int) and seq > limit:
        return f"{seq:,} tokens is longer than the model's {limit:,} positions: quality degrades past them"
    return None


def _about(seconds: float) -> str:
    # "≈ 3s", but "<1s" alone: "≈ <1s" says the same twice
    text = fmt_duration(seconds)
    return text if text.startswith("<") else f"≈ {text}"


def _gib(x: float) -> str:
    # a 48,462 GiB plain-recipe total must not push the verdict off a 36-column panel
    return f"{x:5.2f} GiB" if x < 1000 else f"{x:,.0f} GiB"


def fit_badge_word(verdict: str) -> str:
    from tui.screens.model import fit_badge

    return fit_badge(verdict).plain


def _filled(data: dict) -> dict:
    # the model and data are chosen in other steps: stand-ins keep them from masking field errors
    data = copy.deepcopy(data)
    if not data.get("model", {}).get("name_or_path"):
        data.setdefault("model", {})["name_or_path"] = "-"
    if not data.get("data", {}).get("path"):
        data.setdefault("data", {})["path"] = "-"
    return data
