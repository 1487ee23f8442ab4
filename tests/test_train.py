"""Training on Ray Train: outputs, S3, a killed worker, a killed driver, Ctrl-C, CSV input, checkpoints that
must not run code, a small training in the driver's process, and the CLI's checks."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import types
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import S3_BUCKET, as_a_fresh_process_without_ray, synth_folder
from procs import ray_workers, with_default_signals
from vitray import storage
from vitray.errors import VitrayError
from vitray.data.sampling import class_weights, stratified_split
from vitray.train import TrainConfig, train
from vitray.train.loop import make_scheduler

VITRAY = [sys.executable, "-m", "vitray.cli"]


@pytest.fixture(scope="module")
def inspection(tmp_path_factory) -> str:
    return synth_folder(tmp_path_factory, "inspection", n=160, size=32, seed=3, passed_fraction=0.1)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    return synth_folder(tmp_path_factory, "small", n=40, size=16, seed=4, passed_fraction=0.2)


def _history(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- units


def test_stratified_split_keeps_every_class_in_both_parts():
    labels = np.array([0] * 98 + [1] * 2)
    ids = [str(i) for i in range(100)]
    train_ids, val_ids = stratified_split(ids, labels, 0.1, seed=0)
    assert len(train_ids) + len(val_ids) == 100 and not set(train_ids) & set(val_ids)
    val_labels = {labels[int(i)] for i in val_ids}
    train_labels = {labels[int(i)] for i in train_ids}
    assert val_labels == {0, 1} and train_labels == {0, 1}


def test_class_weights_lift_a_rare_class():
    w = class_weights(np.array([490, 10, 0]))
    assert w[1] > 10 * w[0] and w[2] == 0.0
    # The average image weighs 1.
    assert abs((490 * w[0] + 10 * w[1]) / 500 - 1.0) < 1e-6


def test_layer_decay_slows_each_layer_below_the_head_and_keeps_weight_decay_off_vectors():
    from vitray.models import apply_finetune, build_model
    from vitray.train.loop import parameter_groups

    model, _ = build_model(None, ["a", "b"], 32)  # 4 layers
    rate = {id(p): g["lr"] for g in parameter_groups(model, 1e-3, 0.05, 0.5) for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in parameter_groups(model, 1e-3, 0.05, 0.5) for p in g["params"]}
    named = dict(model.named_parameters())
    assert rate[id(named["classifier.weight"])] == rate[id(named["vit.layernorm.weight"])] == pytest.approx(1e-3)
    for i in range(4):  # layer i at depth i + 1 of 5
        assert rate[id(named[f"vit.layers.{i}.mlp.fc1.weight"])] == pytest.approx(1e-3 * 0.5 ** (4 - i))
    assert rate[id(named["vit.embeddings.cls_token"])] == pytest.approx(1e-3 * 0.5 ** 5)
    assert decay[id(named["vit.layers.0.mlp.fc1.weight"])] == 0.05 and decay[id(named["vit.layers.0.mlp.fc1.bias"])] == 0
    assert len(rate) == len(list(model.parameters()))  # every parameter in one group
    # One rate: the two groups (matrices decayed, first) a checkpoint of such a run holds.
    groups = parameter_groups(model, 1e-3, 0.05, 1.0)
    assert [(g["weight_decay"], g["lr"]) for g in groups] == [(0.05, 1e-3), (0.0, 1e-3)]
    # LoRA's names (peft wraps the model) are found too; frozen parameters are left out.
    lora = apply_finetune(build_model(None, ["a", "b"], 32)[0], "lora:2")
    rates = sorted({g["lr"] for g in parameter_groups(lora, 1e-3, 0.05, 0.5)})
    assert rates == pytest.approx([1e-3 * 0.5 ** k for k in (4, 3, 2, 1, 0)])
    assert sum(len(g["params"]) for g in parameter_groups(lora, 1e-3, 0.05, 0.5)) == \
        sum(p.requires_grad for p in lora.parameters())


def test_schedule_warms_up_then_decays_to_zero():
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, total_steps=100, warmup_fraction=0.1)
    rates = []
    for _ in range(101):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[5] == pytest.approx(0.5) and rates[10] == pytest.approx(1.0)
    assert rates[55] == pytest.approx(0.5, abs=1e-6) and rates[100] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_training_rows_come_in_a_mixed_order(ray_session, inspection):
    """An image folder lists its images class by class; training must not see them that way."""
    from vitray.data.sources import inspect_source
    from vitray.train.data import image_dataset

    source = inspect_source(inspection, None)
    rows = image_dataset(source, source.ids, 32, 3, shuffle_seed=0).take_all()
    labels = [int(r["label"]) for r in rows]
    assert sorted(labels) == sorted(source.row_labels.tolist())  # every image once
    first = labels[: len(labels) // 4]
    assert len(set(first)) == len(source.labels)  # every class already in the first quarter
    again = [int(r["label"]) for r in image_dataset(source, source.ids, 32, 3, shuffle_seed=0).take_all()]
    assert again == labels  # seeded


# --------------------------------------------------------------------------- runs


SEEDED = ["--epochs", "2", "--workers", "2", "--batch-size", "4", "--seed", "5"]


@dataclass(frozen=True)
class SeededRuns:
    local: Path
    s3: str


@pytest.fixture(scope="module")
def seeded_runs(ray_session, small, s3, tmp_path_factory) -> SeededRuns:
    """The same command (SEEDED) twice: into a local folder, and into an S3 prefix."""
    runs = SeededRuns(tmp_path_factory.mktemp("seeded") / "a", f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}")
    for out in (str(runs.local), runs.s3):
        train(TrainConfig(data=small, out=out, epochs=2, workers=2, batch_size=4, seed=5))
    return runs


def _read_history(out: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(out, "history.csv")).decode())))


def test_the_same_seed_trains_the_same_model(seeded_runs):
    """Balance, augmentation and row order are seeded: identical commands give identical runs."""
    def history(out: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in _read_history(out)]

    # That another seed draws otherwise is tests/test_batches.py's (it would cost a third run here).
    assert history(str(seeded_runs.local)) == history(seeded_runs.s3)


@pytest.mark.s3
def test_two_workers_write_every_output_to_s3(seeded_runs, small):
    from vitray.data.sources import inspect_source
    from vitray.models import load_trained

    out = seeded_runs.s3
    names = {storage.relative(storage.resolve(out), f.path) for f in storage.list_files(out)}
    assert {"metrics.json", "history.csv", "confusion_matrix.png", "curves.png", "args.json", "model/config.json",
            "model/model.safetensors", "model/preprocessor_config.json"} <= names
    assert any(n.startswith("train/epoch-") for n in names)  # Ray Train's checkpoints are on S3 too
    metrics = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    assert set(metrics) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix", "labels", "params"}
    assert metrics["labels"] == ["Xminus", "Xplus", "Yminus", "Yplus", "passed"]
    assert set(metrics["per_class"]["passed"]) == {"precision", "recall", "f1", "support"}
    assert metrics["params"]["trainable"] == metrics["params"]["total"] > 0
    source = inspect_source(small)  # each worker validates its share, together every image once
    _, val_ids = stratified_split(source.ids, source.row_labels, 0.1, 5)
    assert np.sum(metrics["confusion_matrix"]) == len(val_ids)
    history = _read_history(out)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert list(history[0]) == ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr",
                                "images_per_s"]
    assert all(float(r["images_per_s"]) > 0 for r in history)
    model, prep, labels = load_trained(storage.join(out, "model"))
    assert labels[-1] == "passed" and model.config.id2label[4] == "passed" and prep.size == 16
    # The last epoch is exported (--export last, the default), with that epoch's validation figures.
    assert metrics["best_epoch"] in (1, 2) and metrics["exported_epoch"] == 2
    assert metrics["accuracy"] == pytest.approx(float(history[1]["val_accuracy"]))
    assert json.loads(storage.read_bytes(storage.join(out, "args.json")))["workers"] == 2


def _train_worker_pids() -> list[int]:
    return ray_workers("ray::RayTrainWorker")


def test_a_killed_worker_resumes_from_its_checkpoint(ray_session, inspection, tmp_path):
    out = tmp_path / "ft"
    done: dict = {}
    runner = threading.Thread(target=lambda: done.setdefault(
        "result", train(TrainConfig(data=inspection, out=str(out), epochs=5, workers=2, batch_size=16))))
    runner.start()
    # Wait for epoch 3's checkpoint: by then Ray Train has surely registered an earlier one
    # (reports reach the controller on its next poll, not at once).
    deadline = time.time() + 240
    while not (out / "train" / "epoch-0003").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert (out / "train" / "epoch-0003").exists(), "training never reached epoch 3"
    pids = _train_worker_pids()
    assert pids
    os.kill(pids[-1], signal.SIGKILL)
    runner.join(timeout=300)
    assert "result" in done, "training did not finish after the worker was killed"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_after_epochs"], "the run restarted from scratch instead of resuming"
    epochs = [int(r["epoch"]) for r in _history(out / "history.csv")]
    assert epochs == [1, 2, 3, 4, 5]


def _wait_for_free_cpus(timeout: float = 60.0) -> None:
    """Until every CPU of the session's Ray is free again (or the timeout)."""
    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0) and \
            time.monotonic() < deadline:
        time.sleep(0.2)


