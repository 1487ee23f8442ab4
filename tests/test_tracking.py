"""MLflow tracking against a real tracking server on loopback (SQLite backend, artifacts through the server)."""
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
from vitray import storage, tracking
from vitray.train import TrainConfig, train
from vitray.train.loop import track_epoch

pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """`mlflow server` as the docs start it: artifacts uploaded through the server (--artifacts-destination)."""
    root = tmp_path_factory.mktemp("mlflow")
    (port,) = free_ports(1)
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([mlflow, "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            # No job runner: it is eight more processes, for features vitray does not use.
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
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
        os.killpg(proc.pid, signal.SIGTERM)  # the group of the server we started: it and its uvicorn worker
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str) -> dict:
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([found.experiment_id])}


def _closed_port_uri() -> str:
    (port,) = free_ports(1)  # free: nothing listens there
    return f"http://{LOOPBACK}:{port}"


@pytest.mark.slow  # a whole Ray Train run; test_rank_0_* below test the worker's side without Ray
def test_a_training_run_logs_params_epochs_metrics_and_outputs(ray_session, mlflow_server, tmp_path):
    from vitray.data import synth

    data = tmp_path / "data"
    synth.write(str(data), n=40, size=16, seed=4, passed_fraction=0.2, fmt="imagefolder")
    out = tmp_path / "run"
    # A resumed training going on in its run: test_a_resumed_training_goes_on_in_its_run below, and
    # tests/test_train.py's killed driver (a tracked run resumed by the same command).
    train(TrainConfig(data=str(data), out=str(out), epochs=2, batch_size=4, mlflow=mlflow_server,
                      mlflow_experiment="tracked-training"))
    client = _client(mlflow_server)
    (run,) = _runs(mlflow_server, "tracked-training").values()
    assert run.info.status == "FINISHED" and run.info.run_name == f"train {out}"
    assert run.data.params["epochs"] == "2" and run.data.params["lr"] == "0.001"
    history = client.get_metric_history(run.info.run_id, "val_macro_f1")
    assert sorted(m.step for m in history) == [1, 2]  # one point per epoch, from rank 0 inside the worker
    saved = json.loads((out / "metrics.json").read_text())
    assert run.data.metrics["macro_f1"] == pytest.approx(saved["macro_f1"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "history.csv", "curves.png", "confusion_matrix.png", "model"} <= names
    model_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= model_files


def test_rank_0_logs_each_epoch_at_its_step(mlflow_server):
    run = tracking.start(tracking.resolve(mlflow_server, "rank-0"), name="epochs")
    sent: list[dict] = []
    cfg = {"tracking": run, "progress": _Queue(sent)}
    for epoch in (1, 2):
        track_epoch(cfg, {"epoch": epoch, "train_loss": 1.0 / epoch, "val_macro_f1": 0.4 * epoch},
                    {"passed": 0.5, "bad+part": 0.25 * epoch})
    tracking.end(run)
    client = _client(mlflow_server)
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "val_macro_f1")] == [(1, 0.4), (2, 0.8)]
    # A class name that MLflow refuses as a metric name is made into one rather than losing the epoch.
    assert [m.value for m in client.get_metric_history(run.run_id, "val_recall_bad_part")] == [0.25, 0.5]
    assert sent == []


def test_rank_0_hands_a_tracking_failure_to_the_driver_once(caplog):
    dead = tracking.Tracking(_closed_port_uri(), run_id="0123456789abcdef")  # as the driver passed it down
    sent: list[dict] = []
    cfg = {"tracking": dead, "progress": _Queue(sent)}
    with caplog.at_level("WARNING", logger="vitray.tracking"):
        for epoch in (1, 2, 3):
            track_epoch(cfg, {"epoch": epoch, "val_macro_f1": 0.5}, {"passed": 1.0})
    assert len(sent) == 1 and sent[0]["kind"] == "log" and sent[0]["level"] == "warning"
    assert f"cannot track at {dead.uri}" in sent[0]["line"] and "Connection refused" in sent[0]["line"]
    assert not [r for r in caplog.records if r.name == "vitray.tracking"]  # on the channel, not the worker's log


