"""What the Ray cluster can hold: a job that cannot fit, or whose local output other nodes cannot reach,
is refused in one line before it starts (vitray.cluster)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import synth_folder
from vitray import cluster
from vitray.errors import VitrayError
from vitray.train import TrainConfig

VITRAY = [sys.executable, "-m", "vitray.cli"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    return synth_folder(tmp_path_factory, "fit-data", n=40, size=16, seed=1, passed_fraction=0.2)


# --------------------------------------------------------------------------- packing


def test_workers_beyond_the_cpus_do_not_fit_and_the_line_says_how_many_do():
    fit = cluster.plan([{"CPU": 8.0}], 64, {"CPU": 1.0}, extra={"CPU": 1.0})
    assert not fit.fits and fit.workers_that_fit == 7 and (fit.cpus, fit.gpus, fit.nodes) == (8.0, 0.0, 1)
    line = cluster.shortfall(fit, "--workers", 64, 1, 0, extra_cpus=1)
    assert line == ("--workers 64 needs 64 CPUs and 0 GPUs (1 + 0 each) plus 1 CPU for Ray Data; the cluster "
                    "has 8 CPUs and 0 GPUs on 1 node(s): use --workers 7 or fewer, or a larger cluster")
    assert cluster.plan([{"CPU": 8.0}], 7, {"CPU": 1.0}, extra={"CPU": 1.0}).fits


def test_a_worker_must_fit_on_one_node():
    """Two nodes with one GPU each hold 2 GPUs, but not one worker that needs 2."""
    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    fit = cluster.plan(nodes, 1, {"CPU": 1.0, "GPU": 2.0})
    assert not fit.fits and fit.workers_that_fit == 0 and fit.gpus == 2.0
    assert "no node holds one worker" in cluster.shortfall(fit, "--workers", 1, 1, 2)
    # Fractional GPUs share a device; a CPU-only head holds the extra CPU.
    assert cluster.plan(nodes + [{"CPU": 2.0}], 4, {"CPU": 1.0, "GPU": 0.5}, extra={"CPU": 1.0}).fits
    assert not cluster.plan(nodes, 5, {"CPU": 1.0, "GPU": 0.5}).fits


def test_the_extra_cpu_goes_where_the_workers_leave_room():
    # A GPU node with one CPU and a CPU-only node: the worker takes the GPU node, Ray Data the other.
    assert cluster.plan([{"CPU": 1.0, "GPU": 1.0}, {"CPU": 4.0}], 1, {"CPU": 1.0, "GPU": 1.0},
                        extra={"CPU": 1.0}).fits


# --------------------------------------------------------------------------- check_fits


def test_without_an_autoscaler_a_job_that_cannot_fit_fails_at_once(monkeypatch):
    monkeypatch.setattr(cluster, "node_resources", lambda: [{"CPU": 8.0}])
    monkeypatch.setattr(cluster, "autoscaling", lambda: False)
    start = time.monotonic()
    with pytest.raises(VitrayError) as info:
        cluster.check_fits(64, 1.0, 0.0, "--workers", extra_cpus=1.0)
    assert time.monotonic() - start < 1
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert str(info.value).startswith("--workers 64 needs 64 CPUs")
    cluster.check_fits(2, 1.0, 0.0, "--workers", extra_cpus=1.0)  # fits: no error


def test_with_an_autoscaler_it_asks_for_nodes_and_waits_a_bounded_time(monkeypatch, caplog):
    import ray.autoscaler.sdk

    requests = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: requests.append(bundles))
    monkeypatch.setattr(cluster, "autoscaling", lambda: True)
    monkeypatch.setattr(cluster, "POLL_S", 0.05)
    monkeypatch.setattr(cluster, "node_resources", lambda: [{"CPU": 2.0}])
    monkeypatch.setenv(cluster.WAIT_ENV, "0.3")
    start = time.monotonic()
    with pytest.raises(VitrayError, match=r"--workers 4 needs 4 CPUs .*waited 0.3 s for the autoscaler"):
        cluster.check_fits(4, 1.0, 0.0, "--workers")
    assert 0.3 <= time.monotonic() - start < 5
    assert requests[0] == [{"CPU": 1.0}] * 4 and requests[-1] == []  # asked, then the sticky request cleared
    assert "waiting up to 0.3 s for the autoscaler" in caplog.text

    # Nodes that arrive while it waits let the job start.
    sizes = iter([[{"CPU": 2.0}], [{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 4.0}]])
    monkeypatch.setattr(cluster, "node_resources", lambda: next(sizes))
    cluster.check_fits(4, 1.0, 0.0, "--workers", wait_s=10)


def test_autoscaler_detection(monkeypatch):
    monkeypatch.delenv(cluster.AUTOSCALER_ENV, raising=False)
    monkeypatch.setattr(cluster, "_node_types", lambda: ["node_" + "ab12" * 14])
    assert not cluster.autoscaling()  # Ray's read-only autoscaler: `ray start` nodes, an embedded Ray
    monkeypatch.setattr(cluster, "_node_types", lambda: ["node_" + "ab12" * 14, "gpu-1x"])
    assert cluster.autoscaling()  # a launcher or KubeRay config names its node types
    monkeypatch.setenv(cluster.AUTOSCALER_ENV, "0")
    assert not cluster.autoscaling()
    monkeypatch.setenv(cluster.AUTOSCALER_ENV, "1")
    monkeypatch.setattr(cluster, "_node_types", lambda: [])
    assert cluster.autoscaling()


def test_the_embedded_ray_has_no_autoscaler(ray_session, monkeypatch):
    monkeypatch.delenv(cluster.AUTOSCALER_ENV, raising=False)
    assert cluster.node_resources() and cluster.node_resources()[0]["CPU"] >= 1
    assert not cluster.autoscaling()


# --------------------------------------------------------------------------- shared output


def test_a_local_output_on_a_multi_node_cluster_needs_shared_fs(monkeypatch, tmp_path):
    out = str(tmp_path / "out")
    problem = cluster.shared_output_problem(out, shared_fs=False, nodes=3)
    assert problem == (f"--out {out} is a local path but the Ray cluster has 3 nodes: checkpoints and outputs "
                       f"written on other nodes would not land here; use an s3:// URI, or pass --shared-fs if "
                       f"every node mounts {out}")
    assert cluster.shared_output_problem(out, shared_fs=True, nodes=3) is None
    assert cluster.shared_output_problem("s3://bucket/run", shared_fs=False, nodes=3) is None
    assert cluster.shared_output_problem(out, shared_fs=False, nodes=1) is None

    monkeypatch.setattr(cluster, "node_resources", lambda: [{"CPU": 8.0}] * 3)
    with pytest.raises(VitrayError, match="the Ray cluster has 3 nodes") as info:
        cluster.check_shared_output(out, shared_fs=False)
    assert info.value.exit_code == 2
    cluster.check_shared_output(out, shared_fs=True)
    cluster.check_shared_output("s3://bucket/run", shared_fs=False)


def test_train_refuses_a_local_output_on_several_nodes_before_building_datasets(ray_session, small, tmp_path,
                                                                           monkeypatch):
    from vitray.train.data import load_training_data

    monkeypatch.setattr(cluster, "node_resources", lambda: [{"CPU": 8.0}] * 3)
    with pytest.raises(VitrayError, match="pass --shared-fs"):
        load_training_data(TrainConfig(data=small, out=str(tmp_path / "out")))


# --------------------------------------------------------------------------- the CLI


def test_train_with_more_workers_than_the_cluster_holds_fails_in_seconds(ray_session, small, tmp_path):
    start = time.monotonic()
    proc = subprocess.run(VITRAY + ["train", "--data", small, "--out", str(tmp_path / "out"), "--workers", "64"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("vitray:")]
    assert lines == [proc.stderr.strip().splitlines()[-1]] and "Traceback" not in proc.stderr
    assert lines[0].startswith("vitray: error: --workers 64 needs 64 CPUs and 0 GPUs (1 + 0 each)")
    assert "the cluster has 8 CPUs" in lines[0] and "use --workers 7 or fewer" in lines[0]
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out" / "train").exists()


def test_a_search_checks_each_trial_fits(ray_session, small, tmp_path):
    from vitray.tune import SearchConfig, search

    config = SearchConfig(TrainConfig(data=small, out=str(tmp_path / "search"), workers=8), samples=2)
    with pytest.raises(VitrayError) as info:
        search(config)
    assert str(info.value).startswith("--workers-per-trial 8 needs 8 CPUs")
    assert "plus 1.01 CPU for the trial and Ray Data" in str(info.value) and "use --workers-per-trial 6" \
        in str(info.value)