def test_kaggle_csv_trains_directly(without_ray, tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        digit = i % 3
        img = np.zeros((28, 28), dtype=np.int64)
        img[4 + 6 * digit: 10 + 6 * digit, 4:24] = 200 + rng.integers(0, 50)
        rows.append([digit, *img.reshape(-1)])
    df = pd.DataFrame(rows, columns=["label"] + [f"pixel{i}" for i in range(784)])
    df.to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "csvrun"
    result = train(TrainConfig(data=str(tmp_path / "train.csv"), out=str(out), epochs=2, batch_size=32))
    assert result.metrics["labels"] == ["0", "1", "2"]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["num_channels"] == 1 and config["image_size"] == 28 and config["patch_size"] == 4


def test_the_box_attention_weight_is_on_for_data_with_boxes_unless_given(tmp_path):
    from vitray.models.specs import PRETRAINED_HERE
    from vitray.train.config import BOX_ATTENTION, BOX_ATTENTION_PRETRAINED_HERE
    from vitray.train.data import box_attention_weight

    def weight(given, has_boxes, finetune="full"):
        return box_attention_weight(TrainConfig(data="d", out="o", box_attention=given, finetune=finetune), has_boxes)

    assert weight(None, True) == BOX_ATTENTION > 0 and weight(None, False) == 0.0
    assert weight(0.0, True) == 0.0 and weight(0.0, False) == 0.0 and weight(3.0, True) == 3.0
    with pytest.raises(VitrayError, match="needs images with boxes"):
        weight(3.0, False)
    assert weight(None, True, "head") == 0.0 and weight(None, True, "lora:4") == BOX_ATTENTION
    elsewhere = tmp_path / "hub-vit"  # a ViT pre-trained elsewhere: opt-in
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert box_attention_weight(TrainConfig(data="d", out="o", model=str(elsewhere)), True) == 0.0
    here = tmp_path / "mae-encoder"  # an encoder of `vitray pretrain`: the lighter weight
    here.mkdir()
    (here / "config.json").write_text(json.dumps({"model_type": "vit", PRETRAINED_HERE: {"method": "mae"}}))
    assert 0 < BOX_ATTENTION_PRETRAINED_HERE < BOX_ATTENTION
    assert box_attention_weight(TrainConfig(data="d", out="o", model=str(here)), True) == BOX_ATTENTION_PRETRAINED_HERE
    assert box_attention_weight(TrainConfig(data="d", out="o", model=str(here)), False) == 0.0
    assert box_attention_weight(TrainConfig(data="d", out="o", model=str(here), finetune="head"), True) == 0.0
    assert box_attention_weight(TrainConfig(data="d", out="o", model="vit-small"), True) == BOX_ATTENTION
    with pytest.raises(VitrayError, match="--finetune head trains only the classifier"):
        weight(1.0, True, "head")


def test_the_box_attention_term_trains_on_the_boxes_of_a_parquet(without_ray, tmp_path):
    """Data with boxes trains with the term by default (recorded in args.json), boxes moved with the
    augmentation; --box-attention 0 turns it off; the exported model is a plain one."""
    from vitray.data import synth
    from vitray.train.config import BOX_ATTENTION

    data = tmp_path / "data"
    synth.write(str(data), n=96, size=32, seed=6, passed_fraction=0.1, fmt="parquet")
    runs = {}
    for name, weight in (("auto", None), ("off", 0.0)):
        out = tmp_path / name
        train(TrainConfig(data=str(data), out=str(out), epochs=1, batch_size=8, seed=1, box_attention=weight))
        runs[name] = _history(out / "history.csv")[0]
        assert (out / "model" / "model.safetensors").exists()
        assert json.loads((out / "args.json").read_text())["box_attention"] == (BOX_ATTENTION if weight is None else 0)
    # At the start a map holds about the box's share of the image (under a fifth here): the term adds
    # about log(0.5 / share) per image until the maps hold half their mass in the boxes.
    assert float(runs["auto"]["train_loss"]) > float(runs["off"]["train_loss"]) + 0.3
    config = json.loads((tmp_path / "auto" / "model" / "config.json").read_text())
    assert "vitray" not in json.dumps(config.get("_attn_implementation") or config.get("attn_implementation"))


def test_export_best_exports_the_epoch_of_the_best_validation_macro_f1(ray_session, small, tmp_path):
    import torch

    from vitray.train.checkpoints import load_state
    from vitray.models import load_trained

    out = tmp_path / "best"
    result = train(TrainConfig(data=small, out=str(out), epochs=3, batch_size=4, seed=2, export="best"))
    history = _history(out / "history.csv")
    best = max(history, key=lambda r: (float(r["val_macro_f1"]), int(r["epoch"])))
    assert result.exported_epoch == result.best_epoch == int(best["epoch"])
    assert result.metrics["macro_f1"] == pytest.approx(float(best["val_macro_f1"]))
    exported = load_trained(str(out / "model"))[0].state_dict()
    saved = load_state(str(out / "train" / f"epoch-{result.exported_epoch:04d}" / "state.pt"), "x")["model"]
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)


