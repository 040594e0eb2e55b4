"""The line at the top of every step: where the user is among the six steps."""
from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

STEP_TITLES = ["GPU", "Model", "Data", "Settings", "Train", "Done"]


class StepBar(Widget):
    """`snugtune  1 GPU > 2 Model > ...` with the current step in reverse video.

    Reverse video (not colour alone) marks the current step, so it reads with NO_COLOR too.
    """

    DEFAULT_CSS = """
    StepBar { height: 1; background: $panel; }
    """

    def __init__(self, current: int, **kwargs):
        super().__init__(**kwargs)
        self.current = current

    def render(self) -> Text:
        text = Text(" snugtune ", style="bold")
        # At 80 columns the full titles fit (~62 cells); narrower terminals get numbers only.
        short = self.size.width and self.size.width < 64
        for i, title in enumerate(STEP_TITLES):
            if i:
                text.append(" › ", style="dim")
            label = f"{i + 1}" if short and i != self.current else f"{i + 1} {title}"
            if i == self.current:
                text.append(f" {label} ", style="bold reverse")
            elif i < self.current:
                text.append(label)
            else:
                text.append(label, style="dim")
        return text
