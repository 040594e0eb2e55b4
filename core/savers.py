"""Memory savers for training (placeholder until the savers land; see docs/ARCHITECTURE.md)."""
from __future__ import annotations


def install_savers(model, cfg, device_info=None) -> dict:
    """Apply the memory savers the configuration asks for; returns what was applied."""
    return {}
