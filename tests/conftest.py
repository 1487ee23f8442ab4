"""Shared fixtures: one Ray for the whole session, a real S3 server, small data, a small model."""
from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from s3server import SeaweedS3, planned_s3_port, s3_env

S3_BUCKET = "vitray-test"

# Tests must never reach a hub or send telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray servers of the tests listen on loopback only (see vitray.runtime).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need the session's Ray are marked `ray`: `make test-fast` leaves them (and `slow`) out."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@dataclass(frozen=True)
class S3Plan:
    """Where the session's S3 server listens and its keys, known before it (or Ray) starts."""

    port: int
    access_key: str
    secret_key: str


@pytest.fixture(scope="session")
def s3_plan() -> Iterator[S3Plan]:
    """The S3 server's AWS_* variables in os.environ, without starting it.

    Ray, started after this, hands the variables to its workers; the server itself starts
    only when a test asks for `s3`, so tests without S3 do not wait for it.
    """
    plan = S3Plan(planned_s3_port(), "vitray-test-" + secrets.token_hex(4), secrets.token_urlsafe(24))
    env = s3_env(plan.port, plan.access_key, plan.secret_key)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield plan
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3(s3_plan: S3Plan) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the session, at the planned port with the planned keys."""
    server = SeaweedS3(s3_port=s3_plan.port, access_key=s3_plan.access_key, secret_key=s3_plan.secret_key)
    try:
        server.make_bucket(S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_prefix(s3: SeaweedS3) -> str:
    """A fresh, empty `s3://vitray-test/<unique>` prefix for one test."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def ray_session(s3_plan: S3Plan) -> Iterator[str]:
    """One embedded Ray for the whole session, started after the S3 variables are set.

    Its address goes into RAY_ADDRESS so that `vitray` subprocesses join it
    instead of starting their own.
    """
    import ray

    from vitray.runtime import RayOptions, init_ray

    init_ray(RayOptions(num_cpus=8))
    address = ray.get_runtime_context().gcs_address
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    try:
        yield address
    finally:
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
        ray.shutdown()


def as_a_fresh_process_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on this test stands for a fresh `vitray` process with no cluster named (the session's
    Ray, connected in the pytest process, is not the program's), and starting Ray fails the test."""
    def refuse(*args, **kwargs):
        pytest.fail("Ray was started")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("vitray.runtime.ray_started", lambda: False)
    monkeypatch.setattr("vitray.runtime.init_ray", refuse)


def synth_folder(tmp_path_factory: pytest.TempPathFactory, name: str, n: int, size: int, seed: int,
                 passed_fraction: float) -> str:
    """A small `vitray synth` image folder for training tests."""
    from vitray.data import synth

    out = tmp_path_factory.mktemp(name) / "data"
    synth.write(str(out), n=n, size=size, seed=seed, passed_fraction=passed_fraction, fmt="imagefolder")
    return str(out)


INSPECTION_LABELS = ["passed", "Xplus", "Xminus", "Yplus", "Yminus"]


def save_tiny_vit(folder: str, labels: list[str], size: int = 32, channels: int = 3, seed: int = 2,
                  logit_scale: float = 40.0) -> str:
    """An untrained ViT classifier (patch 4, hidden 32, 2 layers, 2 heads) in export layout.

    Its head is scaled up so that small differences between images change the predicted
    class: scoring tests need some images predicted `passed` and some not.
    """
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from vitray.models import Preprocessing, export_model

    torch.manual_seed(seed)
    config = ViTConfig(image_size=size, patch_size=4, num_channels=channels, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=len(labels),
                       id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(logit_scale)
    export_model(model, Preprocessing.default(size, channels), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny trained-model folder (32 px RGB, 8x8 patch grid, the synth inspection classes)."""
    return save_tiny_vit(str(tmp_path_factory.mktemp("tiny-model") / "model"), INSPECTION_LABELS)
