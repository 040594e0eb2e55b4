"""The loss curve of the live panel (textual-plotext), train loss and eval loss."""
from __future__ import annotations

from textual_plotext import PlotextPlot


class LossPlot(PlotextPlot):
    """Plots (step, loss) pairs; call `add` then `redraw` (redraws are cheap but not free)."""

    DEFAULT_CSS = """
    LossPlot { height: 1fr; min-height: 6; }
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.train: list[tuple[int, float]] = []
        self.evals: list[tuple[int, float]] = []

    def on_mount(self) -> None:
        self.redraw()

    def add(self, step: int, loss: float, kind: str = "train") -> None:
        (self.train if kind == "train" else self.evals).append((step, loss))

    def redraw(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("loss")
        # braille markers give 2x4 dots per cell: the most curve an 80x24 terminal can show
        if self.train:
            plt.plot([s for s, _ in self.train], [v for _, v in self.train], marker="braille", label="train")
        if self.evals:
            plt.scatter([s for s, _ in self.evals], [v for _, v in self.evals], marker="x", label="eval")
        self.refresh()