class _Queue:
    """The driver's channel as rank 0 sees it (vitray.progress.send calls put_nowait)."""

    def __init__(self, sent: list[dict]) -> None:
        self.sent = sent

    def put_nowait(self, message: dict) -> None:
        self.sent.append(message)


def test_a_search_run_is_the_parent_of_its_trials(mlflow_server):
    search = tracking.start(tracking.resolve(mlflow_server, "tracked-search"), name="search x",
                            params={"samples": 2, "space": {"lr": "loguniform:1e-4:1e-2"}})
    trials = [tracking.start(search, name=f"trial {i}", params={"lr": 10.0 ** -i}, parent=search) for i in (3, 4)]
    assert all(t.parent_run_id == search.run_id for t in trials)
    for step, trial in enumerate(trials, 1):
        tracking.log_metrics(trial, {"val_macro_f1": 0.5 + step / 10, "labels": ["ignored"]}, step=step)
        tracking.end(trial)
    tracking.end(search)
    runs = _runs(mlflow_server, "tracked-search")
    assert set(runs) == {"search x", "trial 3", "trial 4"}
    parent = runs["search x"]
    assert parent.data.params["space.lr"] == "loguniform:1e-4:1e-2"  # nested params flattened
    assert all(runs[f"trial {i}"].data.tags["mlflow.parentRunId"] == parent.info.run_id for i in (3, 4))
    assert runs["trial 4"].data.metrics["val_macro_f1"] == pytest.approx(0.7)
    assert "labels" not in runs["trial 4"].data.metrics


def test_a_resumed_training_goes_on_in_its_run(mlflow_server):
    where = tracking.resolve(mlflow_server, "tracked-resume")
    first = tracking.start(where, name="train out", params={"epochs": 2, "lr": 0.001}, resume=True)
    tracking.log_metrics(first, {"val_macro_f1": 0.3}, step=1)
    tracking.end(first, "KILLED")
    again = tracking.start(where, name="train out", params={"epochs": 4, "lr": 0.001, "seed": 1}, resume=True)
    assert again.run_id == first.run_id
    tracking.log_metrics(again, {"val_macro_f1": 0.6}, step=2)
    tracking.end(again)
    other = tracking.start(where, name="train out", params={"epochs": 2})  # not resuming: a run of its own
    tracking.end(other)
    assert other.run_id != first.run_id
    client = _client(mlflow_server)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first.run_id, "val_macro_f1")] == [1, 2]
    assert run.data.params == {"epochs": "2", "lr": "0.001", "seed": "1"}  # MLflow keeps a param's first value
    assert run.data.tags[tracking.CHANGED_TAG] == "epochs=4"


def test_params_are_cut_to_mlflows_limits(mlflow_server):
    import numpy as np

    run = tracking.start(tracking.resolve(mlflow_server, "tracked-limits"), name="limits",
                         params={"labels": "x" * 7000, "bad key?": 1, "none": None},
                         tags={"vitray.command": "train"})
    tracking.log_metrics(run, {"accuracy": np.float32(0.5), "count": np.int64(3), "nan": float("nan"),
                               "flag": True, "per_class": {"passed": {"recall": 0.25}}}, step=1)
    tracking.set_tags(run, {"note": "ok"})
    tracking.log_params(run, {"image_size": 16, "none": "again"})  # known after the start
    tracking.end(run)
    stored = _client(mlflow_server).get_run(run.run_id)
    assert len(stored.data.params["labels"]) == tracking.MAX_PARAM_CHARS
    assert stored.data.params["bad key_"] == "1" and stored.data.params["image_size"] == "16"
    assert stored.data.params["none"] == "None" and stored.data.tags[tracking.CHANGED_TAG] == "none=again"
    assert stored.data.metrics == {"accuracy": 0.5, "count": 3.0, "per_class.passed.recall": 0.25}
    assert stored.data.tags["vitray.command"] == "train" and stored.data.tags["note"] == "ok"
    assert stored.data.tags["mlflow.source.type"] == "LOCAL"  # MLflow's own context tags, as start_run sets them