def test_box_attention_on_data_without_boxes_is_refused_in_one_line(small, tmp_path, capsys):
    from vitray.cli import main

    assert main(["train", "--data", small, "--out", str(tmp_path / "o"), "--box-attention", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--box-attention needs images with boxes" in lines[0], lines
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- checks before work


@pytest.mark.parametrize("args,needle", [
    (["--data", "/nonexistent/data", "--out", "x"], "not found"),
    (["--data", ".", "--out", "x", "--epochs", "0"], "at least 1"),
    (["--data", ".", "--out", "x", "--finetune", "last:x"], "finetune"),
    (["--data", ".", "--out", "x", "--lr", "5"], "--lr"),
    (["--data", ".", "--out", "x", "--box-attention", "-1"], "--box-attention"),
    (["--data", ".", "--out", "x", "--export", "first"], "--export"),
    (["--data", ".", "--out", "x", "--layer-decay", "0"], "--layer-decay"),
    (["--data", ".", "--out", "x", "--in-process-max", "-1"], "--in-process-max"),
    (["--out", "x"], "--data is required"),
    (["--data", ".", "--out", "x", "--frobnicate"], "unrecognized"),
])
def test_bad_options_are_one_line_errors(args, needle, capsys):
    from vitray.cli import main

    try:
        code = main(["train", *args])
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitray: error:") and needle in lines[0], lines


def test_the_default_learning_rate_follows_where_the_model_was_pre_trained(tmp_path):
    elsewhere, here = tmp_path / "hub-like", tmp_path / "mae-here"
    for folder, extra in ((elsewhere, {}), (here, {"vitray_pretrain": {"method": "mae"}})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "vit", **extra}))

    def lr(model, finetune="full", **kw):
        return TrainConfig(data="d", out="o", model=model, finetune=finetune, **kw).resolved_lr()

    assert lr(None) == lr("vit-small") == 1e-3  # from scratch
    assert lr(str(elsewhere)) == lr("google/vit-base-patch16-224") == 1e-4  # full fine-tuning of another's model
    assert lr(str(elsewhere), "head") == lr(str(elsewhere), "lora:8") == lr(str(elsewhere), "last:2") == 1e-3
    assert lr(str(here)) == 1e-3  # an encoder vitray pre-trained: its own rate
    assert lr(str(elsewhere), lr=3e-4) == 3e-4


