"""What one benchmark run measures and how: its sizes (`Sizes`, `QUICK`), the peak memory of a
process tree, the best-window rate of a loop, the steady rate of a scoring run from its committed
pieces, and the cost of creating a file.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

LABELS = ["Xminus", "Xplus", "Yminus", "Yplus", "passed"]


@dataclass(frozen=True)
class Sizes:
    """What one run measures; `--quick` shrinks it to a smoke test whose ratios mean little."""

    model: str = "vit-tiny"
    image_size: int = 64
    score_images: int = 1000  # the small scoring run; the large one has 10x as many
    score_batch: int = 256  # vitray score's default
    piece_rows: int = 512  # vitray score's default; a steady rate needs several pieces
    naive_images: int = 300
    train_images: int = 4000
    train_epochs: int = 3  # the first is warm-up and not counted
    train_batch: int = 32  # vitray train's default
    forward_seconds: float = 5.0
    # Large runs without and with maps, alternating: attention_overhead is the median of the
    # pairs' ratios, since this VM's speed drifts by ~20% from one minute to the next (three
    # pairs of one run have read 1.47, 1.30 and 1.00). Five: a pair is ~20 s.
    overhead_pairs: int = 5
    # Bare loop then Ray Train, alternating: train_ray_vs_torch is the median of the pairs'
    # ratios (one pair each way has read anything from 0.82 to 1.23 with no change to the loop).
    train_pairs: int = 3
    pretrain_batch: int = 64  # vitray pretrain's default
    warm_up: bool = True  # a first, unmeasured score run (see cpu_benchmark)


QUICK = Sizes(score_images=60, piece_rows=32, naive_images=30, train_images=300, train_epochs=2, forward_seconds=1.0,
              overhead_pairs=1, train_pairs=1, warm_up=False)


class PeakMemory:
    """Peak proportional set size (PSS) of this process and all its descendants (the embedded Ray).

    PSS shares each shared page (Ray's object store, libraries) among the processes that map it,
    so the sum is the memory the run holds, without counting shared pages once per process.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.sample())

    @staticmethod
    def sample() -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total


def rate(fn: Callable[[], int], seconds: float, windows: int = 5) -> float:
    """Images/s of calling `fn` (returns images done): the best of `windows` windows of `seconds` in all.

    The best, not the mean: on a shared machine other work only ever slows a window down.
    """
    fn()
    best = 0.0
    for _ in range(windows):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            done += fn()
        best = max(best, done / (time.perf_counter() - start))
    return best


def committed(stamps: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """The stamps of committed pieces: a run also reports its start, before any image is scored."""
    return [(t, n) for t, n in stamps if n > 0]


def steady_rate(stamps: list[tuple[float, int]]) -> float:
    """Images/s from the first committed piece to the last, from (time, images committed) stamps.

    Start-up (Ray's workers, the actor importing torch and loading the model) is before the first
    piece and drops out; everything after it counts, including the time the model stage shares the
    cores with the decode stage that Ray Data runs ahead of it.
    """
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    if len(stamps) < 3 or t1 <= t0:
        raise RuntimeError(f"only {len(stamps)} pieces were committed: too few to time a steady rate "
                           "(score more images than --piece-rows times 3)")
    return (n1 - n0) / (t1 - t0)


def file_create_ms(folder: str, files: int = 500, size: int = 9000) -> float:
    """Milliseconds to create and write one overlay-sized file in `folder` (the files are removed)."""
    scratch = os.path.join(folder, f"create-test-{os.getpid()}")
    os.makedirs(scratch)
    data = os.urandom(size)
    started = time.perf_counter()
    for i in range(files):
        with open(os.path.join(scratch, f"{i}.png"), "wb") as f:
            f.write(data)
    elapsed = time.perf_counter() - started
    shutil.rmtree(scratch)
    return elapsed / files * 1e3
