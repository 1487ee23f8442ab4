"""URIs to filesystems: a local path, `file://` or `s3://bucket/prefix`.

Everything that reads or writes goes through `resolve`, so local disk and S3
share one code path (Ray Data `filesystem=`, Ray Train `storage_filesystem`,
direct writes). The S3 endpoint comes from `AWS_ENDPOINT_URL` (or an explicit
endpoint); credentials come from the standard AWS chain and are never printed.
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from vitray.errors import VitrayError


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem and the path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)

    def child(self, *parts: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, *parts), join(self.uri, *parts))


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join URI parts with `/`, keeping the scheme."""
    uri = str(uri)
    if is_s3(uri) or uri.startswith("file://"):
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem for AWS or any S3-compatible endpoint."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "http"
    return pafs.S3FileSystem(**kwargs, connect_timeout=5, request_timeout=60)


def resolve(uri: str, endpoint: str | None = None) -> Location:
    """Turn a local path, `file://...` or `s3://bucket/prefix` into a Location."""
    uri = str(uri)
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise VitrayError(f"{uri}: an s3:// URI needs a bucket (s3://bucket/prefix)")
        path = (parsed.netloc + parsed.path).rstrip("/")
        return Location(s3_filesystem(endpoint), path, uri.rstrip("/"))
    if uri.startswith("file://"):
        path = urlparse(uri).path
    elif "://" in uri:
        raise VitrayError(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")
    else:
        path = uri
    path = os.path.abspath(os.path.expanduser(path))
    return Location(pafs.LocalFileSystem(), path, path)


def describe_error(uri: str, exc: BaseException) -> str:
    """One line for a storage failure, with the secret never in it."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if secret:
        text = text.replace(secret, "***")
    lowered = text.lower()
    # pyarrow spells S3 error codes ACCESS_DENIED / SIGNATURE_DOES_NOT_MATCH, boto3
    # AccessDenied / SignatureDoesNotMatch: compare without separators.
    squashed = lowered.replace("_", "").replace(" ", "")
    if any(k in squashed for k in ("accessdenied", "signaturedoesnotmatch",
                                   "invalidaccesskeyid", "forbidden", "credentials")):
        return f"{uri}: access denied by the S3 endpoint (check the AWS credentials): {text}"
    if any(k in lowered for k in ("curl", "connect", "resolve host", "timed out", "network")):
        endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    or "the default AWS endpoint")
        return f"{uri}: cannot reach the S3 endpoint {endpoint}: {text}"
    return f"{uri}: {text}"


def info(uri: str, endpoint: str | None = None) -> pafs.FileInfo:
    """The file info of a URI; storage failures become a one-line VitrayError."""
    loc = resolve(uri, endpoint)
    try:
        return loc.fs.get_file_info(loc.path)
    except OSError as exc:
        raise VitrayError(describe_error(uri, exc)) from None


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def require(uri: str, what: str = "input") -> pafs.FileInfo:
    """Fail with one line when an input does not exist."""
    found = info(uri)
    if found.type == pafs.FileType.NotFound:
        raise VitrayError(f"{what} not found: {uri}")
    return found


def read_bytes(uri: str) -> bytes:
    loc = resolve(uri)
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError:
        raise VitrayError(f"not found: {uri}") from None
    except OSError as exc:
        raise VitrayError(describe_error(uri, exc)) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; on S3 a PUT is atomic, locally via rename."""
    loc = resolve(uri)
    try:
        if loc.is_s3:
            # No create_dir on S3: it would cost a HeadBucket and leave an empty
            # `prefix/` marker object beside the data, and a PUT needs no parent.
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(data)
        else:
            loc.fs.create_dir(posixpath.dirname(loc.path), recursive=True)
            tmp = f"{loc.path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, loc.path)
    except OSError as exc:
        raise VitrayError(describe_error(uri, exc)) from None


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def list_files(uri: str, recursive: bool = True) -> list[pafs.FileInfo]:
    """Files under a prefix (sorted by path); storage failures as one line."""
    loc = resolve(uri)
    try:
        selector = pafs.FileSelector(loc.path, recursive=recursive, allow_not_found=True)
        infos = loc.fs.get_file_info(selector)
    except OSError as exc:
        raise VitrayError(describe_error(uri, exc)) from None
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def relative(root: Location, path: str) -> str:
    """The path of a file relative to a root location, with `/` separators."""
    return posixpath.relpath(path, root.path)
