"""Tests of vitray.storage: one code path for local paths, file:// and s3:// URIs.

S3 tests run against the real SeaweedFS server of the `s3` fixture, including
what a user sees when the credentials are wrong or the endpoint is down.
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from s3server import SeaweedS3, free_ports
from vitray import storage
from vitray.errors import VitrayError


# --- resolving URIs (no server needed) ------------------------------------------

def test_local_path_resolves_to_absolute_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loc = storage.resolve("runs/a")
    assert isinstance(loc.fs, pafs.LocalFileSystem)
    assert loc.path == str(tmp_path / "runs" / "a")
    assert not loc.is_s3


def test_file_uri_resolves_to_local_filesystem(tmp_path: Path) -> None:
    loc = storage.resolve(f"file://{tmp_path}/x")
    assert isinstance(loc.fs, pafs.LocalFileSystem)
    assert loc.path == f"{tmp_path}/x"


def test_s3_uri_resolves_to_bucket_and_key() -> None:
    # Building the filesystem sends no request, so a dead endpoint is fine here.
    loc = storage.resolve("s3://bucket/some/prefix/", endpoint="http://127.0.0.1:9")
    assert loc.is_s3
    assert loc.path == "bucket/some/prefix"
    assert loc.uri == "s3://bucket/some/prefix"
    assert loc.child("a.json").uri == "s3://bucket/some/prefix/a.json"
    assert loc.child("a.json").path == "bucket/some/prefix/a.json"


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "gs://bucket/key", "http://host/x"])
def test_bad_uris_are_one_line_errors(uri: str) -> None:
    with pytest.raises(VitrayError) as err:
        storage.resolve(uri)
    assert "\n" not in str(err.value)
    assert uri in str(err.value)


# --- the same verbs on every kind of storage ------------------------------------

@pytest.fixture(params=["local", "file", pytest.param("s3", marks=pytest.mark.s3)])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty root URI on local disk, as file:// and on S3."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return request.getfixturevalue("s3_prefix")


def test_bytes_and_json_round_trip(root: str) -> None:
    storage.write_bytes(storage.join(root, "deep/dir/blob.bin"), b"\x00\x01binary")
    storage.write_json(storage.join(root, "meta.json"), {"accuracy": 0.5, "labels": ["passed", "Xplus"]})

    assert storage.read_bytes(storage.join(root, "deep/dir/blob.bin")) == b"\x00\x01binary"
    assert storage.read_json(storage.join(root, "meta.json")) == {"accuracy": 0.5, "labels": ["passed", "Xplus"]}


def test_overwrite_replaces_content(root: str) -> None:
    uri = storage.join(root, "a.txt")
    storage.write_bytes(uri, b"first, longer content")
    storage.write_bytes(uri, b"second")
    assert storage.read_bytes(uri) == b"second"


def test_list_files_is_sorted_and_only_files(root: str) -> None:
    for name in ["b.png", "a/2.png", "a/1.png", "c/d/e.png"]:
        storage.write_bytes(storage.join(root, name), b"x")

    names = [storage.relative(storage.resolve(root), i.path) for i in storage.list_files(root)]
    assert names == ["a/1.png", "a/2.png", "b.png", "c/d/e.png"]
    top = [storage.relative(storage.resolve(root), i.path) for i in storage.list_files(root, recursive=False)]
    assert top == ["b.png"]
    assert all(i.size == 1 for i in storage.list_files(root))
    # The same listing as Arrow arrays, for inputs of millions of files.
    listing = storage.walk_paths(root)
    assert listing.paths.to_pylist() == [i.path for i in storage.list_files(root)]
    assert listing.sizes.to_pylist() == [1, 1, 1, 1]
    assert storage.relative_paths(storage.resolve(root), listing.paths).to_pylist() == names


def test_local_listing_follows_each_real_folder_once_and_never_blocks(tmp_path: Path) -> None:
    import os

    root, other = tmp_path / "in", tmp_path / "other"
    for path in (root / "a" / "x.png", root / "b.png", other / "o.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (root / "a" / "up").symlink_to("..")  # a cycle
    (root / "a" / "self").symlink_to(".")  # another
    (root / "b-again").symlink_to(root / "a")  # inside the root: listed under its own path only
    (root / "ext").symlink_to(other)  # outside: followed
    (other / "back").symlink_to(root)  # and back in: not again
    (root / "ext2").symlink_to(other)  # the same outside folder twice: once
    (root / "broken.png").symlink_to(tmp_path / "nowhere")
    os.mkfifo(root / "fifo.png")
    with open(os.fsencode(str(root)) + b"/bad\xff.png", "wb") as f:
        f.write(b"x")

    listing = storage.walk(str(root))

    names = [storage.relative(storage.resolve(str(root)), f.path) for f in listing.files]
    assert names == ["a/x.png", "b.png", "broken.png", "ext/o.png"]
    assert listing.bad_names == [f"{root}/bad\\xff.png"]
    assert [f.path for f in storage.list_files(str(root))] == [f.path for f in listing.files]
    assert storage.walk_paths(str(root)).paths.to_pylist() == [f.path for f in listing.files]


def test_relative_paths_are_relative_of_each_path() -> None:
    import posixpath

    import pyarrow as pa

    # S3 keys may hold what a local listing never does: `//`, `.` and `..` parts, a trailing `/`.
    keys = ["b/p/a.png", "b/p//x.png", "b/p/./c.png", "b/p/x/../d.png", "b/p/é/ü.png", "b/p/.h.png",
            "b/p/..x/y.png", "b/p/dir/", "b/pq/other.png", "b/p/x/.."]
    for root in ("b/p", "b", "b/p/", "b//p"):
        loc = storage.Location(pafs.LocalFileSystem(), root, f"s3://{root}")
        assert storage.relative_paths(loc, pa.array(keys)).to_pylist() == [posixpath.relpath(k, root) for k in keys]
    local = storage.Location(pafs.LocalFileSystem(), "/", "/")
    assert storage.relative_paths(local, pa.array(["/a/b.png", "/c.png"])).to_pylist() == ["a/b.png", "c.png"]


def test_an_output_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(VitrayError, match="is a file"):
        storage.check_output(str(tmp_path / "file"))
    with pytest.raises(VitrayError, match="is a file, so the folder cannot be made"):
        storage.check_output(str(tmp_path / "file" / "sub"))
    storage.check_output(str(tmp_path / "new" / "deeper"))  # made when written


def test_missing_things(root: str) -> None:
    assert storage.list_files(root) == []
    assert not storage.exists(storage.join(root, "nope.json"))
    with pytest.raises(VitrayError, match="not found"):
        storage.read_bytes(storage.join(root, "nope.json"))
    with pytest.raises(VitrayError, match="^model not found: "):
        storage.require(storage.join(root, "nope"), what="model")

    storage.write_bytes(storage.join(root, "sub/here.txt"), b"1")
    assert storage.exists(storage.join(root, "sub/here.txt"))
    assert storage.exists(storage.join(root, "sub"))  # a prefix counts as a directory
    assert storage.require(storage.join(root, "sub/here.txt")).type == pafs.FileType.File


# --- S3 specifics -------------------------------------------------------------

@pytest.mark.s3
def test_s3_objects_are_plain_keys_other_clients_see(s3: SeaweedS3, s3_prefix: str) -> None:
    storage.write_json(storage.join(s3_prefix, "runs/r1.json"), {"scored": 3})

    bucket, prefix = s3_prefix[len("s3://"):].split("/", 1)
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    # Only the object itself: no empty `runs/` directory markers beside it.
    assert [o["Key"] for o in listed["Contents"]] == [f"{prefix}/runs/r1.json"]
    body = s3.client().get_object(Bucket=bucket, Key=f"{prefix}/runs/r1.json")["Body"].read()
    assert body == b'{\n  "scored": 3\n}\n'


@pytest.mark.s3
def test_server_enforces_credentials(s3: SeaweedS3) -> None:
    s3.client().list_buckets()
    with pytest.raises(Exception, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        s3.client(secret_key="not-" + s3.secret_key).list_buckets()


@pytest.mark.s3
@pytest.mark.parametrize("verb", ["read_bytes", "info", "list_files", "write_bytes"])
def test_wrong_secret_is_one_line_access_denied(
    s3: SeaweedS3, s3_prefix: str, verb: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = storage.join(s3_prefix, "secret.bin")
    storage.write_bytes(uri, b"payload")
    wrong = "wrong-" + s3.secret_key
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)

    call = {
        "read_bytes": lambda: storage.read_bytes(uri),
        "info": lambda: storage.info(uri),
        "list_files": lambda: storage.list_files(s3_prefix),
        "write_bytes": lambda: storage.write_bytes(uri, b"overwritten"),
    }[verb]
    with pytest.raises(VitrayError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    assert "access denied" in message
    assert wrong not in message and s3.secret_key not in message

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    assert storage.read_bytes(uri) == b"payload"


def test_unreachable_endpoint_fails_fast_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # A free loopback port with nothing listening. Keys are set so that the AWS
    # SDK does not look for credentials on the EC2 metadata address instead.
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unused")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    for call in (storage.read_bytes, storage.info):
        started = time.monotonic()
        with pytest.raises(VitrayError) as err:
            call("s3://vitray-test/x.json")
        assert time.monotonic() - started < 10
        message = str(err.value)
        assert "\n" not in message
        assert f"cannot reach the S3 endpoint {endpoint}" in message
        assert "unused-secret" not in message


@pytest.mark.parametrize("text", [
    "AWS Error ACCESS_DENIED during HeadObject operation: No response body.",
    "An error occurred (SignatureDoesNotMatch) when calling the GetObject operation",
    "An error occurred (InvalidAccessKeyId) when calling the ListObjectsV2 operation",
])
def test_describe_error_names_access_denied_and_hides_the_secret(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    message = storage.describe_error("s3://b/k", OSError(f"{text} key=s3cr3t-value\nsecond line"))
    assert message.startswith("s3://b/k: access denied")
    assert "s3cr3t-value" not in message
    assert "\n" not in message
