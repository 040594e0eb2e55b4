"""Step 1: which GPU will train — a detected card, a profile to plan for, or the CPU."""
from __future__ import annotations

from typing import Any

from textual import on, work
from textual.containers import Horizontal
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from tui.messages import GpusDetected
from tui.screens.base import StepScreen, attr, fmt_gib
from tui.keyorder import focus_now


def describe_gpu(g: Any) -> str:
    """One line for a detected card: name, memory, compute capability, bf16."""
    name = attr(g, "name", default="GPU")
    total = attr(g, "total_gib", "memory_total_gib", "vram_gib")
    free = attr(g, "free_gib", "memory_free_gib")
    cc = attr(g, "compute_capability", "capability", "cc")
    if isinstance(cc, (tuple, list)):
        cc = ".".join(str(c) for c in cc)
    bf16 = attr(g, "bf16", "supports_bf16", default=False)
    parts = [name, f"{fmt_gib(total)}" + (f" ({float(free):.1f} free)" if free is not None else "")]
    if cc:
        parts.append(f"cc {cc}")
    parts.append("bf16" if bf16 else "fp16 only")
    return " · ".join(parts)


def describe_profile(name: str, prof: Any) -> str:
    total = attr(prof, "total_gib", "vram_gib", "memory_gib")
    label = attr(prof, "label", "display_name", "name", default=name)
    bf16 = attr(prof, "bf16", "supports_bf16", default=False)
    text = f"{name:<18} {fmt_gib(total):>9}  {'bf16' if bf16 else 'fp16'}"
    if label and label != name:
        text += f"  {label}"
    return text


