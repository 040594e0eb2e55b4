"""A checkbox whose label ends in its state, "on" or "off".

Textual's checkbox draws the same `X` ticked or not and tells the two apart by colour only; under
NO_COLOR (where colours become greys) or in 16 colours the state is then unreadable (issue 14).
"""
from __future__ import annotations

from textual.widgets import Checkbox


class OnOff(Checkbox):
    def __init__(self, label: str, value: bool = False, **kwargs):
        self.base_label = label
        super().__init__(self._text(label, value), value, **kwargs)

    @staticmethod
    def _text(label: str, value: bool) -> str:
        return f"{label}: {'on' if value else 'off'}"

    def watch_value(self) -> None:
        super().watch_value()
        self.label = self._text(self.base_label, self.value)
