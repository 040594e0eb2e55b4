"""Errors a user can fix. Each says what is wrong, where, and how to fix it, in one message.

The CLI prints a UserError's message alone (no traceback) and exits non-zero; the wizard
shows it beside the field it concerns. Anything else escaping is a bug in snugtune.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, with a message fit to show as it is."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message, self.hint = message, hint
        super().__init__(message if not hint else f"{message}\n  hint: {hint}")