class GpuScreen(StepScreen):
    STEP = 0

    def compose_body(self):
        yield Label("Which GPU will train? Pick a detected card, a card to plan for, or the CPU.", classes="title")
        yield Static("Looking for NVIDIA GPUs…", id="detected", markup=False)
        yield OptionList(id="choices")
        with Horizontal(classes="row"):
            yield Label("Memory budget GiB", classes="field-label")
            budget = self.app.get_value("gpu.vram_budget_gib")
            yield Input("" if budget is None else str(budget), placeholder="blank: the whole card",
                        id="budget", compact=True)
        yield Static("", classes="hint", id="budget-hint")

    def on_mount(self) -> None:
        # the help text comes from core.config (pydantic): loaded just after the first frame
        self.call_after_refresh(self._fill_hint)
        if self.app.detected_gpus is None:
            self.detect()
        else:
            self.show_choices(self.app.detected_gpus, self.app.gpu_error)
        focus_now(self.query_one("#choices"))

    def _fill_hint(self) -> None:
        from core.config import field_help

        self.query_one("#budget-hint", Static).update(field_help("gpu.vram_budget_gib"))

    @work(thread=True, exit_on_error=False, name="GPU detection")
    def detect(self) -> None:
        from core import gpu

        try:
            found = list(gpu.detect_gpus())
            error = None if found else getattr(gpu, "nvml_status", lambda: None)()
        except Exception as exc:  # noqa: BLE001 - no driver, no NVML: the wizard goes on without
            found, error = [], str(exc)
        self.post_message(GpusDetected(found, error))

    @on(GpusDetected)
    def _detected(self, msg: GpusDetected) -> None:
        self.app.detected_gpus, self.app.gpu_error = msg.gpus, msg.error
        self.show_choices(msg.gpus, msg.error)

    def show_choices(self, gpus: list, error: str | None) -> None:
        from core import gpu as core_gpu

        detected = self.query_one("#detected", Static)
        if gpus:
            lines = []
            for i, g in enumerate(gpus):
                lines.append(f"GPU {i}: {describe_gpu(g)}")
                for proc in attr(g, "processes", default=[]) or []:
                    if isinstance(proc, (tuple, list)):  # core.gpu: (pid, name, used GiB)
                        pid, pname, used = (list(proc) + [None, None, None])[:3]
                    else:
                        pname, pid = attr(proc, "name", default="?"), attr(proc, "pid", default="?")
                        used = attr(proc, "used_gib", "memory_gib", default=None)
                    lines.append(f"   held by {pname} (pid {pid}){' ' + fmt_gib(used) if used is not None else ''}")
            detected.update("\n".join(lines))
        else:
            reason = f": {error}" if error else ""
            detected.update(f"No NVIDIA GPU found{reason}.\nPlan with a card's profile (estimates only), "
                            "or train on the CPU (the demo).")
        options: list[Option] = []
        for i, g in enumerate(gpus):
            options.append(Option(f"GPU {i}  {describe_gpu(g)}", id=f"detected:{i}"))
        for k in range(2, len(gpus) + 1):  # one run on several cards: one process each (core.distributed)
            options.append(Option(f"GPUs 0-{k - 1}  {k} cards at once, one process each: the plan is per card, "
                                  f"the batch {k}x", id=f"several:{k}"))
        options.append(Option("cpu                train on the CPU: slow, for the demo and trials", id="profile:cpu"))
        for name, prof in core_gpu.PROFILES.items():
            if name == "cpu":
                continue
            options.append(Option(describe_profile(name, prof), id=f"profile:{name}"))
        choices = self.query_one("#choices", OptionList)
        choices.clear_options()
        choices.add_options(options)
        # Highlight what the configuration already says (a preset, or coming back here).
        profile = self.app.get_value("gpu.profile", "auto")
        nproc = self.app.get_value("gpu.nproc") or 1
        wanted = (f"several:{nproc}" if nproc > 1 and profile == "auto" and gpus
                  else f"detected:{self.app.get_value('gpu.device_index', 0)}" if profile == "auto" and gpus
                  else "profile:cpu" if profile == "auto" else f"profile:{profile}")
        ids = [o.id for o in options]
        choices.highlighted = ids.index(wanted) if wanted in ids else 0

    @on(OptionList.OptionHighlighted, "#choices")
    def _picked(self, event: OptionList.OptionHighlighted) -> None:
        kind, _, value = (event.option.id or "").partition(":")
        self.app.set_value("gpu.nproc", int(value) if kind == "several" else None)
        if kind == "several":
            self.app.set_value("gpu.profile", "auto")
            self.app.set_value("gpu.device_index", 0)
        elif kind == "detected":
            self.app.set_value("gpu.profile", "auto")
            self.app.set_value("gpu.device_index", int(value))
        else:
            self.app.set_value("gpu.profile", value)
            self.app.set_value("gpu.device_index", None)

    @on(OptionList.OptionSelected, "#choices")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.app.action_next_step()

    def save_state(self) -> None:
        raw = self.query_one("#budget", Input).value.strip()
        try:
            self.app.set_value("gpu.vram_budget_gib", float(raw) if raw else None)
        except ValueError:
            pass  # leave_problem says what is wrong

    def leave_problem(self) -> str | None:
        raw = self.query_one("#budget", Input).value.strip()
        if raw:
            try:
                value = float(raw)
            except ValueError:
                return f"memory budget: {raw!r} is not a number of GiB (e.g. 3.5), or leave it blank"
            if not 0 < value <= 1024:
                return "memory budget: must be more than 0 and at most 1024 GiB"
            card, total = self.chosen_card()
            if total and value > total:
                return (f"memory budget: {value:g} GiB is more than the {card}'s {total:.2f} GiB; "
                        "give at most that, or leave it blank for the whole card")
            # and what core.gpu itself refuses (the same rule the CLI applies)
            from core.errors import UserError
            from core.gpu import resolve_gpu

            try:
                resolve_gpu(self.app.get_value("gpu.profile", "auto") or "auto", value,
                            self.app.get_value("gpu.device_index", 0) or 0)
            except UserError as exc:
                return str(exc).splitlines()[0]
        return None

    def chosen_card(self) -> tuple[str, float | None]:
        """The highlighted card's name and memory in GiB (None for the CPU, whose budget is RAM)."""
        from core import gpu as core_gpu

        profile = self.app.get_value("gpu.profile", "auto")
        if profile == "auto":
            gpus = self.app.detected_gpus or []
            index = int(self.app.get_value("gpu.device_index", 0) or 0)
            if index < len(gpus):
                g = gpus[index]
                return str(attr(g, "name", default="GPU")), attr(g, "total_gib", "memory_total_gib")
            return "CPU", None
        prof = core_gpu.PROFILES.get(profile)
        if prof is None or profile == "cpu":
            return profile, None
        return str(attr(prof, "label", "name", default=profile)), attr(prof, "total_gib", "vram_gib", "memory_gib")
