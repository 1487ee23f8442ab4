"""The README's path through vitray from the command line, in fresh processes: synth -> train ->
evaluate -> score -> export. Small enough to stay in each command's own process (no Ray), so it
is in the fast lane and in `make test-latest`, where it tries the newest releases of every library."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

VITRAY = [sys.executable, "-m", "vitray.cli"]


def vitray(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(VITRAY + list(args), capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"vitray {args[0]}: {done.stderr[-3000:]}"
    return done


def test_train_evaluate_score_and_export_from_the_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    data, test, run = tmp_path / "data", tmp_path / "test", tmp_path / "run"
    vitray("synth", str(data), "--n", "120", "--size", "32", "--seed", "1", env=env)
    vitray("synth", str(test), "--n", "40", "--size", "32", "--seed", "2", "--passed-fraction", "0.2", env=env)
    vitray("train", "--data", str(data), "--out", str(run), "--epochs", "2", "--batch-size", "16", env=env)
    assert json.loads((run / "metrics.json").read_text())["exported_epoch"] == 2

    vitray("evaluate", "--model", str(run / "model"), "--data", str(test), "--out", str(tmp_path / "eval"), env=env)
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluation["n"] == 40 and 0.0 <= evaluation["accuracy"] <= 1.0

    scores = tmp_path / "scores"
    vitray("score", "--model", str(run / "model"), "--input", str(test), "--output", str(scores),
           "--attention", "all", env=env)
    rows = pq.read_table(scores / "predictions").to_pylist()
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    assert (scores / "report.html").is_file()

    onnx = tmp_path / "model.onnx"
    vitray("export", "--model", str(run / "model"), "--out", str(onnx), "--attention", env=env)
    vitray("score", "--model", str(onnx), "--engine", "onnx", "--input", str(test),
           "--output", str(tmp_path / "scores-onnx"), env=env)
    onnx_rows = {r["id"]: r["label"] for r in pq.read_table(tmp_path / "scores-onnx" / "predictions").to_pylist()}
    torch_rows = {r["id"]: r["label"] for r in rows}
    agree = sum(onnx_rows[k] == v for k, v in torch_rows.items()) / len(torch_rows)
    assert agree >= 0.95
