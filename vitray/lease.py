"""One run per output: a lease object under OUT, taken atomically, renewed while the run lives.

`OUT/_lease.json` names the run holding OUT (run id, host, pid, heartbeat). It is created
only if absent (S3: a PUT with `If-None-Match: *`; local disk: a hard link, which fails
when the name exists), renewed every `heartbeat_s` by compare-and-swap (S3: `If-Match`
on the ETag of our last write; local disk: under `flock`), and deleted at the end. A
second run gets one line naming the holder and the lease's age (exit 2). A lease not
renewed for `stale_s` belongs to a run that is gone (killed, its machine lost): it is
taken over by the same compare-and-swap, so two runs that both find it stale cannot both
win; so, at once, is a lease whose holder ran on this host and whose process has ended (a
SIGKILL, an out-of-memory kill). A run that finds its lease taken over stops before
committing anything more.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from vitray import storage
from vitray.errors import VitrayError

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0


class LeaseLost(VitrayError):
    """Another run took this run's lease over (its heartbeat stalled past the stale time)."""


@dataclass
class _Held:
    record: dict[str, Any]
    token: Any  # S3: the ETag of our last write; local: the record as written


class _LocalStore:
    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LEASE_NAME)
        self.made_folder = not os.path.exists(folder)  # a run refused early leaves no folder behind

    def _write_temp(self, record: dict[str, Any]) -> str:
        os.makedirs(self.folder, exist_ok=True)
        tmp = os.path.join(self.folder, f".{LEASE_NAME}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, record: dict[str, Any]) -> Any:
        tmp = self._write_temp(record)
        try:
            os.link(tmp, self.path)  # atomic, complete, and refused when the lease exists
        except FileExistsError:
            return None
        finally:
            os.remove(tmp)
        return record

    def read(self) -> tuple[dict[str, Any], Any] | None:
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        return _parse(text, os.path.getmtime(self.path) if os.path.exists(self.path) else 0.0), text

    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[dict[str, Any], str] | None]:
        """The lease as it reads under an exclusive flock: a compare-and-swap's compare."""
        import fcntl

        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, "_lease.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self.read()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def swap(self, expected: Any, record: dict[str, Any]) -> Any:
        """Replace the lease with `record` if it still reads as `expected`; the new token, or None."""
        with self._locked() as current:
            if current is None or current[1] != _text_of(expected):
                return None
            os.replace(self._write_temp(record), self.path)
            return record

    def delete(self, expected: Any) -> None:
        with self._locked() as current:
            if current is not None and current[1] == _text_of(expected):
                os.remove(self.path)
        if self.made_folder and sorted(os.listdir(self.folder)) == ["_lease.lock"]:
            try:
                os.remove(os.path.join(self.folder, "_lease.lock"))
                os.rmdir(self.folder)
            except OSError:  # another run came in meanwhile: its files stay
                pass


class _S3Store:
    def __init__(self, loc: storage.Location) -> None:
        self.bucket, _, prefix = loc.path.partition("/")
        self.key = f"{prefix}/{LEASE_NAME}" if prefix else LEASE_NAME
        # The process's one client for the endpoint: bounded connect timeouts, standard retries.
        self.client = storage.default_s3_client()

    def _precondition_failed(self, exc: Exception) -> bool:
        response = getattr(exc, "response", {}) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)

    def create(self, record: dict[str, Any]) -> Any:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(record).encode(),
                                          IfNoneMatch="*")["ETag"]
        except ClientError as exc:
            if self._precondition_failed(exc):
                return None
            raise

    def read(self) -> tuple[dict[str, Any], Any] | None:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return _parse(got["Body"].read().decode("utf-8", "replace"), got["LastModified"].timestamp()), got["ETag"]

    def swap(self, expected: Any, record: dict[str, Any]) -> Any:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(record).encode(),
                                          IfMatch=expected)["ETag"]
        except ClientError as exc:
            if self._precondition_failed(exc) or exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return None
            raise

    def delete(self, expected: Any) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=expected)
        except ClientError as exc:
            if self._precondition_failed(exc) or exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return  # no longer ours
            if exc.response.get("Error", {}).get("Code") not in ("NotImplemented", "InvalidArgument"):
                raise
            current = self.read()  # an endpoint without conditional deletes
            if current is not None and current[1] == expected:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)


