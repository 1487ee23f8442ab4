"""What the Ray cluster can hold: checks that a job fits before it starts.

A job that cannot fit otherwise waits in Ray Train's "worker group startup timed out"
loop for ever, and outputs on a local path of a multi-node cluster land on other nodes.
Both are refused here, after Ray is up and before any work, in one line.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Sequence

from vitray import storage
from vitray.errors import VitrayError

log = logging.getLogger(__name__)

# "1"/"0" forces whether an autoscaler may add nodes; unset: asked of the cluster.
AUTOSCALER_ENV = "VITRAY_AUTOSCALER"
# How long a job that does not fit yet waits for an autoscaler to add nodes.
WAIT_ENV = "VITRAY_RESOURCE_WAIT_S"
DEFAULT_WAIT_S = 300.0
POLL_S = 5.0
# Nodes of a cluster without an autoscaler config get this type name from Ray's read-only
# provider (ray.autoscaler._private.util.format_readonly_node_type).
READONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]{16,}$")
EPS = 1e-9


@dataclass(frozen=True)
class Fit:
    """How a job's bundles compare with the cluster's nodes."""

    fits: bool
    workers_that_fit: int  # with the extra bundle placed too
    cpus: float  # the cluster's logical totals
    gpus: float
    nodes: int


def plan(nodes: Sequence[dict[str, float]], workers: int, worker: dict[str, float],
         extra: dict[str, float] | None = None) -> Fit:
    """Whether `workers` bundles `worker` (and one `extra`) can be placed, each whole on one node.

    `nodes` are the alive nodes' total logical resources. First fit, the workers before the
    (smaller) extra bundle: the bundles here are few and of two shapes, where that is exact enough.
    """
    low, high = 0, workers  # packing k identical bundles is possible for every k below a possible one
    if not _packs(nodes, 0, worker, extra):
        high = 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _packs(nodes, mid, worker, extra) else (low, mid - 1)
    return Fit(fits=low == workers and _packs(nodes, workers, worker, extra), workers_that_fit=low,
               cpus=sum(n.get("CPU", 0.0) for n in nodes), gpus=sum(n.get("GPU", 0.0) for n in nodes),
               nodes=len(nodes))


def _packs(nodes: Sequence[dict[str, float]], count: int, worker: dict[str, float],
           extra: dict[str, float] | None) -> bool:
    free = [dict(n) for n in nodes]
    return all(_place(free, worker) for _ in range(count)) and (extra is None or _place(free, extra))


def _place(free: list[dict[str, float]], bundle: dict[str, float]) -> bool:
    for node in free:
        if all(node.get(r, 0.0) + EPS >= need for r, need in bundle.items() if need > 0):
            for r, need in bundle.items():
                node[r] = node.get(r, 0.0) - need
            return True
    return False


def _n(x: float) -> str:
    return f"{x:g}"


def shortfall(fit: Fit, what: str, workers: int, cpus_per_worker: float, gpus_per_worker: float,
              extra_cpus: float = 0.0, extra_for: str = "Ray Data") -> str:
    """The one-line explanation of a job that does not fit."""
    line = (f"{what} {workers} needs {_n(workers * cpus_per_worker)} CPUs and {_n(workers * gpus_per_worker)} "
            f"GPUs ({_n(cpus_per_worker)} + {_n(gpus_per_worker)} each)")
    if extra_cpus:
        line += f" plus {_n(extra_cpus)} CPU for {extra_for}"
    line += f"; the cluster has {_n(fit.cpus)} CPUs and {_n(fit.gpus)} GPUs on {fit.nodes} node(s)"
    if fit.workers_that_fit:
        return line + f": use {what} {fit.workers_that_fit} or fewer, or a larger cluster"
    return line + ": no node holds one worker; use a node with these resources or lower --gpus-per-worker"


def node_resources() -> list[dict[str, float]]:
    """The total logical resources of each alive node of the connected Ray."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def autoscaling() -> bool:
    """Whether an autoscaler may add nodes: $VITRAY_AUTOSCALER, else what the cluster reports.

    Ray has no call for this; its autoscaler always runs on the head, and without a cluster
    config (`ray start`, an embedded Ray) it runs read-only with node types named
    `node_<id>`. A launcher or KubeRay config names its own node types.
    """
    forced = os.environ.get(AUTOSCALER_ENV, "").strip().lower()
    if forced:
        return forced in ("1", "true", "yes", "on")
    try:
        return any(not READONLY_NODE_TYPE.match(t) for t in _node_types())
    except Exception:  # noqa: BLE001 - an old or odd Ray: treat as a fixed cluster
        log.debug("could not read the autoscaler's state", exc_info=True)
        return False


