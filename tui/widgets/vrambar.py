"""A stacked bar of the estimated peak GPU memory by component, against the card's budget."""
from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

# Each component gets a fill character as well as a colour, so the bar stays readable with
# 16 colours and with NO_COLOR (where only the characters tell the parts apart).
FILLS = ["█", "▓", "▒", "░", "▞", "▚", "■", "▪", "▄", "▀"]
COLOURS = ["blue", "magenta", "cyan", "green", "yellow", "bright_blue", "bright_magenta", "bright_cyan",
           "bright_green", "bright_yellow"]


# A total past this many budgets is drawn cut at that point (and said in words): the budget
# marker and the parts stay readable instead of shrinking to nothing at the left.
MAX_SCALE_X_BUDGET = 3


class VramBar(Widget):
    """Components in GiB as one bar; a `┃` marks the budget; legend below, one line each."""

    DEFAULT_CSS = """
    VramBar { height: auto; min-height: 3; }
    """

    data: reactive[tuple] = reactive(tuple, layout=True)

    def show(self, components: dict[str, float], budget_gib: float | None, total_gib: float,
             plain_total_gib: float | None = None) -> None:
        self.data = (tuple(components.items()), budget_gib, total_gib, plain_total_gib)

    def get_content_height(self, container, viewport, width) -> int:
        if not self.data:
            return 1
        comps, budget, total, _plain = self.data
        return 2 + len(comps) + (1 if budget and total > MAX_SCALE_X_BUDGET * budget else 0)

    def render(self) -> Text:
        if not self.data:
            return Text("estimate: waiting for a model and valid settings", style="dim")
        comps, budget, total, plain = self.data
        width = max(10, self.size.width - 1)
        # The scale is this run's total and the budget. The plain recipe's total is said in words
        # beside the bar: at 48,462 GiB it once set the scale and left the bar blank (issue 14).
        top = max([total, budget or 0.0, 0.1])
        clipped = bool(budget) and total > MAX_SCALE_X_BUDGET * budget
        if clipped:
            top = MAX_SCALE_X_BUDGET * budget
        scale = width / (top * 1.02)  # 2% headroom so the budget marker never falls off the end
        bar = Text()
        used = 0
        for i, (_name, gib) in enumerate(comps):
            # round cumulative ends, not each part, so rounding never drifts the total
            end = min(width, round((sum(g for _, g in comps[: i + 1])) * scale))
            n = max(0, end - used)
            bar.append(FILLS[i % len(FILLS)] * n, style=COLOURS[i % len(COLOURS)])
            used += n
        bar.append("·" * max(0, width - used), style="dim")
        if budget:
            pos = min(width - 1, max(0, round(budget * scale) - 1))
            over = total > budget
            bar = bar[:pos] + Text("┃", style="bold red" if over else "bold") + bar[pos + 1:]
        out = Text()
        out.append_text(bar)
        out.append("\n")
        scale_note = f"┃ = budget {budget:.2f} GiB" if budget else "no budget set"
        out.append(f"0 GiB{' ' * max(1, width - 5 - len(scale_note))}{scale_note}\n", style="dim")
        if clipped:
            out.append(f"bar cut at {MAX_SCALE_X_BUDGET}x the budget: {total:,.0f} GiB\n", style="bold")
        for i, (name, gib) in enumerate(comps):
            out.append(FILLS[i % len(FILLS)] * 2, style=COLOURS[i % len(COLOURS)])
            out.append(f" {name.replace('_', ' '):<18}{gib:6.2f} GiB")
            if i < len(comps) - 1:
                out.append("\n")
        return out
