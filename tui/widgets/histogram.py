"""A horizontal text histogram of token lengths, with the truncation point marked."""
from __future__ import annotations

from rich.text import Text


def render_histogram(edges: list[float], counts: list[int], max_seq_len: int | None, width: int = 30) -> Text:
    """One line per bin: `  0-128   ████████ 42`; bins past max_seq_len are marked as truncated."""
    out = Text()
    if not counts:
        return Text("no lengths", style="dim")
    peak = max(counts) or 1
    for i, count in enumerate(counts):
        lo = int(edges[i]) if i < len(edges) else 0
        hi = int(edges[i + 1]) if i + 1 < len(edges) else lo
        cut = max_seq_len is not None and hi > max_seq_len
        n = round(count / peak * width)
        out.append(f"{lo:>6}-{hi:<6}", style="dim")
        # truncated bins use a different character, not only a colour
        out.append(("░" if cut else "█") * n, style="red" if cut else "green")
        out.append(f" {count}")
        if cut:
            out.append(" cut", style="bold")
        if i < len(counts) - 1:
            out.append("\n")
    return out
