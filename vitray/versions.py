"""The library versions vitray was tested on, and a note naming the one that differs when a library fails.

`make lock` writes `requirements.lock` at the repository's root: the exact releases the test
suite passed on. A checkout (and the working directory a Ray job ships) has it; an install
from a wheel does not, and then no note is given.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import re

LOCK_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.lock")
MODEL_LIBRARIES = ("transformers", "torch", "safetensors", "huggingface-hub")

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (`Huggingface_Hub` -> `huggingface-hub`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.lru_cache(maxsize=1)
def locked_versions(path: str = LOCK_FILE) -> dict[str, str]:
    """{distribution: version} pinned by the lock file; empty where there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    return {canonical(m.group(1)): m.group(2) for m in map(_PIN.match, lines) if m}


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def differing(names: tuple[str, ...] | list[str], locked: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(name, installed, locked) for each of `names` installed at another release than the lock's."""
    locked = locked_versions() if locked is None else locked
    found = []
    for name in names:
        pinned, have = locked.get(canonical(name)), installed_version(name)
        if pinned and have and _release(have) != _release(pinned):
            found.append((name, have, pinned))
    return found


def version_note(*names: str) -> str:
    """' (transformers 5.25.0 is installed; vitray was tested on 5.24.0: `make setup` installs it)', or ''."""
    found = differing(names)
    if not found:
        return ""
    said = "; ".join(f"{name} {have} is installed, vitray was tested on {pinned}" for name, have, pinned in found)
    return f" ({said}: `make setup` installs the tested releases)"


def _release(version: str) -> str:
    """A version without its local label (torch's `2.13.0+cpu` is release 2.13.0)."""
    return version.split("+", 1)[0]


def print_differences() -> int:
    """Print each locked distribution installed at another release (`python -m vitray.versions`)."""
    locked = locked_versions()
    if not locked:
        print(f"no lock at {LOCK_FILE}")
        return 0
    found = differing(sorted(locked), locked)
    for name, have, pinned in found:
        print(f"{name:32} {pinned:>14} -> {have}")
    missing = sorted(name for name in locked if installed_version(name) is None)
    print(f"{len(found)} of {len(locked)} locked releases differ here" +
          (f"; not installed: {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(print_differences())
