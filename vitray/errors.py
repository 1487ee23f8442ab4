"""The one error type a user sees as a single line.

Anything raised as `VitrayError` reaches the terminal as `vitray: error: ...`
(exit 2 for bad input or usage, the given code otherwise) without a traceback.
"""
from __future__ import annotations


class VitrayError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
