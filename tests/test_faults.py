"""A failed run as one line: what failed inside Ray's wrappers, in words, and where the traceback went."""
from __future__ import annotations

import errno
import os

import pytest

from vitray.faults import describe, innermost_line, write_log


def _wrapped(inner: BaseException) -> BaseException:
    """What the driver gets from a failed Ray task: the cause as text, chained under other errors."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError("UDF failed to process a data block.\nFailed to apply UDF transform") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize("inner, needle", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device of /out"),
    (OSError(errno.ENAMETOOLONG, "File name too long"), "a file name under /out is too long"),
    (OSError(errno.EACCES, "Permission denied"), "permission denied writing /out"),
    (OSError(errno.EROFS, "Read-only file system"), "/out is on a read-only filesystem"),
    (ValueError("the model said no"), "/out: ValueError: the model said no"),
])
def test_the_cause_inside_the_wrappers_is_named(inner, needle):
    line = describe(_wrapped(inner), "/out")
    assert needle in line and "\n" not in line


def test_an_unreachable_s3_endpoint_is_found_in_a_remote_traceback(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit")
    remote = RuntimeError("ray::MapBatches(write_piece)()\n  File x\nOSError: When uploading part: AWS Error "
                          "NETWORK_CONNECTION: curlCode: 7, Could not connect to server (key sekrit)")
    line = describe(remote, "s3://b/out")
    assert line.startswith("s3://b/out: cannot reach the S3 endpoint http://127.0.0.1:9") and "sekrit" not in line


def test_innermost_line_skips_rays_wrappers():
    assert innermost_line(_wrapped(KeyError("id"))) == "KeyError: 'id'"


def test_the_log_goes_under_the_output_or_else_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        raise ValueError("boom")
    except ValueError as exc:
        under = write_log(str(tmp_path / "out"), "score", exc)
        (tmp_path / "file").write_text("x")
        fallback = write_log(str(tmp_path / "file"), "score", exc)  # cannot hold a logs/ folder
    assert under.startswith(str(tmp_path / "out" / "logs" / "vitray-score-"))
    assert fallback.startswith(str(tmp_path / "cache" / "vitray" / "logs"))
    for log in (under, fallback):
        text = open(log).read()
        assert "Traceback" in text and "ValueError: boom" in text
    assert os.listdir(tmp_path / "out") == ["logs"]
