"""Progress a person can read: a bar on a terminal, a plain line every few seconds elsewhere.

On a TTY a tqdm bar (counts, rate, ETA) redraws in place; where stderr is a file or a
pipe (CI, `ray job logs`) the same facts come as one line every `interval` seconds and
at the end, so a log stays readable. Ray workers never draw: they send their progress to
the driver (`Channel`), which draws it, so no line is cut up by Ray's log prefixes.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable, TextIO

log = logging.getLogger(__name__)

INTERVAL_ENV = "VITRAY_PROGRESS_INTERVAL"  # seconds between plain progress lines (default 10)


def _interval() -> float:
    try:
        return max(0.5, float(os.environ.get(INTERVAL_ENV, "10")))
    except ValueError:
        return 10.0


def clock(seconds: float) -> str:
    """Seconds as m:ss, or h:mm:ss from an hour on."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`with Progress("score", total, unit="img") as bar: bar.update(n, errors=3)`."""

    def __init__(self, desc: str, total: int | None, unit: str = "img", stream: TextIO | None = None,
                 tty: bool | None = None, elapsed: float = 0.0) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.done = 0
        self.extra: dict[str, Any] = {}
        self.started = time.monotonic() - elapsed  # a count that began before this object (a worker's)
        self._last_line = time.monotonic()
        self._shown: int | None = None  # the count the last plain line said
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True,
                             smoothing=0.1, unit_scale=False)
            self._bar.start_t -= elapsed

    def update(self, n: int = 1, **extra: Any) -> None:
        self.done += n
        self.extra.update(extra)
        if self._bar is not None:
            self._bar.update(n)
            if extra:
                self._bar.set_postfix(self.extra, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_line >= _interval():
            self._last_line = now
            self._line()

    def set(self, done: int, **extra: Any) -> None:
        """Set the count (rather than add to it)."""
        self.update(done - self.done, **extra)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def _line(self) -> None:
        rate = self.rate()
        parts = [f"{self.desc}: {self.done:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:,.1f} {self.unit}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {clock((self.total - self.done) / rate)}")
        parts += [f"{k} {v}" for k, v in self.extra.items()]
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()
        self._shown = self.done

    def close(self, quiet: bool = False) -> None:
        """End the bar; without a TTY a last line, unless `quiet` (a line of its own follows)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.done and not quiet and self.done != self._shown:
            self._line()  # the last count, unless the last line said it already

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Channel:
    """Messages from Ray workers to the driver: workers `send`, a driver thread hands them to `handle`.

    A `ray.util.queue.Queue` (a small actor, no CPU) carries them; a lost channel (its node
    gone) costs only progress, never the run.
    """

    def __init__(self, handle: Callable[[dict[str, Any]], None], poll_s: float = 0.25) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._handle, self._poll_s = handle, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain_loop, name="vitray-progress", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            messages = self.queue.get_nowait_batch(self.queue.qsize())
        except Exception:  # noqa: BLE001 - the channel's actor is gone: progress stops, the run goes on
            return
        for message in messages:
            try:
                self._handle(message)
            except Exception as exc:  # noqa: BLE001 - a display problem must not stop training
                log.debug("progress message %r not shown: %s", message, exc)

    def _drain_loop(self) -> None:
        while not self._stop.wait(self._poll_s):
            self._drain()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001
            pass


class LocalChannel:
    """`Channel` for work in the driver's own process: each message is handed to `handle` at once."""

    def __init__(self, handle: Callable[[dict[str, Any]], None]) -> None:
        self._handle = handle
        self.queue = self  # what `send` puts messages on

    def put_nowait(self, message: dict[str, Any]) -> None:
        try:
            self._handle(message)
        except Exception as exc:  # noqa: BLE001 - a display problem must not stop training
            log.debug("progress message %r not shown: %s", message, exc)

    def close(self) -> None:
        pass


def send(queue: Any, message: dict[str, Any]) -> None:
    """From a worker: put a message on the driver's channel without ever failing or blocking the work."""
    if queue is None:
        return
    try:
        queue.put_nowait(message)
    except Exception:  # noqa: BLE001 - full or gone: progress is best effort
        pass