def process_started(pid: int) -> str | None:
    """When process `pid` started, in the kernel's clock ticks since boot (Linux); None elsewhere or if gone.

    With the pid, it names one process: a pid the kernel has since given to another process
    has another start time.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


def holder_gone(holder: dict[str, Any]) -> bool:
    """Whether the lease's holder ran on this host and its process has ended (then the lease is taken at once).

    A holder on another host, or one whose record does not say, is judged by its heartbeat alone.
    """
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    started = holder.get("pid_started")
    return started is not None and process_started(pid) not in (None, started)


def _parse(text: str, modified: float) -> dict[str, Any]:
    """The lease's record; an unreadable one (a write cut short) counts as renewed when last modified."""
    try:
        record = json.loads(text)
        if isinstance(record, dict) and isinstance(record.get("heartbeat"), (int, float)):
            return record
    except ValueError:
        pass
    return {"run_id": "?", "host": "?", "pid": 0, "heartbeat": modified}


def _text_of(token: Any) -> str:
    return json.dumps(token) if isinstance(token, dict) else str(token)


@dataclass
class Lease:
    """The lease of one run on one output; `acquire` it, `check` it before committing, `release` it."""

    output: str
    run_id: str
    stale_s: float = STALE_S
    heartbeat_s: float | None = None  # default: HEARTBEAT_S, or a quarter of a shorter stale time
    took_over: dict[str, Any] | None = None  # the stale lease this run replaced
    _store: Any = field(default=None, repr=False)
    _held: _Held | None = field(default=None, repr=False)
    _lost: str | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.heartbeat_s is None:
            self.heartbeat_s = min(HEARTBEAT_S, self.stale_s / 4)

    def _record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_started": process_started(os.getpid()), "heartbeat": time.time(), "stale_after_s": self.stale_s}

    def acquire(self) -> "Lease":
        loc = storage.resolve(self.output)
        self._store = _S3Store(loc) if loc.is_s3 else _LocalStore(loc.path)
        for _ in range(5):  # the lease may vanish or change between our calls: look again
            record = self._record()
            token = self._call(self._store.create, record)
            if token is not None:
                self._held = _Held(record, token)
                break
            current = self._call(self._store.read)
            if current is None:
                continue
            holder, seen = current
            age = time.time() - float(holder["heartbeat"])
            gone = holder_gone(holder)
            if age < self.stale_s and not gone:
                raise VitrayError(
                    f"{self.output} is in use by run {holder.get('run_id')} on {holder.get('host')} "
                    f"(pid {holder.get('pid')}), whose lease was renewed {max(0.0, age):.0f} s ago; one run "
                    f"per output: wait for it to finish (a lease not renewed for {self.stale_s:.0f} s is "
                    "taken over)")
            token = self._call(self._store.swap, seen, record)
            if token is not None:
                self._held = _Held(record, token)
                self.took_over = {**holder, "silent_s": round(age, 1), "holder_gone": gone}
                log.warning("took over the lease of run %s (host %s, pid %s), %s", holder.get("run_id"),
                            holder.get("host"), holder.get("pid"),
                            "whose process has ended" if gone else f"not renewed for {age:.0f} s")
                break
        else:
            raise VitrayError(f"{self.output}: could not take the output's lease (other runs keep changing it)")
        self._thread = threading.Thread(target=self._renew_loop, name="vitray-lease", daemon=True)
        self._thread.start()
        return self

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            raise VitrayError(storage.describe_error(storage.join(self.output, LEASE_NAME), exc)) from None
        except Exception as exc:  # botocore's errors are not OSErrors
            if type(exc).__module__.startswith("botocore"):
                raise VitrayError(storage.describe_error(storage.join(self.output, LEASE_NAME), exc)) from None
            raise

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: try again next beat
                log.warning("could not renew the lease on %s: %s", self.output, exc)
            if self._lost:
                return

    def renew(self) -> None:
        """Write a new heartbeat if the lease is still ours; otherwise remember that it was lost."""
        if self._held is None or self._lost:
            return
        record = self._record()
        token = self._store.swap(self._held.token, record)
        if token is None:
            self._lost = (f"{self.output}: another run took this run's lease over (no heartbeat written "
                          f"for {self.stale_s:.0f} s); stopped so that no image is committed twice")
        else:
            self._held = _Held(record, token)

    def check(self) -> None:
        """Raise LeaseLost if another run has taken the lease over."""
        if self._lost:
            raise LeaseLost(self._lost, exit_code=1)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        if self._held is not None and not self._lost:
            try:
                self._store.delete(self._held.token)
            except Exception as exc:  # noqa: BLE001 - left behind, it goes stale and is taken over
                log.warning("could not release the lease on %s: %s", self.output, exc)
        self._held = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
