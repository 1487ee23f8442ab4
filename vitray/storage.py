"""URIs to filesystems: a local path, `file://` or `s3://bucket/prefix`.

Everything that reads or writes goes through `resolve`, so local disk and S3
share one code path (Ray Data `filesystem=`, Ray Train `storage_filesystem`,
direct writes). The S3 endpoint comes from `AWS_ENDPOINT_URL` (or an explicit
endpoint); credentials come from the standard AWS chain and are never printed.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import secrets
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from vitray.errors import VitrayError

log = logging.getLogger(__name__)


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
    return pafs.S3FileSystem(**_s3_options(endpoint), connect_timeout=5, request_timeout=60)


def _s3_endpoint(endpoint: str | None) -> tuple[str | None, str]:
    """The S3 endpoint URL (None: AWS's own) and the region, from the argument or the standard variables."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if not endpoint:
        return None, region
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    return f"{parsed.scheme or 'http'}://{parsed.netloc}", region


def _s3_options(endpoint: str | None) -> dict[str, Any]:
    url, region = _s3_endpoint(endpoint)
    kwargs: dict[str, Any] = {"region": region}
    if url:
        parsed = urlparse(url)
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    return kwargs


def s3_put_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem whose output streams open lazily: an object smaller than one upload part
    is then written by a single PutObject on close, not a multipart upload's three requests."""
    return pafs.S3FileSystem(**_s3_options(endpoint), connect_timeout=5, request_timeout=60,
                             allow_delayed_open=True)


def put_object(loc: Location, data: bytes, durable: bool = False, s3: pafs.FileSystem | None = None) -> None:
    """`put` with one request per small object on S3 (`s3`: a `s3_put_filesystem`, made once by a
    caller that writes many); locally the same as `put`. Visible only when whole, as with `put`."""
    if not loc.is_s3:
        put(loc, data, durable)
        return
    with (s3 or s3_put_filesystem()).open_output_stream(loc.path) as f:
        f.write(data)


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


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (and `~` expanded); `s3://` and `file://` URIs as they are.

    Ray's workers run in other folders than the driver: every path they are handed is absolute.
    """
    if uri is None or is_s3(str(uri)) or "://" in str(uri):
        return uri
    return os.path.abspath(os.path.expanduser(str(uri)))


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


@dataclass(frozen=True)
class FileReader:
    """Reads whole files under one location by path, in any process (it travels to Ray's tasks).

    On S3 each file is one GetObject: pyarrow's input streams send a HeadObject before every
    GET, twice the requests per image (docs/scale.md), and its Python API cannot be handed the
    size a listing already has. Local files are read through pyarrow as everywhere else.
    Failures are OSErrors (FileNotFoundError, PermissionError, ...) with a one-line message.
    """

    fs: pafs.FileSystem
    s3_endpoint: str | None = None  # the endpoint URL, None for AWS's own (S3 only)
    s3_region: str | None = None  # set on S3 only

    def read(self, path: str) -> bytes:
        if self.s3_region is None:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = path.partition("/")
        try:
            body = s3_client(self.s3_endpoint, self.s3_region).get_object(Bucket=bucket, Key=key)["Body"]
            try:
                return body.read()
            finally:
                body.close()
        except (BotoCoreError, ClientError) as exc:
            raise s3_os_error(exc) from None


def file_reader(uri: str, endpoint: str | None = None) -> FileReader:
    """A FileReader for the files under a URI, with the S3 settings of this process (see `resolve`)."""
    loc = resolve(uri, endpoint)
    if not loc.is_s3:
        return FileReader(loc.fs)
    url, region = _s3_endpoint(endpoint)
    return FileReader(loc.fs, url, region)


# A boto3 client costs tens of milliseconds to make (it loads the S3 service model): one per
# process, endpoint and credentials, shared by the threads of a Ray worker (clients are thread-safe).
_S3_CLIENTS: dict[tuple[str | None, str, str], Any] = {}
_S3_CLIENTS_LOCK = threading.Lock()


def s3_client(endpoint_url: str | None, region: str) -> Any:
    """This process's boto3 S3 client for an endpoint, with the timeouts of `s3_filesystem`.

    Credentials come from the standard AWS chain when the client is made; a change of the
    AWS_* credential variables (tests, a rotated key in the environment) makes a new one.
    """
    chain = "\0".join(os.environ.get(k, "") for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                          "AWS_SESSION_TOKEN", "AWS_PROFILE"))
    key = (endpoint_url, region, hashlib.sha256(chain.encode()).hexdigest())  # no secret kept in the clear
    with _S3_CLIENTS_LOCK:
        client = _S3_CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            # Path-style addressing on an S3-compatible endpoint, as pyarrow's S3 filesystem does.
            extra = {"s3": {"addressing_style": "path"}} if endpoint_url else {}
            config = Config(connect_timeout=5, read_timeout=60, retries={"mode": "standard"}, **extra)
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                                    config=config)
            _S3_CLIENTS[key] = client
    return client


def default_s3_client() -> Any:
    """`s3_client` for the endpoint and region of this process's AWS_* variables."""
    return s3_client(*_s3_endpoint(None))


def s3_os_error(exc: BaseException) -> OSError:
    """A boto3 failure as the OSError pyarrow would raise: a missing key is FileNotFoundError, a
    refusal PermissionError, anything else (throttling past its retries, an unreachable
    endpoint) an OSError; the message is one line, the secret never in it."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if secret:
        text = text.replace(secret, "***")
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404") or status == 404:
        return FileNotFoundError(errno.ENOENT, text)
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403 or \
            type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return PermissionError(errno.EACCES, text)
    return OSError(errno.EIO, text)


def write_bytes(uri: str, data: bytes, durable: bool = False) -> None:
    """Write a whole object so that a reader sees all of it or nothing; see `put`."""
    loc = resolve(uri)
    try:
        put(loc, data, durable)
    except OSError as exc:
        raise VitrayError(describe_error(uri, exc)) from None


def put(loc: Location, data: bytes, durable: bool = False) -> None:
    """Write a whole object so that a reader sees all of it or nothing, even after a SIGKILL.

    S3 makes an object visible only when its upload completes (a PUT; no `create_dir`, which
    would cost a HeadBucket and leave an empty `prefix/` marker). Locally the bytes go to a
    hidden temp file in the same folder (`.name.tmp-*`: invisible to dataset readers, and
    what `remove_temps` cleans up after a kill), fsync'd when `durable`, then `os.replace`.
    """
    if loc.is_s3:
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
        return
    with _whole_file(loc, durable) as tmp, open(tmp, "wb") as f:
        f.write(data)


def put_file(loc: Location, durable: bool = False) -> contextlib.AbstractContextManager[str]:
    """`put` for a file too large to hold: the caller writes it at the path it is given, piece by
    piece, and it is published whole when the block ends (nothing of it if the block raises).

    Locally the path is `put`'s hidden temp file beside the target (fsync'd when `durable`,
    then `os.replace`). On S3 it is a local temp file, uploaded by boto3 (one PutObject, or a
    multipart upload that boto3 aborts on any failure); a kill mid-upload leaves no object.
    """
    return _whole_file(loc, durable)


@contextlib.contextmanager
def _whole_file(loc: Location, durable: bool) -> Iterator[str]:
    if loc.is_s3:
        fd, tmp = tempfile.mkstemp(prefix="vitray-put-", suffix=".tmp")
        os.close(fd)
    else:
        folder, name = os.path.split(loc.path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        yield tmp
        if loc.is_s3:
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, _, key = loc.path.partition("/")
            try:
                default_s3_client().upload_file(tmp, bucket, key)
            except (BotoCoreError, ClientError) as exc:
                raise s3_os_error(exc) from None
        else:
            if durable:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, loc.path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_temps(folder: str, name: str = "") -> int:
    """Local temp files of `put` (all, or those of one file name) that a kill left behind."""
    if not os.path.isdir(folder):
        return 0
    prefix = f".{name}.tmp-" if name else "."
    removed = 0
    for entry in os.listdir(folder):
        if entry.startswith(prefix) and ".tmp-" in entry:
            os.remove(os.path.join(folder, entry))
            removed += 1
    return removed


def delete(loc: Location) -> None:
    """Delete a file; one that is already gone is fine."""
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@dataclass
class Listing:
    """What a recursive listing found: readable files, and names it cannot represent."""

    files: list[pafs.FileInfo]
    # Local file names that are not valid UTF-8 (legal on Linux), shown with their odd
    # bytes escaped (`\\xe9`): an id must be text, so these are reported, never guessed at.
    bad_names: list[str] = field(default_factory=list)


@dataclass
class PathListing:
    """`Listing` for inputs of millions of files: paths and sizes as Arrow arrays, sorted by path,
    with no Python object per file (what the driver holds of a night's input)."""

    paths: pa.Array  # string
    sizes: pa.Array  # int64
    bad_names: list[str] = field(default_factory=list)


def list_files(uri: str, recursive: bool = True) -> list[pafs.FileInfo]:
    """Files under a prefix (sorted by path); storage failures as one line.

    Local names that are not valid UTF-8 are left out with a warning; `walk` returns them.
    """
    listing = walk(uri, recursive)
    _warn_bad_names(listing.bad_names)
    return listing.files


def list_paths(uri: str, recursive: bool = True) -> PathListing:
    """`list_files` as Arrow arrays (`walk_paths`); names that are not valid UTF-8 left out with a warning."""
    listing = walk_paths(uri, recursive)
    _warn_bad_names(listing.bad_names)
    return PathListing(listing.paths, listing.sizes)


def _warn_bad_names(names: list[str]) -> None:
    for name in names:
        log.warning("skipping %s: the file name is not valid UTF-8", name)


def walk(uri: str, recursive: bool = True) -> Listing:
    """Files under a folder or prefix, sorted by path, and the names that could not be listed.

    On S3 every key is a file. On local disk a link to a folder outside `uri` is followed
    (`today -> /mnt/camera/2026-11-28`); a link to a folder inside `uri` is not (its files
    are listed under their own path), and no real folder is entered twice, so link cycles
    end. A broken link is listed as a file: reading it fails, which the readers report.
    """
    loc = resolve(uri)
    if loc.is_s3:
        return Listing(sorted(_s3_files(uri, loc, recursive), key=lambda i: i.path))
    listing = walk_paths(uri, recursive)
    files = [pafs.FileInfo(path, type=pafs.FileType.File, size=size)
             for path, size in zip(listing.paths.to_pylist(), listing.sizes.to_pylist())]
    return Listing(files, listing.bad_names)


def walk_paths(uri: str, recursive: bool = True) -> PathListing:
    """What `walk` finds, as Arrow arrays: the listing of an input of millions of files."""
    loc = resolve(uri)
    if loc.is_s3:
        # pyarrow lists S3 into one FileInfo per key (its Python API has no pages): turned into
        # arrays a slice at a time, then let go.
        infos = _s3_files(uri, loc, recursive)
        paths = [pa.array([i.path for i in infos[at:at + LIST_CHUNK]], pa.string())
                 for at in range(0, len(infos), LIST_CHUNK)]
        sizes = [pa.array([i.size for i in infos[at:at + LIST_CHUNK]], pa.int64())
                 for at in range(0, len(infos), LIST_CHUNK)]
        del infos
        return _sorted_listing(paths, sizes, [])
    try:
        return _walk_local(loc.path, recursive)
    except OSError as exc:
        raise VitrayError(describe_error(uri, exc)) from None


LIST_CHUNK = 8_192  # files turned into Arrow arrays at a time while listing


def _s3_files(uri: str, loc: Location, recursive: bool) -> list[pafs.FileInfo]:
    try:
        selector = pafs.FileSelector(loc.path, recursive=recursive, allow_not_found=True)
        infos = loc.fs.get_file_info(selector)
    except OSError as exc:
        raise VitrayError(describe_error(uri, exc)) from None
    return [i for i in infos if i.type == pafs.FileType.File]


def _sorted_listing(paths: list[pa.Array], sizes: list[pa.Array], bad: list[str]) -> PathListing:
    import pyarrow.compute as pc

    all_paths = pa.chunked_array(paths, pa.string())
    all_sizes = pa.chunked_array(sizes, pa.int64())
    # Arrow orders strings by their UTF-8 bytes, which is the code-point order of Python's sort.
    # A listing is mostly in order already (folders are walked in name order): then no copy.
    order = pc.sort_indices(all_paths)
    if len(order) < 2 or pc.all(pc.equal(order, pa.array(np.arange(len(order), dtype=np.uint64)))).as_py():
        return PathListing(all_paths.combine_chunks(), all_sizes.combine_chunks(), sorted(bad))
    return PathListing(pc.take(all_paths, order).combine_chunks(), pc.take(all_sizes, order).combine_chunks(),
                       sorted(bad))


def _walk_local(root: str, recursive: bool) -> PathListing:
    if not os.path.isdir(root):
        return PathListing(pa.array([], pa.string()), pa.array([], pa.int64()))
    base = os.path.realpath(root)
    names: list[str] = []
    sizes: list[int] = []
    chunks: tuple[list[pa.Array], list[pa.Array]] = ([], [])
    bad: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [os.fsencode(root)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as entries:
                found = sorted(entries, key=lambda e: e.name, reverse=True)
        except OSError as exc:
            if folder == os.fsencode(root):
                raise
            log.warning("skipping folder %s: %s", _shown(folder), exc.strerror or exc)
            continue
        for entry in found:
            try:
                name = entry.path.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(_shown(entry.path))
                continue
            try:
                if entry.is_dir():  # follows a link
                    if recursive and not (entry.is_symlink() and _inside(os.path.realpath(name), base)):
                        stack.append(entry.path)
                    continue
                if entry.is_file():
                    size = entry.stat().st_size
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    size = 0  # a broken link: listed, so that reading it is reported
                else:
                    continue  # fifos, sockets, devices: not images, and reading a fifo blocks
            except OSError as exc:
                log.warning("skipping %s: %s", name, exc.strerror or exc)
                continue
            names.append(name)
            sizes.append(size)
            if len(names) == LIST_CHUNK:
                chunks[0].append(pa.array(names, pa.string()))
                chunks[1].append(pa.array(sizes, pa.int64()))
                names, sizes = [], []
    chunks[0].append(pa.array(names, pa.string()))
    chunks[1].append(pa.array(sizes, pa.int64()))
    return _sorted_listing(*chunks, bad)


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def _shown(path: bytes) -> str:
    """A local path for messages and error rows: undecodable bytes escaped (`\\xe9`)."""
    return path.decode("utf-8", "backslashreplace")


def check_output(uri: str, what: str = "--out") -> None:
    """Refuse an output that cannot be written, before any work: a file, a missing bucket, a read-only folder."""
    loc = resolve(uri)
    found = info(uri)
    if found.type == pafs.FileType.File:
        raise VitrayError(f"{what} {uri} is a file; give a folder or s3:// prefix")
    if loc.is_s3:
        bucket = loc.path.split("/", 1)[0]
        try:
            exists = loc.fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError as exc:
            raise VitrayError(describe_error(uri, exc)) from None
        if not exists:
            raise VitrayError(f"{what} {uri}: bucket {bucket!r} does not exist (create it, or check the name)")
        return
    folder = loc.path
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise VitrayError(f"{what} {uri}: {folder} is a file, so the folder cannot be made")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VitrayError(f"{what} {uri}: {folder} is not writable")


def real_location(uri: str) -> tuple[str, str]:
    """Where a URI really is: ("s3", bucket/key) or ("local", the path with every link resolved).

    A path that does not exist yet is resolved through its nearest existing folder, so an output
    about to be made under a link is placed where the link leads.
    """
    loc = resolve(uri)
    if loc.is_s3:
        return "s3", loc.path.rstrip("/")
    path, tail = os.path.abspath(loc.path), []
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path, part = os.path.split(path)
        tail.insert(0, part)
    return "local", os.path.join(os.path.realpath(path), *tail)


def same_or_inside(inner: str, outer: str) -> bool:
    """Whether `inner` is the same place as `outer` or inside it, by real location (links resolved)."""
    (kind_in, path_in), (kind_out, path_out) = real_location(inner), real_location(outer)
    return kind_in == kind_out and _inside(path_in, path_out)


def relative(root: Location, path: str) -> str:
    """The path of a file relative to a root location, with `/` separators."""
    return posixpath.relpath(path, root.path)


def relative_paths(root: Location, paths: pa.Array) -> pa.Array:
    """`relative` of every path of an Arrow string array, in Arrow.

    A path under the root with nothing to normalise (no `//`, `.` or `..` part: every local
    listing, and S3 keys but odd ones) loses the root's prefix; the others go through `relative`.
    """
    import pyarrow.compute as pc

    paths = paths.cast(pa.string())
    prefix = root.path if root.path.endswith("/") else root.path + "/"
    if posixpath.normpath(root.path) != root.path or root.path.startswith("//"):
        plain = pa.array(np.zeros(len(paths), dtype=bool))
    else:
        plain = pc.fill_null(pc.and_(pc.starts_with(paths, prefix),
                                     pc.invert(pc.match_substring_regex(paths, r"//|/\.\.?(/|$)|/$"))), False)
    out = pc.utf8_slice_codeunits(paths, len(prefix))  # in code points, as len() counts them
    odd = pc.invert(plain)
    if pc.any(odd).as_py():
        others = [relative(root, p) for p in paths.filter(odd).to_pylist()]
        out = pc.replace_with_mask(out, odd, pa.array(others, pa.string()))
    return out
