"""The embedded Ray: loopback only, and quiet unless asked."""
from __future__ import annotations

import ipaddress
import logging
import os

import psutil


def test_embedded_ray_listens_on_loopback_only(ray_session):
    import ray

    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    node = ray.nodes()[0]
    assert node["NodeManagerAddress"] == "127.0.0.1"


def test_loopback_even_when_ray_was_imported_first(tmp_path):
    """A script that imports ray before vitray starts its Ray (as jobs/benchmark.py did) stays on loopback."""
    import subprocess
    import sys

    script = ("import ray\n"
              "from vitray.runtime import RayOptions, init_ray\n"
              "init_ray(RayOptions(num_cpus=1))\n"
              "print(ray.nodes()[0]['NodeManagerAddress'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "127.0.0.1"


def test_ray_data_logs_only_errors_in_every_process(ray_session):
    import ray

    @ray.remote
    def level() -> str | None:
        return os.environ.get("RAY_DATA_LOG_LEVEL")

    assert ray.get(level.remote()) == "ERROR"
    assert logging.getLogger("ray.data").level == logging.ERROR


def test_no_ray_port_listens_beyond_loopback(ray_session):
    # The embedded Ray's processes (GCS, raylet, dashboard, workers) all descend from this one.
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    wide = [c for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in ours and not _loopback(c.laddr.ip)]
    assert not wide, f"listening beyond loopback: {[(c.pid, c.laddr) for c in wide]}"


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def test_workers_are_told_which_state_api_is_ours(ray_session):
    """With other Rays on the machine, Ray Train's cleaner must not guess (it fails: "multiple instances")."""
    import ray

    @ray.remote
    def state_api() -> tuple[str | None, int]:
        from ray.util.state import list_nodes

        return os.environ.get("RAY_API_SERVER_ADDRESS"), len(list_nodes())  # no address: as the cleaner asks

    url, nodes = ray.get(state_api.remote())
    assert url and url.startswith("http://127.0.0.1:") and nodes == 1


_FAULTS_OF_BIG_ARRAYS = '''
def faults_of_big_arrays() -> int:
    """Minor page faults of 20 rounds of five 8 MB arrays held together, then dropped (a batch's tensors)."""
    import resource
    import numpy as np
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        arrays = [np.ones(1_000_000) for _ in range(5)]
        del arrays
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
'''


def test_tune_malloc_keeps_big_blocks_in_the_process(tmp_path):
    """Without it glibc trims the freed heap top each round and faults it back in (~2,000 faults a round)."""
    import subprocess
    import sys

    script = _FAULTS_OF_BIG_ARRAYS + (
        "from vitray.runtime import tune_malloc\n"
        "faults_of_big_arrays()\n"
        "untuned = faults_of_big_arrays()\n"
        "assert tune_malloc()\n"
        "faults_of_big_arrays()\n"
        "print(untuned, faults_of_big_arrays())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    untuned, tuned = map(int, result.stdout.split())
    assert untuned > 20 * 1000 and tuned < 2000


def test_ray_workers_start_with_the_malloc_settings(ray_session):
    import ray

    from vitray.runtime import malloc_env

    namespace: dict = {}
    exec(_FAULTS_OF_BIG_ARRAYS, namespace)
    faults = ray.remote(namespace["faults_of_big_arrays"])

    @ray.remote
    def environment() -> dict[str, str | None]:
        return {name: os.environ.get(name) for name in malloc_env()}

    assert ray.get(environment.remote()) == malloc_env()
    ray.get(faults.remote())  # the first round may grow the heap
    assert ray.get(faults.remote()) < 2000
