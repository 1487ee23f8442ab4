"""Stopping a run: Ctrl-C, SIGTERM and SIGHUP alike, and in a driver loop that reads from Ray, for sure.

`ray job stop`, Kubernetes, systemd and a cron's timeout send SIGTERM; a closed terminal sends
SIGHUP. `handle_stop_signals` makes each of them stop a run as Ctrl-C does (a KeyboardInterrupt
in the main thread, so every command keeps what it finished), and records which signal it was:
the run ends with its conventional exit code (128 + the signal: 130, 143, 129) and one line
that names it. A signal the process inherited as ignored (`nohup`, a script's background job)
stays ignored.

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

from vitray.errors import VitrayError


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_EXIT_CODES = frozenset(128 + int(s) for s in STOP_SIGNALS)
_received: list[int] = []  # the stop signals this process received, in order


def _stop(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def reset() -> None:
    """Forget the stop signals received: a new command starts (the CLI, or a program running several)."""
    _received.clear()


def note(signum: int) -> None:
    """Record a stop signal that reached the run another way (Ray's own SIGTERM handler exits with it)."""
    _received.append(signum)


def handle_stop_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, each recorded.

    Called when a command starts and again after Ray starts (`ray.init` puts in a SIGTERM
    handler of its own that exits the process on the spot).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        current = signal.getsignal(sig)
        if current is signal.SIG_IGN or current is _stop:
            continue
        signal.signal(sig, _stop)


def stop_signal() -> int:
    """The signal that stopped the run (Ctrl-C's SIGINT when none was recorded)."""
    return _received[-1] if _received else int(signal.SIGINT)


def stop_exit_code() -> int:
    return 128 + stop_signal()


def stopped() -> str:
    """The words for how the run stopped: 'interrupted' (Ctrl-C), 'stopped by SIGTERM', ..."""
    sig = stop_signal()
    return "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"


def stop_error(line: str) -> VitrayError:
    """The one-line error of a stopped run, with the signal's exit code; `{stopped}` in `line` says how it stopped."""
    return VitrayError(line.format(stopped=stopped()), exit_code=stop_exit_code())


class Interrupts:
    """`with Interrupts() as ctrl_c: for step in loop: ...; ctrl_c.check()`: for Ctrl-C, SIGTERM and SIGHUP."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, object] = {}
        self._main = threading.current_thread() is threading.main_thread()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        _received.append(signum)
        raise KeyboardInterrupt

    def __enter__(self) -> "Interrupts":
        if self._main:  # signal handlers belong to the main thread; elsewhere `check` never fires
            self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
            self._take()
        return self

    def _take(self) -> None:
        for sig, before in self._previous.items():
            if before is not signal.SIG_IGN and signal.getsignal(sig) != self._handle:
                signal.signal(sig, self._handle)

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop signal came since the loop began, and keep the handlers in place."""
        if self.count:
            raise KeyboardInterrupt
        if self._main:
            self._take()  # a library replaced one for a while: take it back

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._main and self._previous:
            for sig, before in self._previous.items():
                if before is not None:
                    signal.signal(sig, before)
