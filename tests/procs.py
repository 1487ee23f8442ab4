"""Finding and stopping the processes a test started, and only those."""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path


def processes_of(temp_dir: str) -> list[int]:
    """Pids (not this one) whose command line names `temp_dir` (--temp-dir, sockets) or whose cwd is in it.

    Ray's workers and agents can outlive their raylet for a moment, and a job's driver runs
    in a session of its own: the temp dir, not the process tree, says what is ours.
    """
    mine = re.compile(re.escape(temp_dir) + r"(?![\w.-])")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if mine.search(cmdline) or mine.match(cwd):
            pids.append(int(proc.name))
    return pids


def kill_processes_of(temp_dir: str, grace: float) -> None:
    """SIGTERM, then after `grace` seconds SIGKILL, to every process of `temp_dir`; polls until they are gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_of(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while processes_of(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)


def ray_workers(*titles: str) -> list[int]:
    """Ray worker processes of this test session's Ray (descendants of this process only) whose
    title (Ray names a worker by its work, e.g. "ray::RayTrainWorker") starts with one of `titles`."""
    import psutil

    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if title.startswith(titles):
            pids.append(proc.pid)
    return pids


_DEFAULT_SIGNALS = ("import os, signal, sys\n"
                    "for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"
                    "    signal.signal(sig, signal.SIG_DFL)\n"
                    "os.execvp(sys.argv[1], sys.argv[1:])\n")


def with_default_signals(cmd: list[str]) -> list[str]:
    """`cmd`, started with SIGINT, SIGTERM and SIGHUP at their defaults, however the test run was started.

    A runner that starts its jobs in the background (a script's `cmd &`) hands them SIGINT
    ignored, and a process inherits that: vitray rightly honours it, so a test that stops a
    child with a signal must first put the signal back. exec keeps a default disposition.
    """
    import sys

    return [sys.executable, "-c", _DEFAULT_SIGNALS, *cmd]
