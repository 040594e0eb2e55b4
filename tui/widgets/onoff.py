"""A checkbox whose label ends in its state, "on" or "off", and whose box is ticked only when on.

Textual's checkbox draws the same `X` ticked or not and tells the two apart by colour only; under
NO_COLOR (where colours become greys) or in 16 colours the state is then unreadable (issue 14).
The label said "off" beside a box still drawn `▐X▌`, which reads as ticked: the X is now drawn
only when the value is on.
"""
from __future__ import annotations

from textual.widgets import Checkbox


class OnOff(Checkbox):
    def __init__(self, label: str, value: bool = False, **kwargs):
        self.base_label = label
        super().__init__(self._text(label, value), value, **kwargs)
        self.BUTTON_INNER = "X" if value else " "

    @staticmethod
    def _text(label: str, value: bool) -> str:
        return f"{label}: {'on' if value else 'off'}"

    def watch_value(self) -> None:
        super().watch_value()
        self.BUTTON_INNER = "X" if self.value else " "
        self.label = self._text(self.base_label, self.value)