def test_config_file_supplies_options_and_flags_override(tmp_path):
    from vitray.cli import parse
    from vitray.cli.training import train_config

    (tmp_path / "c.yaml").write_text("data: /d\nout: /o\nepochs: 7\nbatch-size: 8\nlr: 1e-4\n")
    args = parse(["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "9"])
    config = train_config(args)
    assert (config.data, config.epochs, config.batch_size) == ("/d", 9, 8)
    assert config.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; it must still be a number
    (tmp_path / "bad.yaml").write_text("data: /d\nout: /o\nepoch: 7\n")
    with pytest.raises(VitrayError, match="unknown option"):
        train_config(parse(["train", "--config", str(tmp_path / "bad.yaml")]))


def test_an_output_that_is_a_file_is_refused_before_ray_starts(small, tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    start = time.monotonic()
    proc = subprocess.run(VITRAY + ["train", "--data", small, "--out", str(out)], capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"vitray: error: --out {out} is a file; give a folder or s3:// prefix"]
    assert time.monotonic() - start < 30  # no Ray start-up (its banner would be on stderr too)


# --------------------------------------------------------------------------- checkpoints run no code


def _plant_pickle(folder, marker) -> None:
    """A state.pt whose unpickling runs a shell command (touching `marker`), with a valid record beside it."""
    import torch

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    epoch = int(folder.name.split("-")[1])  # the epoch its folder's name says
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(), "optimizer": {}, "scheduler": {}, "epoch": epoch, "history": []},
               folder / "state.pt")
    size = (folder / "state.pt").stat().st_size
    (folder / "checkpoint.json").write_text(json.dumps({"epoch": epoch, "state_bytes": size}))


def test_a_planted_pickle_is_refused_without_running_it(tmp_path):
    from vitray.train.checkpoints import check_resume, complete_checkpoints, load_state

    marker = tmp_path / "ran"
    _plant_pickle(tmp_path / "out" / "train" / "epoch-0001", marker)
    run = str(tmp_path / "out" / "train")
    assert complete_checkpoints(run) == [(1, os.path.join(run, "epoch-0001"))]
    for load in (lambda: check_resume(run), lambda: load_state(os.path.join(run, "epoch-0001", "state.pt"), "x")):
        with pytest.raises(VitrayError) as info:
            load()
        assert "\n" not in str(info.value) and "not a vitray training state" in str(info.value)
    assert not marker.exists()


def test_a_planted_pickle_in_a_run_stops_the_rerun_in_one_line(seeded_runs, small, tmp_path):
    """Whoever can write to a shared --out must not get code run by the next `vitray train` there."""
    import shutil

    out = tmp_path / "shared"
    shutil.copytree(seeded_runs.local, out)  # a finished run, its checkpoints included
    assert (out / "train" / "epoch-0002" / "state.pt").exists()
    marker = tmp_path / "ran"
    _plant_pickle(out / "train" / "epoch-0002", marker)
    proc = subprocess.run(VITRAY + ["train", "--data", small, "--out", str(out), *SEEDED],
                          capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "loading the checkpoint ran the planted code"
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vitray: error: {out / 'train' / 'epoch-0002' / 'state.pt'}: "
                                                   f"not a vitray training state"), proc.stderr[-2000:]


# --------------------------------------------------------------------------- Ctrl-C


def _complete_epochs(run) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run.glob("epoch-*/checkpoint.json"))


