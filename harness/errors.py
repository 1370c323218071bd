"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class HarnessError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
