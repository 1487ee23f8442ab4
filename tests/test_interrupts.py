"""Ctrl-C in a driver loop: raised where it lands, and raised again at the loop's next step if swallowed."""
from __future__ import annotations

import os
import signal
import time

import pytest

from vitray.interrupts import Interrupts


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)  # the handler runs (and raises) within this wait


def test_a_ctrl_c_that_a_library_swallows_still_stops_the_loop_at_its_next_step():
    before = signal.getsignal(signal.SIGINT)
    with Interrupts() as interrupts:
        interrupts.check()  # nothing yet
        try:
            ctrl_c()
        except KeyboardInterrupt:
            pass  # a library's clean-up path that takes it for something else
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_handler_a_library_puts_in_place_is_replaced_at_the_next_step():
    with Interrupts() as interrupts:
        signal.signal(signal.SIGINT, lambda *_: None)  # a library defers Ctrl-C and forgets to undo it
        interrupts.check()
        with pytest.raises(KeyboardInterrupt):
            ctrl_c()
        assert interrupts.count == 1


def test_sigterm_and_sighup_stop_like_ctrl_c_and_say_which_it_was(monkeypatch):
    from vitray import interrupts

    monkeypatch.setattr(interrupts, "_received", [])
    saved = {sig: signal.getsignal(sig) for sig in interrupts.STOP_SIGNALS}
    try:
        for sig in interrupts.STOP_SIGNALS:  # as a terminal starts a program (pytest may run under nohup)
            signal.signal(sig, signal.SIG_DFL)
        interrupts.handle_stop_signals()
        for sig, code, words in ((signal.SIGTERM, 143, "stopped by SIGTERM"), (signal.SIGHUP, 129, "stopped by SIGHUP"),
                                 (signal.SIGINT, 130, "interrupted")):
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(5)
            assert (interrupts.stop_exit_code(), interrupts.stopped()) == (code, words)
        error = interrupts.stop_error("{stopped} after epoch 3; the same command resumes")
        assert (str(error), error.exit_code) == ("interrupted after epoch 3; the same command resumes", 130)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_signal_inherited_as_ignored_stays_ignored():
    """`nohup` and a script's background jobs hand a process SIGHUP or SIGINT ignored: vitray honours that."""
    from vitray import interrupts

    saved = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        interrupts.handle_stop_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        with Interrupts() as stops:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            stops.check()
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, saved)
        interrupts.reset()


def test_a_driver_loop_stops_on_sigterm_even_after_a_library_replaced_the_handler(monkeypatch):
    from vitray import interrupts

    monkeypatch.setattr(interrupts, "_received", [])
    before = signal.getsignal(signal.SIGTERM)
    with Interrupts() as stops:
        signal.signal(signal.SIGTERM, lambda *_: None)  # ray.init's own handler, or a library's
        stops.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_tests_start_their_children_with_the_stop_signals_at_default():
    """A runner that starts the suite in the background hands it SIGINT ignored; children that a test stops
    with a signal must not inherit that (with_default_signals puts it back)."""
    import subprocess
    import sys

    from procs import with_default_signals

    probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"]
    saved = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        plain = subprocess.run(probe, capture_output=True, text=True, timeout=60).stdout.strip()
        wrapped = subprocess.run(with_default_signals(probe), capture_output=True, text=True, timeout=60).stdout.strip()
    finally:
        signal.signal(signal.SIGINT, saved)
    assert (plain, wrapped) == ("False", "True")
