"""Messages that workers post to screens: small dataclasses, one line of docstring each.

Workers never touch widgets; they post one of these and the screen's handler updates the
screen on the UI thread (Textual delivers messages there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


@dataclass
class GpusDetected(Message):
    """NVML detection finished: the cards found, or why none were."""

    gpus: list[Any]
    error: str | None = None


@dataclass
class ModelsListed(Message):
    """A model list arrived from one source (catalog, cache or hub)."""

    source: str
    specs: list[Any]
    error: str | None = None


@dataclass
class ModelResolved(Message):
    """A typed model id or path was looked up: its spec, or the reason it failed."""

    query: str
    spec: Any = None
    error: str | None = None


@dataclass
class DataInspected(Message):
    """`snugtune data inspect --json` finished: its report, or the error it printed."""

    path: str
    report: dict | None = None
    error: str | None = None
    key: tuple = ()  # what was read (tui.app.SnugtuneApp.data_key); a late answer to an older ask is dropped


@dataclass
class EstimateReady(Message):
    """A VRAM estimate for the settings on screen (and the plain recipe's, to compare)."""

    estimate: Any
    plain: Any = None
    seconds_per_epoch: float | None = None


@dataclass
class RunEvent(Message):
    """One event from a run's events.jsonl (engine -> viewer)."""

    event: dict


@dataclass
class RunGone(Message):
    """The engine process ended without a final event; `log_tail` is what it printed."""

    log_tail: str


@dataclass
class GpuStats(Message):
    """Live NVML readings for the card a run trains on (memory, temperature, power)."""

    stats: Any

    # only the newest reading matters: merge a backlog into one
    def can_replace(self, message: Message) -> bool:
        return isinstance(message, GpuStats)


@dataclass
class ChatReply(Message):
    """A reply from the chat process: which model ('adapter' or 'base') said what."""

    who: str
    text: str
    error: str | None = None


@dataclass
class JobDone(Message):
    """A background command (export) finished: what it printed and whether it worked."""

    what: str
    ok: bool
    output: str = ""
    extra: dict = field(default_factory=dict)