def test_files_and_folders_become_artifacts(mlflow_server, tmp_path):
    (tmp_path / "model" / "sub").mkdir(parents=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "sub" / "weights.bin").write_bytes(b"\0" * 10)
    (tmp_path / "history.csv").write_text("epoch\n1\n")
    run = tracking.start(tracking.resolve(mlflow_server, "tracked-files"), name="files")
    tracking.log_outputs(run, [str(tmp_path / "history.csv"), str(tmp_path / "missing.png")])
    tracking.log_folder(run, (tmp_path / "model").as_uri(), "model")
    tracking.log_folder(run, str(tmp_path / "no-such-folder"), "other")
    tracking.end(run)
    assert not run.off
    client = _client(mlflow_server)
    assert sorted(a.path for a in client.list_artifacts(run.run_id)) == ["history.csv", "model"]
    assert sorted(a.path for a in client.list_artifacts(run.run_id, "model")) == ["model/config.json", "model/sub"]
    assert Path(client.download_artifacts(run.run_id, "model/sub/weights.bin", str(tmp_path / "back"))).read_bytes() \
        == b"\0" * 10


@pytest.mark.s3
def test_outputs_on_s3_become_artifacts(mlflow_server, s3_prefix, tmp_path):
    storage.write_bytes(storage.join(s3_prefix, "metrics.json"), b'{"accuracy": 1.0}')
    storage.write_bytes(storage.join(s3_prefix, "model", "config.json"), b"{}")
    storage.write_bytes(storage.join(s3_prefix, "model", "model.safetensors"), b"weights")
    run = tracking.start(tracking.resolve(mlflow_server, "tracked-s3"), name="s3")
    tracking.log_outputs(run, [storage.join(s3_prefix, "metrics.json"), storage.join(s3_prefix, "curves.png")])
    tracking.log_folder(run, storage.join(s3_prefix, "model"), "model")
    tracking.end(run)
    client = _client(mlflow_server)
    assert sorted(a.path for a in client.list_artifacts(run.run_id, "model")) == ["model/config.json",
                                                                                  "model/model.safetensors"]
    back = client.download_artifacts(run.run_id, "metrics.json", str(tmp_path))
    assert json.loads(Path(back).read_text()) == {"accuracy": 1.0}


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
    assert stored.info.experiment_id == _client(uri).get_experiment_by_name("vitray").experiment_id
    assert [a.path for a in _client(uri).list_artifacts(run.run_id)] == ["note.txt"]


def test_an_unreachable_server_is_one_warning_and_no_failure(caplog):
    uri = _closed_port_uri()
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="vitray.tracking"):
        run = tracking.start(tracking.resolve(uri), name="nowhere", params={"a": 1})
        tracking.log_metrics(run, {"accuracy": 1.0})
        tracking.end(run)
        # A server that goes away after the run was opened: its first call warns, the rest are skipped.
        gone = tracking.Tracking(uri.replace("http://", "http://me:s3cret@"), run_id="0123456789abcdef")
        for step in (1, 2):
            tracking.log_metrics(gone, {"accuracy": 1.0}, step=step)
        tracking.log_outputs(gone, [__file__])
        tracking.end(gone, "FAILED")
    assert run is None and gone.off and time.monotonic() - started < 10
    lines = [r.getMessage() for r in caplog.records if r.name == "vitray.tracking"]
    assert len(lines) == 2, lines  # one per run
    assert lines[0] == f"mlflow: cannot track at {uri} ([Errno 111] Connection refused); the run goes on untracked"
    assert "s3cret" not in lines[1] and "http://***@" in lines[1]


def test_the_command_line_shows_one_line_for_an_unreachable_server():
    code = ("from vitray.cli.logs import setup_logging; from vitray import tracking; setup_logging(False); "
            f"run = tracking.start(tracking.resolve({_closed_port_uri()!r}), 'x', params={{'a': 1}}); "
            "tracking.end(run); print(run)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "None\n", done.stderr[-2000:]
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("vitray: warning: mlflow: ")


def test_tracking_is_off_without_a_uri_and_imports_nothing(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert tracking.resolve(None) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///somewhere")
    assert tracking.resolve(None) == tracking.Tracking("file:///somewhere", "vitray")
    assert tracking.resolve(None, "exp") == tracking.Tracking("file:///somewhere", "exp")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "nightly")
    assert tracking.resolve("http://h:5000") == tracking.Tracking("http://h:5000", "nightly")
    code = "import sys, vitray.tracking, vitray.train.run, vitray.train.loop; print('mlflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
