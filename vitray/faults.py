"""A failed run as one line for the user, and its whole traceback in a log file.

`describe` finds what really failed inside the layers Ray wraps around a task's error
(a full disk, an unreachable S3 endpoint, a name the filesystem refuses, ...) and says
it in words; `write_log` keeps the traceback under the output (or, when that cannot be
written, in the user's cache folder), so the terminal shows one line and the log the rest.
"""
from __future__ import annotations

import errno
import importlib.metadata
import os
import re
import tempfile
import time
import traceback
from typing import Iterator

from vitray import storage, versions

_ERROR_LINE = re.compile(r"^[\w.]+(Error|Exception|Interrupt)\b")
_SITE_PACKAGE = re.compile(r"[/\\](?:site|dist)-packages[/\\]([A-Za-z0-9_]+)")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything behind it: `__cause__`, `__context__` and Ray's `.cause`."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [getattr(current, "cause", None), current.__context__, current.__cause__]


def describe(exc: BaseException, where: str) -> str:
    """What failed, in one line without a traceback; `where` is the output the run writes to."""
    chain = list(causes(exc))
    text = "\n".join(f"{type(e).__name__}: {e}" for e in chain)
    errnos = {getattr(e, "errno", None) for e in chain}
    lowered = text.lower()
    if errno.ENOSPC in errnos or "no space left on device" in lowered:
        return f"no space left on the device of {where}: free space"
    if errno.EDQUOT in errnos or "disk quota exceeded" in lowered:
        return f"disk quota exceeded writing {where}: free space or raise the quota"
    if errno.ENAMETOOLONG in errnos or "file name too long" in lowered:
        return f"a file name under {where} is too long for its filesystem"
    if errno.EROFS in errnos or "read-only file system" in lowered:
        return f"{where} is on a read-only filesystem"
    if errno.EACCES in errnos or "permission denied" in lowered:
        return f"permission denied writing {where}"
    if storage.is_s3(where) or "s3" in lowered:
        # A task's own error reaches the driver only as text inside Ray's wrapper: read every line.
        for line in text.splitlines():
            shown = storage.describe_error(where, Exception(line.strip()))
            if "cannot reach the S3 endpoint" in shown or "access denied" in shown:
                return shown[:400]
    return f"{where}: {innermost_line(exc)}{library_note(chain)}"


def library_note(chain: list[BaseException]) -> str:
    """A note naming the installed library, where the failure came from one at another release than the lock's."""
    names: list[str] = []
    for e in chain:
        for frame in traceback.extract_tb(e.__traceback__):
            match = _SITE_PACKAGE.search(frame.filename)
            if match and match.group(1) not in names:
                names.append(match.group(1))
    if not names:
        return ""
    distributions = importlib.metadata.packages_distributions()
    # The innermost library first: that is where the failure was raised.
    return versions.version_note(*(d for n in reversed(names) for d in distributions.get(n, [n])[:1]))


def innermost_line(exc: BaseException) -> str:
    """The innermost `SomeError: message` line of a (Ray-wrapped) failure."""
    lines: list[str] = []
    for e in causes(exc):
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        lines += [f"{type(e).__name__}: {first}"] + [line.strip() for line in str(e).splitlines()]
    errors = [line for line in lines if _ERROR_LINE.match(line) and not line.startswith(("RayTaskError",
                                                                                          "RaySystemError",
                                                                                          "UserCodeException"))]
    found = errors[-1] if errors else (lines[0] if lines else type(exc).__name__)
    return found[:300]


def write_log(output: str | None, command: str, exc: BaseException) -> str | None:
    """Write the traceback of `exc` to `OUTPUT/logs/` (or the user's cache folder); its path, or None."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"vitray-{command}-{stamp}-{os.getpid()}.log"
    text = f"vitray {command} failed at {stamp}\n\n" + "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__))
    places = []
    if output:
        places.append(storage.join(output, "logs", name))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    places += [os.path.join(cache, "vitray", "logs", name), os.path.join(tempfile.gettempdir(), name)]
    for place in places:
        try:
            storage.write_bytes(place, text.encode("utf-8", "backslashreplace"))
            return place
        except Exception:  # noqa: BLE001 - the place that failed the run may refuse its log too
            continue
    return None
