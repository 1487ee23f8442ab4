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
