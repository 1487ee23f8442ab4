"""Plain progress lines (no terminal): one per interval, and a last one only when it says something new."""
from __future__ import annotations

import io

from vitray.progress import Progress


def test_the_last_count_is_said_once(monkeypatch):
    monkeypatch.setenv("VITRAY_PROGRESS_INTERVAL", "0")
    stream = io.StringIO()
    bar = Progress("scoring", 4, stream=stream, tty=False)
    bar.set(4, errors=0)
    bar.close()
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == ["scoring: 4/4 img (100%)"]


def test_a_count_not_yet_said_is_said_at_the_close(monkeypatch):
    monkeypatch.setenv("VITRAY_PROGRESS_INTERVAL", "3600")
    stream = io.StringIO()
    with Progress("epoch 1/2", 10, unit="batch", stream=stream, tty=False) as bar:
        bar.update(3)
        assert stream.getvalue() == ""
    assert stream.getvalue().startswith("epoch 1/2: 3/10 batch (30%)") and stream.getvalue().count("\n") == 1
