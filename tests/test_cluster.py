"""cluster.yaml: what `ray up` checks before it calls AWS, and what docs/cluster.md promises.

A CPU-only head, bounded GPU worker types, the current Ray GPU image on the client's
Ray version, S3 through instance roles and no port open to the world but SSH.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def worker_types(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]}


def test_ray_validator_accepts_it(cluster: dict[str, Any]) -> None:
    # The two steps of `ray up` (commands._bootstrap_config) that need no cloud access:
    # merge Ray's AWS defaults, then validate against ray-schema.json and its cross-checks.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)  # raises on a config `ray up` would refuse
    assert set(prepared["available_node_types"]) == set(cluster["available_node_types"])
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_validator_rejects_a_broken_copy(cluster: dict[str, Any]) -> None:
    # The check above is only worth something if the validator looks at node types at all.
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu-1x"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_head_runs_no_training(cluster: dict[str, Any]) -> None:
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "the head needs no GPU instance"


def test_gpu_worker_types_are_bounded(cluster: dict[str, Any]) -> None:
    workers = worker_types(cluster)
    gpus = sorted(t["resources"].get("GPU", 0) for t in workers.values())
    assert 1 in gpus and 8 in gpus, "a single-GPU and an 8-GPU worker type"
    for name, t in workers.items():
        assert t["resources"].get("GPU", 0) >= 1, f"{name} has no GPU"
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"], name
        assert t["max_workers"] >= 1, name
    assert sum(t["min_workers"] for t in workers.values()) == 0, "no GPU idles when there is no job"
    single = next(t for t in workers.values() if t["resources"]["GPU"] == 1)
    assert single["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"


def test_image_is_the_ray_gpu_image_of_the_client_version(cluster: dict[str, Any]) -> None:
    import sys

    import ray

    image = cluster["docker"]["image"]
    repo, tag = image.split(":")
    assert repo == "rayproject/ray", "the current Ray image, not the deprecated rayproject/ray-ml"
    assert "ray-ml" not in CLUSTER.read_text()
    assert tag.endswith("-gpu")
    # Jobs are submitted from this environment: the cluster should run the same Ray and Python.
    assert tag.startswith(f"{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}"), tag
    assert "--gpus all" in cluster["docker"]["worker_run_options"]
    assert not any("--gpus" in opt for opt in cluster["docker"].get("run_options", []) +
                   cluster["docker"].get("head_run_options", [])), "the head has no GPU to hand over"


def test_project_is_installed_on_every_node(cluster: dict[str, Any]) -> None:
    (remote, local), = cluster["file_mounts"].items()
    assert local == "."
    assert any("pip install" in cmd and remote in cmd for cmd in cluster["setup_commands"])


def test_nothing_is_open_to_the_world_but_ssh(cluster: dict[str, Any]) -> None:
    # The group is named only: Ray creates it with its two rules (the cluster's own traffic, and
    # SSH from outside). A rule added here would open more, so none is.
    assert set(cluster["provider"]["security_group"]) == {"GroupName"}, cluster["provider"]["security_group"]
    assert all("SecurityGroupIds" not in t["node_config"] for t in cluster["available_node_types"].values())
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard is reached through `ray dashboard`"
    assert "0.0.0.0" not in head_start


def test_s3_through_instance_roles_and_no_keys(cluster: dict[str, Any]) -> None:
    for name, t in cluster["available_node_types"].items():
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn, name
    text = CLUSTER.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an access key id in cluster.yaml"
    assert not re.search(r"aws_(secret_)?access_key|AWS_SECRET|AWS_ACCESS_KEY|AWS_SESSION_TOKEN", text, re.I)
