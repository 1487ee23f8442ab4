"""What a person at a terminal sees: vitray's own lines, progress and a summary, none of the libraries' noise."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

NOISE = re.compile(r"core_worker\.cc|raylet|Warning|Traceback|\(pid=|\bWARN\b|\bINFO\b|\bE \d+ \d+\]")


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitray.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_train_and_score_show_progress_and_a_summary_and_no_noise(ray_session, tmp_path):
    # An embedded Ray, as `make demo` has, for the training; progress lines every half second.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "VITRAY_PROGRESS_INTERVAL": "0.5"}
    data, out = tmp_path / "data", tmp_path / "run"
    assert run(["synth", str(data), "--n", "800", "--size", "32", "--seed", "1"], env).returncode == 0

    # A data set this small trains in the command's own process unless told otherwise: as quiet.
    here = run(["train", "--data", str(data), "--out", str(tmp_path / "here"), "--epochs", "1"], env)
    assert here.returncode == 0, here.stderr[-3000:]
    assert not NOISE.search(here.stdout + here.stderr), here.stderr[-3000:]
    assert "in this process" in here.stderr and re.search(r"^epoch 1/1: loss", here.stderr, re.M), here.stderr

    train = run(["train", "--data", str(data), "--out", str(out), "--epochs", "2", "--workers", "2",
                 "--batch-size", "8", "--in-process-max", "0"], env)
    assert train.returncode == 0, train.stderr[-3000:]
    text = train.stdout + train.stderr
    assert not NOISE.search(text), NOISE.search(text).group(0) + "\n" + text[-3000:]
    assert re.search(r"^epoch 1/2: .*batch", train.stderr, re.M), train.stderr  # within an epoch
    assert re.search(r"^epoch 2/2: loss [\d.]+, val_loss [\d.]+, acc .*img/s", train.stderr, re.M), train.stderr
    assert f"model             {out}/model" in train.stdout and "next: vitray evaluate --model" in train.stdout

    # Scoring joins a running Ray (RAY_ADDRESS), as on a cluster.
    joined = {**env, "RAY_ADDRESS": ray_session}
    scores = tmp_path / "scores"
    score = run(["score", "--model", str(out / "model"), "--input", str(data), "--output", str(scores),
                 "--attention", "all"], joined)
    assert score.returncode == 0, score.stderr[-3000:]
    text = score.stdout + score.stderr
    assert not NOISE.search(text), NOISE.search(text).group(0) + "\n" + text[-3000:]
    assert re.search(r"^scoring: [\d,]+/800 img", score.stderr, re.M), score.stderr
    assert "scored 800 images" in score.stdout and f"report       {scores}/report.html" in score.stdout

    # Again, with --verbose: nothing left to score, and Ray's own logs are shown.
    again = run(["score", "--model", str(out / "model"), "--input", str(data), "--output", str(scores), "--verbose"],
                joined)
    assert again.returncode == 0 and "scored 0 images (800 already done" in again.stdout, again.stderr[-3000:]
    assert re.search(r"Connected to Ray cluster|ray\.data|\(MapWorker|streaming_executor|core_worker", again.stderr), \
        "--verbose shows Ray's own logs:\n" + again.stderr[-2000:]
