"""MAE pre-training: the encoder it leaves, its outputs, fine-tuning it with every policy, S3, resuming after a
killed worker or a stopped run, and the checks before any work."""
from __future__ import annotations

import csv
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import synth_folder
from vitray import storage
from vitray.errors import VitrayError
from vitray.models import Preprocessing, build_model
from vitray.train.config import TrainConfig
from vitray.train.pretrain import (PretrainConfig, PretrainResult, encoder_of, mae_config, pretrain,
                                   save_encoder)
from vitray.train.pretrain_loop import build_mae


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> dict[str, str]:
    """A line's images: some to pre-train on (their class folders are there, but pre-training reads no label),
    and a few labelled ones to fine-tune on."""
    return {"unlabelled": synth_folder(tmp_path_factory, "unlabelled", n=48, size=32, seed=7, passed_fraction=0.2),
            "labelled": synth_folder(tmp_path_factory, "labelled", n=40, size=32, seed=8, passed_fraction=0.2)}


@dataclass
class Run:
    out: Path
    result: PretrainResult
    killed: int  # the Ray Train worker killed after epoch 2 (its pid)


EPOCHS = 5


@pytest.fixture(scope="module")
def pretrained(ray_session, line, tmp_path_factory) -> Run:
    """A run of EPOCHS epochs on two workers, one of which is killed after epoch 2, as a lost node would be.

    The other tests read its outputs: what a resumed run leaves must be as good as any.
    """
    from concurrent.futures import ThreadPoolExecutor

    from test_train import _train_worker_pids

    out = tmp_path_factory.mktemp("pretrained") / "run"
    # Epoch 2's checkpoint written: the restarted workers must go on from there, not from scratch.
    second = out / "pretrain" / "epoch-0002" / "checkpoint.json"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(pretrain, PretrainConfig(data=line["unlabelled"], out=str(out), epochs=EPOCHS,
                                                       workers=2, batch_size=8))
        deadline = time.monotonic() + 600  # a loaded machine takes minutes to start Ray Train's workers
        while not (second.exists() or running.done()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert second.exists() and not running.done(), "the run never reached epoch 2, or ended before the kill"
        victim = _train_worker_pids()[-1]
        os.kill(victim, signal.SIGKILL)
        return Run(out, running.result(timeout=300), victim)


def _history(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _last_state(run: Path) -> dict:
    newest = max(run.glob("pretrain/epoch-*/state.pt"))
    return torch.load(newest, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- the model, no Ray


def _tiny_mae(size: int = 32, model: str | None = None) -> torch.nn.Module:
    return build_mae(mae_config(PretrainConfig(data="d", out="o", model=model), Preprocessing.default(size, 3)))


def test_the_mae_starts_with_sine_cosine_positions():
    """transformers 5 leaves a MAE built from a config with all-zero positions; the decoder would be position-blind."""
    mae = _tiny_mae()
    for table in (mae.vit.embeddings.position_embeddings, mae.decoder.decoder_pos_embed):
        assert not table.requires_grad  # fixed, as in MAE
        patches = table[0, 1:]
        assert patches.abs().sum() > 0 and torch.equal(table[0, 0], torch.zeros_like(table[0, 0]))
        assert len({tuple(row.tolist()) for row in patches}) == len(patches)  # every patch its own position
    assert mae.decoder.mask_token.abs().sum() > 0 and mae.vit.embeddings.cls_token.abs().sum() > 0


def test_the_encoder_is_a_plain_vit_with_the_mae_encoders_weights(tmp_path):
    mae = _tiny_mae().eval()
    encoder = encoder_of(mae)
    x = torch.randn(3, 3, 32, 32)
    mae.config.mask_ratio = 0.0  # every patch visible, in order: the MAE encoder's output is the ViT's
    order = torch.arange(64, dtype=torch.float32).expand(3, 64)
    with torch.no_grad():
        assert torch.allclose(mae.vit(pixel_values=x, noise=order).last_hidden_state,
                              encoder(pixel_values=x).last_hidden_state, atol=1e-5)
    save_encoder(encoder, Preprocessing.default(32, 3), str(tmp_path / "model"))
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == ["ViTModel"]
    classifier, prep = build_model(str(tmp_path / "model"), ["a", "b"])
    assert prep == Preprocessing.default(32, 3)
    assert torch.equal(classifier.vit.layers[1].mlp.fc2.weight, mae.vit.layers[1].mlp.fc2.weight)


def test_the_encoder_is_the_one_train_builds_and_the_decoder_is_light():
    for preset, size in (("vit-small", 64), (None, 28)):
        config = mae_config(PretrainConfig(data="d", out="o", model=preset), Preprocessing.default(size, 1))
        with torch.device("meta"):
            vit = build_model(preset, ["a"], size, channels=1)[0].config
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                    "image_size", "num_channels"):
            assert config[key] == getattr(vit, key), key
        assert config["decoder_hidden_size"] == vit.hidden_size // 2
        assert 1 <= config["decoder_num_hidden_layers"] < vit.num_hidden_layers


# --------------------------------------------------------------------------- runs


def test_a_killed_worker_resumes_from_its_checkpoint(pretrained, line):
    assert pretrained.result.resumed_after_epochs, "the run started again from scratch"
    assert pretrained.result.resumed_after_epochs[0] >= 2
    assert [int(r["epoch"]) for r in _history(pretrained.out / "history.csv")] == list(range(1, EPOCHS + 1))
    # A shorter run into the same out would export another run's encoder: refused in one line.
    with pytest.raises(VitrayError, match=f"holds a run begun with --epochs {EPOCHS}; this command gives 2, which a "
                                          "resume cannot change"):
        pretrain(PretrainConfig(data=line["unlabelled"], out=str(pretrained.out), epochs=2, workers=2, batch_size=8))


def test_pretraining_writes_every_output(pretrained):
    from PIL import Image

    out = pretrained.out
    for name in ("history.csv", "curves.png", "reconstructions.png", "args.json", "model/config.json",
                 "model/model.safetensors", "model/preprocessor_config.json"):
        assert (out / name).is_file(), name
    history = _history(out / "history.csv")
    assert list(history[0]) == ["epoch", "loss", "val_loss", "lr", "images_per_s"]
    assert all(0 < float(r["loss"]) < 10 and 0 < float(r["val_loss"]) < 10 and float(r["images_per_s"]) > 0
               for r in history)
    assert float(history[-1]["loss"]) < float(history[0]["loss"])
    for name, least in (("curves.png", (800, 250)), ("reconstructions.png", (300, 300))):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size >= least, (name, image.size)
            pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10, f"{name} is nearly blank"
    prep = json.loads((out / "model" / "preprocessor_config.json").read_text())
    assert prep["size"] == {"height": 32, "width": 32} and prep["image_mean"] == [0.5] * 3
    args = json.loads((out / "args.json").read_text())
    assert args["epochs"] == EPOCHS and args["mae"]["mask_ratio"] == PretrainConfig.mask_ratio
    # The encoder says where it came from; train fine-tunes it at the rate it was pre-trained at.
    provenance = json.loads((out / "model" / "config.json").read_text())["vitray_pretrain"]
    assert provenance == {"method": "mae", "epochs": EPOCHS, "mask_ratio": PretrainConfig.mask_ratio, "lr": 1e-3,
                          "images": provenance["images"]} and 0 < provenance["images"] < 48
    assert TrainConfig(data="d", out="o", model=str(out / "model")).resolved_lr() == 1e-3


def test_the_pretrained_weights_arrive_in_a_classifier(pretrained):
    state = _last_state(pretrained.out)["model"]
    classifier, _ = build_model(str(pretrained.out / "model"), ["Xminus", "Xplus", "passed"])
    weights = classifier.state_dict()
    for name in ("vit.embeddings.position_embeddings", "vit.embeddings.cls_token",
                 "vit.embeddings.patch_embeddings.projection.weight", "vit.layers.0.attention.q_proj.weight",
                 "vit.layers.3.mlp.fc2.bias", "vit.layernorm.weight"):
        assert torch.equal(weights[name], state[name]), name
    assert weights["vit.embeddings.position_embeddings"][0, 1:].abs().sum() > 0  # the sine-cosine table
    assert classifier.config.num_labels == 3


# What each policy leaves as it was: the pre-trained tensor, exactly. LoRA adapts the query and value
# projections (merged into the export); the rest stays.
FROZEN = {"full": [], "head": ["vit.layers.3.attention.q_proj.weight", "vit.layers.0.mlp.fc1.weight"],
          "last:1": ["vit.layers.2.mlp.fc1.weight", "vit.embeddings.patch_embeddings.projection.weight"],
          "lora:2": ["vit.layers.3.attention.k_proj.weight", "vit.layers.0.mlp.fc1.weight"]}


def test_every_policy_trains_the_pretrained_encoder_it_should(pretrained):
    """What `vitray train` builds in its workers (build_model, apply_finetune), for all four policies."""
    from vitray.models import apply_finetune

    start = _last_state(pretrained.out)["model"]
    for policy, frozen in FROZEN.items():
        model = apply_finetune(build_model(str(pretrained.out / "model"), ["a", "b"])[0], policy)
        trainable = {name.replace("base_model.model.", "") for name, p in model.named_parameters() if p.requires_grad}
        weights = {name.replace("base_model.model.", "").replace(".base_layer", ""): p
                   for name, p in model.named_parameters()}
        for name in frozen:
            assert name not in trainable and torch.equal(weights[name], start[name]), (policy, name)
        query = "vit.layers.0.attention.q_proj.weight"
        assert torch.equal(weights[query], start[query]), policy  # before any step, every tensor is the encoder's
        assert any(name.startswith("classifier") for name in trainable), policy


def test_the_encoder_fine_tunes_with_vitray_train(pretrained, line, tmp_path, monkeypatch):
    """With LoRA (adapters merged at export), the longer of the two ways train handles a policy; what each
    policy trains is checked above without a run. Paths relative, as typed: the workers run elsewhere."""
    policy = "lora:2"
    from vitray.train import TrainConfig, train

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "finetuned"
    result = train(TrainConfig(data=os.path.relpath(line["labelled"]), out="finetuned",
                               model=os.path.relpath(pretrained.out / "model"), epochs=1, batch_size=8,
                               finetune=policy, lr=1e-3))
    assert result.metrics["labels"] == ["Xminus", "Xplus", "Yminus", "Yplus", "passed"]
    tuned = build_model(str(out / "model"), result.metrics["labels"])[0].state_dict()
    start = _last_state(pretrained.out)["model"]
    for name in FROZEN[policy]:
        assert torch.equal(tuned[name], start[name]), name
    moved = "vit.layers.3.attention.q_proj.weight"  # LoRA adapts the query projection
    assert not torch.equal(tuned[moved], start[moved]) and torch.allclose(tuned[moved], start[moved], atol=0.1)
    params = result.metrics["params"]
    assert params["trainable"] < params["total"]


@pytest.mark.s3
def test_going_on_from_a_vit_into_s3_tracked(ray_session, line, tiny_model, s3_prefix, tmp_path, monkeypatch):
    """From another ViT (conftest's: hidden 32, learned positions) to an s3:// prefix, tracked in MLflow;
    the same command again only writes the outputs again."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts under ./mlruns
    tracked = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def run(epochs: int):
        return pretrain(PretrainConfig(data=line["unlabelled"], out=s3_prefix, model=tiny_model, epochs=epochs,
                                       batch_size=16, mlflow=tracked, mlflow_experiment="pretrain"))

    first = run(1)
    client = MlflowClient(tracking_uri=tracked)
    (stored,) = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    assert stored.info.status == "FINISHED" and stored.data.params["mask_ratio"] == str(PretrainConfig.mask_ratio)
    assert 1 in {m.step for m in client.get_metric_history(stored.info.run_id, "val_loss")}  # rank 0's epoch 1
    artifacts = {a.path for a in client.list_artifacts(stored.info.run_id)}
    assert {"history.csv", "reconstructions.png", "model"} <= artifacts
    names = {storage.relative(storage.resolve(s3_prefix), f.path) for f in storage.list_files(s3_prefix)}
    assert {"history.csv", "curves.png", "reconstructions.png", "model/config.json", "model/model.safetensors",
            "pretrain/epoch-0001/state.pt"} <= names
    classifier, prep = build_model(storage.join(s3_prefix, "model"), ["a", "b"])
    source, _ = build_model(tiny_model, ["a", "b"])
    assert prep.size == 32 and classifier.config.hidden_size == 32
    # The ViT's own positions went in, and stayed as they were (MAE keeps positions fixed).
    assert torch.equal(classifier.vit.embeddings.position_embeddings, source.vit.embeddings.position_embeddings)
    assert not torch.equal(classifier.vit.layers[0].mlp.fc1.weight, source.vit.layers[0].mlp.fc1.weight)
    storage.delete(storage.resolve(storage.join(s3_prefix, "curves.png")))
    again = run(1)
    assert again.history == first.history and storage.exists(storage.join(s3_prefix, "curves.png"))


# --------------------------------------------------------------------------- checks before work


@pytest.mark.parametrize("change, needle", [
    ({"epochs": 0}, "at least 1"),
    ({"mask_ratio": 1.0}, "--mask-ratio must be between 0 and 1"),
    ({"lr": 5.0}, "--lr must be between 0 and 1"),
    ({"val_fraction": 0.0}, "--val-fraction"),
    ({"gpus_per_worker": -1.0}, "cannot be negative"),
    ({"augment": "strong"}, "--augment must be auto or none"),
    ({"format": "tiff"}, "--format must be one of"),
    ({"model": "vit-huge"}, "unknown model 'vit-huge': not a preset"),
    ({"model": "./no/such/model"}, "model folder not found"),
])
def test_bad_options_are_one_line_errors(change, needle):
    with pytest.raises(VitrayError) as info:
        PretrainConfig(data="d", out="o", **change).check()
    assert "\n" not in str(info.value) and needle in str(info.value)


def test_bad_data_is_refused_in_one_line_before_ray_starts(line, tmp_path, monkeypatch):
    unlabelled = line["unlabelled"]
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run that had to be refused")

    monkeypatch.setattr("vitray.runtime.init_ray", no_ray)
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").write_text("a file")
    cases = [
        (dict(data=str(tmp_path / "missing")), "not found"),
        (dict(data=str(tmp_path / "empty")), "no images"),
        (dict(data=unlabelled, out=str(tmp_path / "taken")), "is a file"),
        (dict(data=unlabelled, mask_ratio=0.99), "leaves none of the 64 patches visible"),
        (dict(data=unlabelled, batch_size=64), "fewer than one batch per worker"),
    ]
    for change, needle in cases:
        with pytest.raises(VitrayError) as info:
            pretrain(PretrainConfig(**{"out": str(tmp_path / "out"), **change}))
        assert "\n" not in str(info.value) and needle in str(info.value), (change, str(info.value))


def test_the_command_line_refuses_bad_usage_in_one_line(capsys, tmp_path):
    from vitray.cli import main

    cases = [(["--data", "d"], "--out is required"),
             (["--data", "d", "--out", str(tmp_path / "o"), "--mask-ratio", "2"], "--mask-ratio must be between 0 and 1"),
             (["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "not found")]
    for args, needle in cases:
        assert main(["pretrain", *args]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vitray")]
        assert len(err) == 1 and err[0].startswith("vitray: error:") and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_sigterm_stops_a_pretraining_on_ray_in_one_line_and_releases_its_output(ray_session, line, tmp_path):
    """`ray job stop` or a cron's timeout (SIGTERM) stops a pre-training as Ctrl-C does: exit 143, one line."""
    import re
    import subprocess
    import sys

    from procs import with_default_signals

    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "vitray.cli", "pretrain", "--data", line["unlabelled"], "--out", str(out),
           "--epochs", "30", "--batch-size", "8"]
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(with_default_signals(cmd), stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "pretrain" / "epoch-0002" / "checkpoint.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    ours = [x for x in text.splitlines() if x.startswith("vitray:")]
    assert code == 143 and len(ours) == 1, text[-3000:]
    match = re.fullmatch(r"vitray: stopped by SIGTERM after epoch (\d+); the same command resumes", ours[0])
    assert match and 2 <= int(match.group(1)) < 30, ours[0]
    assert not (out / "_lease.json").exists()  # released: the same command may start at once
    assert json.loads((out / "pretrain" / "options.json").read_text())["epochs"] == 30
