"""MLflow tracking against a real tracking server (SQLite backend, local artifacts) on loopback."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from s3server import LOOPBACK, free_ports
from vitray import tracking
from vitray.train import TrainConfig, train

pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    (port,) = free_ports(1)
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([mlflow, "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", (root / "artifacts").as_uri()],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the MLflow server did not answer"
            time.sleep(0.2)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_a_training_run_logs_params_epochs_metrics_and_outputs(ray_session, mlflow_server, tmp_path):
    from vitray.data import synth

    data = tmp_path / "data"
    synth.write(str(data), n=40, size=16, seed=4, passed_fraction=0.2, fmt="imagefolder")
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(out), epochs=2, batch_size=4, mlflow=mlflow_server,
                      mlflow_experiment="tracked-training"))
    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name("tracked-training")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == f"train {out}"
    assert run.data.params["epochs"] == "2" and run.data.params["lr"] == "0.001"
    history = client.get_metric_history(run.info.run_id, "val_macro_f1")
    assert sorted(m.step for m in history) == [1, 2]  # one point per epoch, from rank 0
    saved = json.loads((out / "metrics.json").read_text())
    assert run.data.metrics["macro_f1"] == pytest.approx(saved["macro_f1"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "history.csv", "curves.png", "confusion_matrix.png", "model"} <= names
    model_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= model_files


def test_a_search_run_is_the_parent_of_its_trials(mlflow_server):
    search = tracking.start(tracking.resolve(mlflow_server, "tracked-search"), name="search x",
                            params={"samples": 2})
    trials = [tracking.start(search, name=f"trial {i}", params={"lr": 10.0 ** -i}, parent=search) for i in (3, 4)]
    for step, trial in enumerate(trials, 1):
        tracking.log_metrics(trial, {"val_macro_f1": 0.5 + step / 10, "labels": ["ignored"]}, step=step)
        tracking.end(trial)
    tracking.end(search)
    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name("tracked-search")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"search x", "trial 3", "trial 4"}
    parent = runs["search x"].info.run_id
    assert all(runs[f"trial {i}"].data.tags["mlflow.parentRunId"] == parent for i in (3, 4))
    assert runs["trial 4"].data.metrics["val_macro_f1"] == pytest.approx(0.7)


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_a_local_store_works_without_a_server(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts under ./mlruns
    if store == "file":  # MLflow 3 keeps its file store only for those who ask for it
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri() if store == "file" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tracking.start(tracking.resolve(uri), name="local", params={"a": 1})
    tracking.log_metrics(run, {"accuracy": 0.9}, step=1)
    (tmp_path / "note.txt").write_text("hello")
    tracking.log_outputs(run, [str(tmp_path / "note.txt"), str(tmp_path / "missing.txt")])
    tracking.end(run)
    stored = _client(uri).get_run(run.run_id)
    assert stored.data.metrics["accuracy"] == 0.9 and stored.info.status == "FINISHED"
    assert [a.path for a in _client(uri).list_artifacts(run.run_id)] == ["note.txt"]


def test_an_unreachable_server_is_one_warning_and_no_failure(caplog):
    (port,) = free_ports(1)
    uri = f"http://{LOOPBACK}:{port}"
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="vitray.tracking"):
        run = tracking.start(tracking.resolve(uri), name="nowhere", params={"a": 1})
        tracking.log_metrics(run, {"accuracy": 1.0})
        tracking.end(run)
    assert run is None and time.monotonic() - started < 30
    lines = [r.getMessage() for r in caplog.records if r.name == "vitray.tracking"]
    assert len(lines) == 1 and f"cannot track at {uri}" in lines[0] and "untracked" in lines[0]


def test_tracking_is_off_without_a_uri_and_imports_nothing(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve(None) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///somewhere")
    assert tracking.resolve(None, "exp") == tracking.Tracking("file:///somewhere", "exp")
    code = "import sys, vitray.tracking, vitray.train; print('mlflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