def _node_types() -> list[str]:
    import json

    import ray
    from ray._private import ray_constants
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return [n.ray_node_type_name for n in status.active_nodes + status.idle_nodes if n.ray_node_type_name]
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return []
    report = json.loads(raw).get("autoscaler_report") or {}
    types = set((report.get("node_type_mapping") or {}).values()) | set(report.get("active_nodes") or {})
    types |= set(report.get("pending_launches") or {})
    return sorted(types)


def wait_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S)))
    except ValueError:
        raise VitrayError(f"${WAIT_ENV} must be a number of seconds, got {os.environ[WAIT_ENV]!r}") from None


def check_fits(workers: int, cpus_per_worker: float, gpus_per_worker: float, what: str,
               extra_cpus: float = 0.0, extra_for: str = "Ray Data", wait_s: float | None = None) -> None:
    """Refuse a job whose workers the connected Ray cluster cannot hold (exit 2, one line).

    With an autoscaler, ask it for the bundles and wait up to `wait_s` (default
    $VITRAY_RESOURCE_WAIT_S, 300 s) for nodes before refusing. Logical resources are what
    count: an embedded Ray advertises more CPUs than the machine has cores.
    """
    worker = {"CPU": float(cpus_per_worker)}
    if gpus_per_worker > 0:
        worker["GPU"] = float(gpus_per_worker)
    extra = {"CPU": float(extra_cpus)} if extra_cpus > 0 else None
    fit = plan(node_resources(), workers, worker, extra)
    if fit.fits:
        return
    message = shortfall(fit, what, workers, cpus_per_worker, gpus_per_worker, extra_cpus, extra_for)
    if not autoscaling():
        raise VitrayError(message)
    from ray.autoscaler.sdk import request_resources

    wait_s = wait_seconds() if wait_s is None else wait_s
    log.warning("waiting up to %s s for the autoscaler to add nodes: %s", _n(wait_s), message.split(";")[0])
    request_resources(bundles=[worker] * workers + ([extra] if extra else []))
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            fit = plan(node_resources(), workers, worker, extra)
            if fit.fits:
                return
    finally:
        request_resources(bundles=[])  # the request is sticky: Train's own request takes over
    message = shortfall(fit, what, workers, cpus_per_worker, gpus_per_worker, extra_cpus, extra_for)
    raise VitrayError(f"{message} (waited {_n(wait_s)} s for the autoscaler)")


def shared_output_problem(uri: str, shared_fs: bool, nodes: int, what: str = "--out") -> str | None:
    """Why a local output cannot serve a cluster of `nodes` nodes, or None."""
    if storage.is_s3(uri) or shared_fs or nodes <= 1:
        return None
    path = storage.resolve(uri).path
    return (f"{what} {uri} is a local path but the Ray cluster has {nodes} nodes: checkpoints and outputs "
            f"written on other nodes would not land here; use an s3:// URI, or pass --shared-fs if every "
            f"node mounts {path}")


def check_shared_output(uri: str, shared_fs: bool, what: str = "--out") -> None:
    """Refuse a local output on a multi-node cluster unless every node mounts it (exit 2, one line)."""
    if storage.is_s3(uri) or shared_fs:
        return
    problem = shared_output_problem(uri, shared_fs, len(node_resources()), what)
    if problem:
        raise VitrayError(problem)

