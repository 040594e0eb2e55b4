"""`snugtune gpus`, `snugtune models`, `snugtune estimate`: know before you train (no torch)."""
from __future__ import annotations


def register(subparsers) -> None:
    """Add the know-before-you-train subcommands (filled in as core.gpu/catalog/estimate land)."""
    return None