def _wait_for_epoch(proc: subprocess.Popen, run, epoch: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while max(_complete_epochs(run), default=0) < epoch and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert max(_complete_epochs(run), default=0) >= epoch, f"training never checkpointed epoch {epoch}"


def _stop_after_epoch(cmd: list[str], run, epoch: int, sig: int = signal.SIGINT, **popen) -> tuple[int, float]:
    """Start `cmd`, send `sig` to its group once `run` holds epoch's checkpoint (SIGINT: what Ctrl-C in a terminal
    does); its exit code and how long it took to stop."""
    proc = subprocess.Popen(with_default_signals(cmd), start_new_session=True, **popen)
    try:
        _wait_for_epoch(proc, run, epoch)
        os.killpg(proc.pid, sig)
        start = time.monotonic()
        proc.wait(timeout=60)
        return proc.returncode, time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigterm_then_a_killed_driver_and_the_same_command_finishes_in_one_tracked_run(ray_session, inspection,
                                                                                       tmp_path):
    """SIGTERM (`ray job stop`, Kubernetes, systemd) stops a run on Ray as Ctrl-C does: exit 143 in one line;
    the rerun resumes, its driver is killed outright (its lease is taken over at once: its process is gone);
    the third run finishes, and MLflow (a local store) holds one run that went on through all three."""
    out = tmp_path / "ctrl-c"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = VITRAY + ["train", "--data", inspection, "--out", str(out), "--epochs", "8", "--batch-size", "32",
                    "--mlflow", store, "--mlflow-experiment", "resumed"]
    log, err = tmp_path / "stdout.log", tmp_path / "stderr.log"  # files, not pipes: Ray's output could fill a pipe
    # In tmp_path: MLflow puts a SQLite store's artifacts in ./mlruns.
    with open(log, "w") as stdout, open(err, "w") as stderr:
        code, stopped_in = _stop_after_epoch(cmd, out / "train", 2, signal.SIGTERM, stdout=stdout, stderr=stderr,
                                             cwd=tmp_path)
    stderr = err.read_text()
    assert code == 143, stderr[-3000:]
    assert stopped_in < 30
    ours = [line for line in stderr.splitlines() if line.startswith("vitray:")]
    assert len(ours) == 1 and stderr.strip().splitlines()[-1] == ours[0], stderr[-3000:]
    match = re.fullmatch(r"vitray: stopped by SIGTERM after epoch (\d+); the same command resumes", ours[0])
    assert match, ours[0]
    epoch = int(match.group(1))
    assert epoch >= 2 and epoch == max(_complete_epochs(out / "train"))  # the newest complete checkpoint
    assert epoch < 8 and not (out / "metrics.json").exists()

    # The same command resumes; its driver dies without a word (SIGKILL) a checkpoint later.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=tmp_path)
    try:
        _wait_for_epoch(proc, out / "train", epoch + 1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _wait_for_free_cpus()  # Ray notices the driver is gone and releases its workers

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "took over the lease" in rerun.stderr and "whose process has ended" in rerun.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    first, second = metrics["resumed_after_epochs"]
    assert first == epoch and epoch < second < 8, metrics["resumed_after_epochs"]
    assert [int(r["epoch"]) for r in _history(out / "history.csv")] == list(range(1, 9))
    # Checkpoints Ray Train never registered (written just before an interruption) do not pile up.
    kept = _complete_epochs(out / "train")
    assert 8 in kept and len(kept) <= 3

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == f"train {out}"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1")]
    assert sorted(set(steps)) == list(range(1, 9)), steps  # an epoch redone after a kill logs its step again
    assert (tmp_path / "mlruns").is_dir()  # the run's artifacts, where MLflow puts a SQLite store's


# --------------------------------------------------------------------------- in this process


@pytest.fixture
def without_ray(monkeypatch):
    """No cluster named, and starting Ray fails the test: a small training must not need it."""
    as_a_fresh_process_without_ray(monkeypatch)


def test_where_a_training_runs(monkeypatch):
    from vitray.train.data import trains_in_process

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def here(images: int, limit: int = 2000, **kw) -> bool:
        return trains_in_process(images, TrainConfig(data="d", out="o", **kw), limit)

    ray = types.SimpleNamespace(is_initialized=lambda: False)  # whatever Ray this test process has
    monkeypatch.setitem(sys.modules, "ray", ray)
    assert here(2000) and not here(2001) and not here(10, limit=0)
    assert not here(10, ray_address="auto")  # a cluster named: its workers train
    ray.is_initialized = lambda: True  # the program calling vitray has started Ray: it trains there
    assert not here(10)
    monkeypatch.delitem(sys.modules, "ray")  # Ray never imported: not started
    assert here(10)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    assert not here(10, workers=2, gpus_per_worker=1)  # data-parallel over GPUs needs Ray's workers


@pytest.mark.s3
def test_a_small_training_runs_here_without_ray_and_keeps_what_a_ray_run_keeps(without_ray, small, s3, tmp_path):
    import torch

    from vitray.train.checkpoints import load_state
    from vitray.models import load_trained

    out = tmp_path / "here"
    config = dict(data=small, epochs=4, workers=2, batch_size=4, seed=5, export="best")
    result = train(TrainConfig(out=str(out), **config))
    assert {"metrics.json", "history.csv", "args.json", "curves.png", "confusion_matrix.png", "model"} <= \
        {p.name for p in out.iterdir()}
    history = _history(out / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4]
    best = max(history, key=lambda r: (float(r["val_macro_f1"]), int(r["epoch"])))
    assert result.exported_epoch == result.best_epoch == int(best["epoch"])
    exported = load_trained(str(out / "model"))[0].state_dict()
    saved = load_state(str(out / "train" / f"epoch-{result.exported_epoch:04d}" / "state.pt"), "x")["model"]
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    # Ray Train's CheckpointConfig, kept by hand: the two best and the newest.
    assert 4 in _complete_epochs(out / "train") and len(_complete_epochs(out / "train")) <= 3
    # The same command into S3: the same run (seeded), its outputs and checkpoints there.
    s3_out = f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"
    train(TrainConfig(out=s3_out, **config))
    assert [{k: v for k, v in r.items() if k != "images_per_s"} for r in _read_history(s3_out)] == \
        [{k: v for k, v in r.items() if k != "images_per_s"} for r in history]
    names = {storage.relative(storage.resolve(s3_out), f.path) for f in storage.list_files(s3_out)}
    assert {"model/model.safetensors", "metrics.json", "train/epoch-0004/state.pt"} <= names


@pytest.mark.parametrize("sig,code,words", [(signal.SIGINT, 130, "interrupted"),
                                            (signal.SIGHUP, 129, "stopped by SIGHUP")])
def test_a_stopped_small_training_keeps_its_epochs_and_the_same_command_resumes(inspection, tmp_path, sig, code,
                                                                                 words):
    out = tmp_path / "here"
    cmd = VITRAY + ["train", "--data", inspection, "--out", str(out), "--epochs", "20", "--batch-size", "16"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    err = tmp_path / "stderr.log"
    with open(err, "w") as stderr:
        exit_code, _ = _stop_after_epoch(cmd, out / "train", 2, sig, stdout=subprocess.DEVNULL, stderr=stderr,
                                         env=env)
    stderr = err.read_text()
    assert exit_code == code, stderr[-3000:]
    assert "in this process" in stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(rf"vitray: {words} after epoch (\d+); the same command resumes", last)
    assert match, stderr[-3000:]
    epoch = int(match.group(1))
    assert 2 <= epoch == max(_complete_epochs(out / "train")) and epoch < 20

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming after epoch {epoch}" in rerun.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_after_epochs"] == [epoch] and metrics["exported_epoch"] == 20
    assert [int(r["epoch"]) for r in _history(out / "history.csv")] == list(range(1, 21))
