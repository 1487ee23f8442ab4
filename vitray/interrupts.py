"""Ctrl-C in a driver loop that reads from Ray: noted as well as raised, so that it always stops the loop.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal is
handled. In a loop over a Ray Data iterator that can be inside a library's own code
(a queue wait, a finalizer, a clean-up path) where it may be taken for something else; then
the loop would carry on. `Interrupts` records every Ctrl-C, and `check()` at each step of the
loop raises it again, so one Ctrl-C stops the loop at its next step at the latest.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class Interrupts:
    """`with Interrupts() as ctrl_c: for step in loop: ...; ctrl_c.check()`."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: object = None
        self._main = threading.current_thread() is threading.main_thread()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        raise KeyboardInterrupt

    def __enter__(self) -> "Interrupts":
        if self._main:  # signal handlers belong to the main thread; elsewhere `check` never fires
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C came since the loop began, and keep the handler in place."""
        if self.count:
            raise KeyboardInterrupt
        if self._main and signal.getsignal(signal.SIGINT) != self._handle:
            signal.signal(signal.SIGINT, self._handle)  # a library replaced it for a while: take it back

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._main and self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
