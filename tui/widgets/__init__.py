"""Self-contained widgets of the wizard (each carries its own DEFAULT_CSS)."""
