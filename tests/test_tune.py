"""Ray Tune searches: SPACE parsing, the CLI's checks, an ASHA search, S3, and resuming a search."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import synth_folder
from procs import with_default_signals
from vitray import storage
from vitray.errors import VitrayError
from vitray.train import TrainConfig
from vitray.tune import (SearchConfig, Space, default_concurrency, format_trials, parse_space, search, summarize,
                         trial_config)

VITRAY = [sys.executable, "-m", "vitray.cli"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """120 synthetic inspection images of 16 px: the smallest data a search learns anything from."""
    return synth_folder(tmp_path_factory, "tune-data", n=120, size=16, seed=5, passed_fraction=0.2)


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


# --------------------------------------------------------------------------- SPACE


@pytest.mark.parametrize("name, spec, kind, values", [
    ("lr", "loguniform:1e-4:1e-2", "loguniform", (1e-4, 1e-2)),
    ("lr", "uniform:0.001:0.003", "uniform", (0.001, 0.003)),
    ("lr", "3e-4", "value", (3e-4,)),
    ("lr", [1e-3, 3e-3], "choice", (1e-3, 3e-3)),  # a YAML list is a choice
    ("epochs", "choice:5,10, 15", "choice", (5, 10, 15)),
    ("epochs", "choice:5,5,10", "choice", (5, 10)),
    ("epochs", "uniform:2:6", "uniform", (2, 6)),
    ("epochs", 12, "value", (12,)),
    ("batch_size", "choice:16,32", "choice", (16, 32)),
    ("finetune", "last:2", "value", ("last:2",)),  # a policy with a colon is not a space
    ("finetune", "choice:head,last:2,lora:8", "choice", ("head", "last:2", "lora:8")),
])
def test_space_syntax(name, spec, kind, values):
    space = parse_space(name, spec)
    assert (space.kind, space.values) == (kind, values)


@pytest.mark.parametrize("name, spec, needle", [
    ("lr", "loguniform:1e-4", "LOW:HIGH"),
    ("lr", "uniform:1e-2:1e-4", "LOW must be below HIGH"),
    ("lr", "loguniform:0:1e-2", "LOW > 0"),
    ("lr", "choice:", "empty value"),
    ("lr", "choice:1e-3,,2e-3", "empty value"),
    ("lr", "logunifrom:1e-4:1e-2", "not a number"),
    ("lr", "fast", "not a number"),
    ("epochs", "choice:1,2.5", "not a whole number"),
    ("finetune", "uniform:1:2", "choice:A,B"),
    ("seed", "choice:1,2", "cannot be searched"),
])
def test_bad_space_is_one_line(name, spec, needle):
    with pytest.raises(VitrayError) as info:
        parse_space(name, spec)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_integer_ranges_include_both_ends():
    from ray import tune

    sampled = {parse_space("epochs", "uniform:2:3").to_tune().sample() for _ in range(200)}
    assert sampled == {2, 3}
    assert isinstance(parse_space("lr", "loguniform:1e-4:1e-2").to_tune(), tune.search.sample.Float)


def test_every_edge_of_a_space_is_checked_like_a_train_option(tmp_path):
    base = TrainConfig(data=str(tmp_path), out=str(tmp_path / "out"))
    with pytest.raises(VitrayError, match="--lr uniform:0.5:2.0: --lr must be between 0 and 1"):
        SearchConfig(base, space={"lr": "uniform:0.5:2"}).check()
    with pytest.raises(VitrayError, match="--finetune"):
        SearchConfig(base, space={"finetune": "choice:full,last:x"}).check()
    with pytest.raises(VitrayError, match="--metric"):
        SearchConfig(base, metric="loss").check()
    SearchConfig(base, space={"lr": "loguniform:1e-4:1e-2", "epochs": "choice:1,2"}).check()


def test_without_a_space_the_learning_rate_is_searched_around_its_default(tmp_path):
    base = TrainConfig(data=str(tmp_path), out=str(tmp_path))
    assert SearchConfig(base).spaces() == {"lr": Space("lr", "loguniform", (1e-4, 1e-2))}


def test_concurrency_leaves_a_cpu_per_trial_for_ray_data(tmp_path):
    base = TrainConfig(data="d", out="o")
    assert default_concurrency(base, {"CPU": 8.0}) == 4
    assert default_concurrency(TrainConfig(data="d", out="o", workers=3), {"CPU": 8.0}) == 2
    assert default_concurrency(base, {"CPU": 1.0}) == 1  # never zero: one trial waits for room
    gpu = TrainConfig(data="d", out="o", workers=2, gpus_per_worker=1)
    assert default_concurrency(gpu, {"CPU": 32.0, "GPU": 4.0}) == 2


def test_each_trial_trains_under_its_own_folder():
    config = trial_config(TrainConfig(data="d", out="s3://b/search", epochs=30),
                          {"lr": 0.002, "epochs": 4.0, "finetune": "lora:8"}, "abc12_00003")
    assert config.out == "s3://b/search/trials/abc12_00003"
    assert (config.lr, config.epochs, config.finetune, config.data) == (0.002, 4, "lora:8", "d")


def _fake_result(trial_id: str, lr: float, epochs: int, curve: list[tuple[float, float]], error=None):
    """A Tune result as summarize() reads it: config, metrics and the per-epoch dataframe."""
    from types import SimpleNamespace

    import pandas as pd

    frame = pd.DataFrame([{"epoch": e, "val_macro_f1": f1, "val_loss": loss, "training_iteration": e}
                          for e, (f1, loss) in enumerate(curve, 1)])
    return SimpleNamespace(metrics={"trial_id": trial_id}, config={"lr": lr, "epochs": epochs},
                           metrics_dataframe=frame, error=error, path=f"/x/tune/{trial_id}")


def test_trials_rank_by_the_metric_then_the_lower_loss():
    config = SearchConfig(TrainConfig(data="d", out="o"), space={"lr": "loguniform:1e-4:1e-2", "epochs": "3"})
    grid = [_fake_result("t0", 1e-3, 3, [(0.5, 1.2), (0.8, 0.9), (0.8, 0.7)]),  # ties at 0.8: epoch 3 has lower loss
            _fake_result("t1", 2e-3, 3, [(0.4, 1.3)]),  # stopped by ASHA after one epoch
            _fake_result("t2", 3e-3, 3, [(0.8, 0.8), (0.6, 1.0), (0.7, 0.9)]),
            _fake_result("t3", 4e-3, 3, [], error=RuntimeError("boom"))]
    trials = summarize(grid, config)
    assert [(t.trial_id, t.best_epoch, t.status) for t in trials] == [
        ("t0", 3, "completed"), ("t2", 1, "completed"), ("t1", 1, "stopped early"), ("t3", None, "error")]
    assert trials[0].out == "o/trials/t0"
    by_loss = summarize(grid, SearchConfig(config.base, space=config.space, metric="val_loss"))
    assert [(t.trial_id, t.best) for t in by_loss[:2]] == [("t0", 0.7), ("t2", 0.8)]
    table = format_trials(trials, ["lr", "epochs"], "val_macro_f1").splitlines()
    assert table[0].split() == ["#", "trial", "lr", "epochs", "val_macro_f1", "epoch", "epochs", "status"]
    assert table[1].split()[:2] == ["1", "t0"] and table[-1].split()[:2] == ["-", "t3"]


# --------------------------------------------------------------------------- CLI


def test_a_bad_space_stops_the_cli_before_any_work(tmp_path, capsys):
    from vitray.cli import main

    out = tmp_path / "never"
    code = main(["tune", "--data", str(tmp_path), "--out", str(out), "--lr", "loguniform:1e-2:1e-4"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vitray: error: --lr") and err.count("\n") == 1
    assert not out.exists()


def test_the_job_config_and_flags_make_one_search(tmp_path):
    """jobs/configs/tune-digits.yaml is read as the CLI reads it; flags override it."""
    from vitray.cli import parse
    from vitray.cli.search import tune_config

    path = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "tune-digits.yaml")
    args = parse(["tune", "--config", path, "--samples", "3", "--batch-size", "choice:16,32"])
    config = tune_config(args)
    assert config.space == {"lr": "loguniform:1e-4:3e-3", "epochs": "choice:5,10,15", "batch_size": "choice:16,32"}
    assert (config.samples, config.max_concurrent, config.base.workers, config.scheduler) == (3, 4, 1, "asha")
    assert config.base.out.startswith("s3://") and config.base.gpus_per_worker == 1.0
    config.check()


def test_a_yaml_config_keeps_spaces_as_written_and_types_the_rest(tmp_path):
    from vitray.cli import parse
    from vitray.cli.search import tune_config

    path = tmp_path / "search.yaml"
    path.write_text("data: d\nout: o\nlr: [1e-3, 3e-3]\nepochs: 5\nval_fraction: 2e-1\nsamples: '6'\n"
                    "workers_per_trial: 2\n")
    config = tune_config(parse(["tune", "--config", str(path)]))
    assert config.space == {"lr": ["1e-3", "3e-3"], "epochs": 5}
    assert (config.base.val_fraction, config.samples, config.base.workers) == (0.2, 6, 2)
    assert config.spaces()["lr"] == Space("lr", "choice", (1e-3, 3e-3))


# --------------------------------------------------------------------------- searches


def test_asha_search_on_s3_writes_trials_plot_and_the_best_model(ray_session, tiny, s3_prefix, tmp_path, caplog):
    import logging

    import pyarrow.fs as pafs
    import torch
    from transformers import ViTForImageClassification

    config = SearchConfig(TrainConfig(data=tiny, out=s3_prefix, batch_size=32),
                          space={"lr": "loguniform:3e-4:1e-2", "epochs": "choice:1,2"}, samples=3, max_concurrent=2)
    caplog.set_level(logging.INFO, logger="vitray")
    result = search(config)
    printed = "\n".join(r.getMessage() for r in caplog.records)
    caplog.clear()
    running, most = 0, 0
    for line in printed.splitlines():
        if line.startswith("trial "):
            running += 1 if " started: " in line else -1
            most = max(most, running)
    assert most == 2, printed  # the 3rd trial waited for a slot

    rows = _rows(storage.read_bytes(storage.join(s3_prefix, "trials.csv")).decode())
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3
    assert {"lr", "epochs", "best_val_macro_f1", "epochs_run", "status"} <= set(rows[0])
    for row in rows:
        assert 3e-4 <= float(row["lr"]) <= 1e-2 and row["epochs"] in ("1", "2")
        assert row["status"] in ("completed", "stopped early")
        assert 1 <= int(row["epochs_run"]) <= int(row["epochs"])
    assert rows[0]["rank"] == "1" and rows[0]["trial_id"] == result.best.trial_id
    assert float(rows[0]["best_val_macro_f1"]) == max(float(r["best_val_macro_f1"]) for r in rows)
    assert sum(f"trial {r['trial_id']} " in printed for r in rows) == 3  # a line per trial
    assert storage.read_bytes(storage.join(s3_prefix, "tune.png"))[:4] == b"\x89PNG"
    names = [i.path for i in storage.list_files(s3_prefix)]
    assert any(n.endswith("tune/tuner.pkl") for n in names)  # Tune's experiment is on S3 too

    # The best model loads with plain transformers, and it is the best trial's best checkpoint.
    best = storage.resolve(storage.join(s3_prefix, "best"))
    pafs.copy_files(best.path, str(tmp_path / "best"), source_filesystem=best.fs)
    model = ViTForImageClassification.from_pretrained(tmp_path / "best" / "model")
    assert model.config.id2label[4] == "passed"
    args = json.loads((tmp_path / "best" / "args.json").read_text())
    assert args["lr"] == pytest.approx(result.best.params["lr"]) and args["epochs"] == result.best.params["epochs"]
    metrics = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert metrics["macro_f1"] == pytest.approx(result.best.best)
    checkpoint = storage.join(s3_prefix, "trials", result.best.trial_id, "train",
                              f"epoch-{result.best.best_epoch:04d}", "state.pt")
    state = torch.load(io.BytesIO(storage.read_bytes(checkpoint)), map_location="cpu", weights_only=True)
    assert torch.equal(state["model"]["classifier.weight"], model.classifier.weight)

    # The same command again restores the finished search: no trial runs twice.
    again = search(config)
    printed = "\n".join(r.getMessage() for r in caplog.records)
    assert again.resumed and "resuming" in printed and " started: " not in printed
    assert [t.trial_id for t in again.trials] == [t.trial_id for t in result.trials]
    assert again.best.best == result.best.best
    with pytest.raises(VitrayError, match="holds another search"):
        search(SearchConfig(config.base, space={"lr": "loguniform:3e-4:1e-2", "epochs": "2"}, samples=3))


@pytest.mark.slow
def test_a_search_stopped_by_sigterm_resumes_its_trials_from_their_checkpoints(ray_session, tiny, tmp_path, capsys):
    """SIGTERM (`ray job stop`, a cron's timeout) stops a search as Ctrl-C does, with exit 143 and one line."""
    import torch

    from vitray.cli import main

    out = tmp_path / "interrupted"
    argv = ["tune", "--data", tiny, "--out", str(out), "--lr", "2e-3", "--epochs", "8", "--samples", "1",
            "--scheduler", "fifo", "--batch-size", "32"]
    log = tmp_path / "first.log"  # a file, not a pipe: Ray's chatter would fill a pipe and stall the driver
    with open(log, "w") as sink:
        proc = subprocess.Popen(with_default_signals(VITRAY + argv), stdout=sink, stderr=subprocess.STDOUT)
    try:
        # SIGTERM once Ray Train has registered the first epoch's checkpoint.
        deadline, snapshot = time.time() + 300, None
        while snapshot is None and time.time() < deadline and proc.poll() is None:
            for found in out.glob("trials/*/train/checkpoint_manager_snapshot.json"):
                try:
                    snapshot = found if "epoch-0001" in found.read_text() else None
                except OSError:  # being replaced
                    pass
            time.sleep(0.5)
        assert snapshot is not None, "the trial never checkpointed its first epoch"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert proc.returncode == 143, output[-3000:]
    ours = [line for line in output.splitlines() if line.startswith("vitray:")]
    assert len(ours) == 1 and re.fullmatch(r"vitray: search stopped by SIGTERM( with 1/1 trials unfinished)?; "
                                           r"the same command resumes", ours[0]), output[-3000:]
    assert not (out / "trials.csv").exists()
    run = snapshot.parent
    newest = max(int(p.parent.name.split("-")[1]) for p in run.glob("epoch-*/checkpoint.json"))

    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.err and "best trial" in captured.out
    rows = _rows((out / "trials.csv").read_text())
    assert [(r["trial_id"], r["status"], r["epochs_run"]) for r in rows] == [(snapshot.parts[-3], "completed", "8")]
    # Tune takes a few seconds to stop the trial, an epoch here about one: the run is cut well before epoch 8.
    state = torch.load(snapshot.parent / "epoch-0008" / "state.pt", map_location="cpu", weights_only=True)
    assert state["resumes"] == [newest], "the trial did not resume from its newest checkpoint"
    assert [h["epoch"] for h in state["history"]] == list(range(1, 9))
    assert (out / "tune.png").exists() and (out / "best" / "model" / "model.safetensors").exists()


def test_an_output_that_is_a_file_is_refused_before_ray_starts(tiny, tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    proc = subprocess.run(VITRAY + ["tune", "--data", tiny, "--out", str(out), "--samples", "2"], capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"vitray: error: --out {out} is a file; give a folder or s3:// prefix"]
