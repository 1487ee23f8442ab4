"""A Ray cluster of several nodes on this one machine, for the multi-node tests.

`LocalCluster` runs `ray.cluster_utils.Cluster(initialize_head=True, connect=False)` in
a process of its own (this file, run as a script) and drives it over a pipe: add a
node, remove a node, list nodes and actors, shut down. The cluster lives outside the
pytest process on purpose: `Cluster` writes its address to Ray's default temp dir
(where every `ray.init()` on the machine without an address would join it),
`Cluster.shutdown()` resets the process's internal-KV client (which an embedded Ray
of the same process uses), and the token that the cluster checks must not become
the cached token of an embedded Ray in the pytest process. The child process has
its own RAY_TMPDIR and token, and nothing of it outlives `stop()`.

Every node listens on 127.0.0.1 only (node_ip_address, dashboard host). Token
authentication is on, with a token made for the cluster: a driver joins with
`driver_env()` (RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH).
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
import traceback
from pathlib import Path
from typing import Any

from procs import kill_processes_of

LOOPBACK = "127.0.0.1"
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the pytest side


class ClusterError(RuntimeError):
    pass


class LocalCluster:
    """The head node is started here; more with `add_node`. `stop()` ends every process."""

    def __init__(self, head_cpus: int = 1, head_resources: dict[str, float] | None = None,
                 object_store_mb: int = 150, system_config: dict[str, Any] | None = None,
                 start_timeout: float = 120.0) -> None:
        # Short: Ray's unix sockets live under it, and a socket path has ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="vmn", dir="/tmp")
        self._log_path = Path(self.temp_dir) / "cluster.log"
        self.token = secrets.token_hex(32)
        self.token_path = Path(self.temp_dir) / "auth_token"
        self.token_path.write_text(self.token)
        self.token_path.chmod(0o600)
        self.dashboard_port = free_port()
        self.dashboard_url = f"http://{LOOPBACK}:{self.dashboard_port}"
        self.address = ""
        self.head_id = ""
        self._proc: subprocess.Popen | None = None
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")}
        # Ray's temp dir is RAY_TMPDIR/ray: sessions and the address file go there, not /tmp/ray.
        self.ray_dir = os.path.join(self.temp_dir, "ray")
        os.mkdir(self.ray_dir)
        env.update({
            "RAY_TMPDIR": self.temp_dir,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback addresses (see vitray.runtime)
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray Train's controller finds the state API (to clean up placement groups) by looking
            # for "the" Ray of the machine; this machine runs several.
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK,
            "PYTHONUNBUFFERED": "1",
        })
        self._env = env
        head = {
            "node_ip_address": LOOPBACK, "num_cpus": head_cpus, "resources": head_resources or {},
            "object_store_memory": object_store_mb * MB, "temp_dir": self.ray_dir,
            "include_dashboard": True, "dashboard_host": LOOPBACK, "dashboard_port": self.dashboard_port,
            "dashboard_agent_listen_port": free_port(),
        }
        if system_config:
            head["_system_config"] = system_config
        self._log = open(self._log_path, "w")
        self._proc = subprocess.Popen(
            [sys.executable, __file__, json.dumps(head)], env=env, cwd=self.temp_dir,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            start_new_session=True)
        try:
            started = self._reply(start_timeout)
        except BaseException:
            self.stop()
            raise
        self.address, self.head_id = started["address"], started["node_id"]

    # ---- what a driver needs

    def driver_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) plus what joins this cluster: its address and its token.

        A driver given an address (RAY_ADDRESS or ray.init(address=...)) does not turn token
        authentication on by itself: RAY_AUTH_MODE=token says to, and the token comes from
        RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN, or ~/.ray/auth_token).
        """
        env = dict(os.environ if base is None else base)
        env.pop("RAY_AUTH_TOKEN", None)
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        # Else Ray rewrites a 127.0.0.1 address to the machine's outward IP, where nothing of
        # this cluster listens, and the driver waits for the GCS there for minutes.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        return env

    # ---- commands

    def add_node(self, num_cpus: int = 1, resources: dict[str, float] | None = None,
                 object_store_mb: int = 150, timeout: float = 120.0) -> str:
        node = {"node_ip_address": LOOPBACK, "num_cpus": num_cpus, "resources": resources or {},
                "object_store_memory": object_store_mb * MB}
        return self._call({"op": "add_node", "args": node}, timeout)["node_id"]

    def remove_node(self, node_id: str, timeout: float = 60.0) -> None:
        self._call({"op": "remove_node", "node_id": node_id}, timeout)

    def nodes(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Every node the GCS knows: node_id, alive, resources (total)."""
        return self._call({"op": "nodes"}, timeout)["nodes"]

    def actors(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Every actor the GCS knows: class_name, state, node_id, pid, name, start_ms, end_ms, death (why it ended)."""
        return self._call({"op": "actors"}, timeout)["actors"]

    def alive_nodes(self) -> set[str]:
        return {n["node_id"] for n in self.nodes() if n["alive"]}

    # ---- the end

    def stop(self, grace: float = 20.0) -> None:
        """Shut the cluster down (Cluster.shutdown), then end anything of it still running, by PID."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    self._send(proc, {"op": "shutdown"})
                    proc.wait(grace)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is not None:
                    break
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        kill_processes_of(self.temp_dir, 5.0)
        if not self._log.closed:
            self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- plumbing

    @staticmethod
    def _send(proc: subprocess.Popen, message: dict[str, Any]) -> None:
        proc.stdin.write(json.dumps(message) + "\n")
        proc.stdin.flush()

    def _call(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self._proc is None or self._proc.poll() is not None:
            raise ClusterError(f"the cluster process is gone:\n{self.log_tail()}")
        self._send(self._proc, message)
        return self._reply(timeout)

    def _reply(self, timeout: float) -> dict[str, Any]:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise ClusterError(f"no answer from the cluster in {timeout:.0f}s:\n{self.log_tail()}")
        line = self._proc.stdout.readline()
        if not line:
            raise ClusterError(f"the cluster process ended ({self._proc.poll()}):\n{self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise ClusterError(f"{reply['error']}\n{self.log_tail()}")
        return reply

# --------------------------------------------------------------------------- the cluster's process


def _serve(head_args: dict[str, Any]) -> None:
    """Start the cluster, then answer one JSON command per stdin line on the original stdout."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # Ray's own prints go to the log, not into the replies

    def reply(obj: dict[str, Any]) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    from ray.cluster_utils import Cluster

    try:
        cluster = Cluster(initialize_head=True, connect=False, head_node_args=head_args)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which shows the log
        traceback.print_exc()
        reply({"error": f"head did not start: {exc!r}"})
        return
    nodes = {cluster.head_node.node_id: cluster.head_node}
    reply({"address": cluster.address, "node_id": cluster.head_node.node_id})

    def handle(message: dict[str, Any]) -> dict[str, Any]:
        op = message["op"]
        if op == "add_node":
            node = cluster.add_node(wait=True, **message["args"])
            nodes[node.node_id] = node
            return {"node_id": node.node_id}
        if op == "remove_node":
            cluster.remove_node(nodes.pop(message["node_id"]), allow_graceful=False)
            return {}
        if op == "nodes":
            return {"nodes": [{"node_id": n["NodeID"], "alive": bool(n["Alive"]), "resources": n.get("Resources", {})}
                              for n in cluster.global_state.node_table()]}
        if op == "actors":
            table = cluster.global_state.actor_table(None)
            return {"actors": [{"class_name": a["ActorClassName"], "state": a["State"], "name": a["Name"],
                                "node_id": a["Address"]["NodeID"], "pid": a["Pid"], "start_ms": a["StartTime"],
                                "end_ms": a["EndTime"], "death": str(a["DeathCause"]).strip()}
                               for a in table.values()]}
        raise ValueError(f"unknown op {op!r}")

    for line in sys.stdin:
        message = json.loads(line)
        if message["op"] == "shutdown":
            cluster.shutdown()
            reply({})
            return
        try:
            reply(handle(message))
        except Exception as exc:  # noqa: BLE001
            reply({"error": f"{message['op']}: {exc!r}"})
    cluster.shutdown()  # the test went away without saying so


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
