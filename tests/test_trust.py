"""Runs that would silently go wrong, addresses that cannot be reached, paths that are the same place under
another name, values never checked, and messages that pointed the wrong way: each refused or said in one line."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import as_a_fresh_process_without_ray, synth_folder
from test_score import noise_pngs
from vitray.cli import main
from vitray.errors import VitrayError
from vitray.lease import LEASE_NAME, Lease

VITRAY = [sys.executable, "-m", "vitray.cli"]


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> str:
    return synth_folder(tmp_path_factory, "few", n=40, size=16, seed=4, passed_fraction=0.2)


@pytest.fixture
def without_ray(monkeypatch):
    as_a_fresh_process_without_ray(monkeypatch)


def _one_line(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("vitray")]


# --------------------------------------------------------------------------- training outputs


def test_a_training_that_could_take_no_step_is_refused_before_it_trains(without_ray, few, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", few, "--out", str(out), "--epochs", "2", "--batch-size", "64"])
    (line,) = _one_line(capsys)
    assert code == 2 and "fewer than --batch-size 64: no step could be taken" in line, line
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


def test_a_second_training_on_the_same_output_is_refused(without_ray, few, tmp_path, capsys):
    out = tmp_path / "run"
    held = Lease(str(out), run_id="the-first").acquire()  # another run holds the output
    try:
        code = main(["train", "--data", few, "--out", str(out), "--epochs", "1", "--batch-size", "4"])
    finally:
        held.release()
    (line,) = _one_line(capsys)
    assert code == 2 and "is in use by run the-first" in line, line
    assert not (out / "train").exists() and not (out / "model").exists()
    for command in (["pretrain", "--data", few], ["tune", "--data", few, "--samples", "1"]):
        held = Lease(str(out), run_id="the-first").acquire()
        try:
            assert main([*command, "--out", str(out), "--epochs", "1"]) == 2
        finally:
            held.release()
        assert "is in use by run the-first" in _one_line(capsys)[0]


def test_a_resume_refuses_options_that_change_the_run_and_takes_the_rest(without_ray, few, tmp_path, capsys):
    from vitray.train import train
    from vitray.train.config import TrainConfig

    out = tmp_path / "run"
    base = dict(data=few, out=str(out), epochs=2, batch_size=4, seed=1)
    train(TrainConfig(**base))
    first = json.loads((out / "metrics.json").read_text())
    recorded = json.loads((out / "train" / "options.json").read_text())
    assert recorded["epochs"] == 2 and recorded["batch_size"] == 4

    from vitray.data import synth

    synth.write(str(tmp_path / "other"), n=40, size=16, seed=9, passed_fraction=0.2, fmt="imagefolder")
    changes = {"epochs": 3, "lr": 5e-4, "batch_size": 8, "model": "vit-small", "seed": 2, "weight_decay": 0.1,
               "data": str(tmp_path / "other"), "class_weights": "loss"}
    for name, value in changes.items():
        with pytest.raises(VitrayError) as refused:
            train(TrainConfig(**{**base, name: value}))
        flag = "--" + name.replace("_", "-")
        assert f"holds a run begun with {flag} " in str(refused.value) and "--fresh" in str(refused.value)
        assert refused.value.exit_code == 2
    assert json.loads((out / "metrics.json").read_text()) == first  # nothing was touched

    # Where and how the run goes, and which epoch is exported, may change: this resume redoes nothing.
    again = train(TrainConfig(**base, export="best", in_process_max=5000, mlflow_experiment="elsewhere"))
    assert again.exported_epoch == again.best_epoch and [r["epoch"] for r in again.history] == [1, 2]

    # --fresh starts the output afresh with the new options.
    fresh = train(TrainConfig(**{**base, "epochs": 3}, fresh=True))
    assert fresh.exported_epoch == 3 and not fresh.metrics.get("resumed_after_epochs")
    assert json.loads((out / "train" / "options.json").read_text())["epochs"] == 3


# --------------------------------------------------------------------------- addresses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_no_ray_listens_fails_in_bounded_time(tiny_model, tmp_path):
    noise_pngs(tmp_path / "in", ["a.png", "b.png"])
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "RAY_ADDRESS": address, "VITRAY_CONNECT_TIMEOUT_S": "3"}
    start = time.monotonic()
    done = subprocess.run(VITRAY + ["score", "--model", tiny_model, "--input", str(tmp_path / "in"),
                                    "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env=env)
    took = time.monotonic() - start
    lines = [line for line in done.stderr.splitlines() if line.startswith("vitray")]
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert f"cannot reach a Ray cluster at {address}" in lines[0] and "ray status" in lines[0]
    assert took < 60


@pytest.mark.parametrize("address", ["notanaddress", "127.0.0.1:99999", "http://127.0.0.1:8265"])
@pytest.mark.parametrize("command", ["score", "train"])
def test_a_malformed_address_is_a_usage_error_before_anything_is_written(address, command, tiny_model, few,
                                                                         tmp_path, capsys):
    noise_pngs(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    args = {"score": ["score", "--model", tiny_model, "--input", str(tmp_path / "in"), "--output", str(out)],
            "train": ["train", "--data", few, "--out", str(out)]}[command]
    assert main([*args, "--ray-address", address]) == 2
    (line,) = _one_line(capsys)
    assert f"--ray-address {address!r}" in line
    assert not out.exists()


def test_a_malformed_ray_address_variable_is_named(tiny_model, tmp_path, capsys, monkeypatch):
    noise_pngs(tmp_path / "in", ["a.png"])
    monkeypatch.setenv("RAY_ADDRESS", "head-without-port")
    assert main(["score", "--model", tiny_model, "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "$RAY_ADDRESS 'head-without-port' is not a Ray address" in _one_line(capsys)[0]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the same place under another name


def test_an_output_linked_into_its_input_is_refused(tiny_model, tmp_path, capsys):
    noise_pngs(tmp_path / "in", ["a.png"])
    (tmp_path / "in" / "results").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "in" / "results")
    for output in (tmp_path / "linked", tmp_path / "linked" / "tonight"):
        assert main(["score", "--model", tiny_model, "--input", str(tmp_path / "in"), "--output", str(output)]) == 2
        assert "is inside --input" in _one_line(capsys)[0]
    assert list((tmp_path / "in" / "results").iterdir()) == []


def test_a_training_output_inside_its_data_is_refused(few, tmp_path, capsys):
    (tmp_path / "data").symlink_to(Path(few).resolve())
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(Path(few) / "run")]) == 2
    assert "is inside the data" in _one_line(capsys)[0]
    assert not (Path(few) / "run").exists()


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize("yaml,needle", [
    ("weight_decay: abc\n", "weight_decay must be a number, got 'abc'"),
    ("label_smoothing: [0.1]\n", "label_smoothing must be a number"),
    ("max_failures: 1.5\n", "max_failures must be a whole number"),
    ("verbose: maybe\n", "verbose must be true or false, got 'maybe'"),
    ("shared_fs: 3\n", "shared_fs must be true or false"),
    ("weight_decay: -1\n", "weight_decay and max_failures cannot be negative"),
])
def test_every_config_key_is_typed_and_checked_before_any_work(yaml, needle, few, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {few}\nout: {tmp_path / 'out'}\n{yaml}")
    assert main(["train", "--config", str(config)]) == 2
    (line,) = _one_line(capsys)
    assert needle in line, line
    assert not (tmp_path / "out").exists()


def test_config_switches_read_as_yaml_and_words_say(few, tmp_path):
    from vitray.cli.main import parse

    for text, expected in (("no", False), ("'no'", False), ("'yes'", True), ("true", True), ("off", False)):
        config = tmp_path / "c.yaml"
        config.write_text(f"data: {few}\nout: {tmp_path / 'out'}\nverbose: {text}\nweight_decay: 1e-4\n")
        args = parse(["train", "--config", str(config)])
        assert args.verbose is expected, text
        assert args.weight_decay == pytest.approx(1e-4)  # YAML reads 1e-4 as a string: a number here


# --------------------------------------------------------------------------- messages


def test_a_file_gone_between_listing_and_reading_says_so(tmp_path):
    from vitray import storage
    from vitray.data.readers import read_file

    (tmp_path / "there.png").write_bytes(b"x")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    reader = storage.file_reader(str(tmp_path))
    reasons = {}
    for name in ("gone.png", "dangling.png"):
        reasons[name] = read_file(reader, str(tmp_path / name))[1]
    assert read_file(reader, str(tmp_path / "there.png")) == (b"x", None)
    assert reasons["gone.png"] == "the file is gone (deleted or moved after the input was listed)"
    assert "a broken link" in reasons["dangling.png"]


def test_a_huge_image_is_refused_with_vitrays_own_limit(monkeypatch):
    import io

    from PIL import Image

    from vitray.data import decode

    buf = io.BytesIO()
    Image.new("RGBA", (40, 40)).save(buf, format="PNG")  # not the fast path: PIL opens it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses it while opening, in its own words
    with pytest.raises(decode.ImageError) as err:
        decode.decode_image(buf.getvalue())
    assert err.value.kind == "too-large"
    assert str(err.value) == f"1,600 pixels is over the limit of {decode.MAX_IMAGE_PIXELS:,} (a decompression bomb?)"


def test_the_lease_of_a_run_whose_process_has_ended_on_this_host_is_taken_at_once(tmp_path):
    out = str(tmp_path / "out")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid, taken in ((alive.pid, False), (ended.pid, True)):
            record = {"run_id": f"pid-{pid}", "host": socket.gethostname(), "pid": pid, "heartbeat": time.time(),
                      "stale_after_s": 60.0}
            os.makedirs(out, exist_ok=True)
            Path(out, LEASE_NAME).write_text(json.dumps(record))
            lease = Lease(out, run_id="next")
            if taken:
                lease.acquire()
                assert lease.took_over["holder_gone"] is True and lease.took_over["run_id"] == f"pid-{pid}"
                lease.release()
            else:
                with pytest.raises(VitrayError, match="is in use by run"):
                    lease.acquire()
        # On another host, the heartbeat alone decides.
        Path(out, LEASE_NAME).write_text(json.dumps({**record, "host": "another-host"}))
        with pytest.raises(VitrayError, match="is in use by run"):
            Lease(out, run_id="next").acquire()
    finally:
        alive.kill()
        alive.wait()
