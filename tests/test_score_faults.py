"""Scoring under hostile-but-legal input, overlapping runs, faults and interruptions: each image once, one line."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from procs import ray_workers, with_default_signals
from test_score import noise_pngs, predictions_table
from vitray.cli import main
from vitray.score import ScoreConfig, attention_key, read_errors, recover, score


def run_cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(with_default_signals([sys.executable, "-m", "vitray.cli", *args]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def errors_of(stderr: str) -> list[str]:
    """vitray's closing lines (its warnings, such as a lease taken over, are not counted)."""
    return [line for line in stderr.splitlines()
            if line.startswith(("vitray: error:", "vitray: interrupted", "vitray: stopped by"))]


def test_overlay_keys_are_one_per_id_and_always_legal_names():
    rng = random.Random(7)
    alphabet = "ab#_row1./\\ é日\t" + "".join(chr(c) for c in range(0x20, 0x7F))
    ids = {"x#1.png", "x_row1.png", "x_row1.png#1", "a/b.png", "a_b.png", "a\\b.png", ".", "..", "", "é" * 300}
    while len(ids) < 20_000:
        ids.add("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))))
    keys = {attention_key(i) for i in ids}
    assert len(keys) == len(ids)
    for key in keys:
        assert key.startswith("attention/") and key.endswith(".png") and len(key.encode()) < 1024
        segments = key.split("/")[1:]
        assert all(0 < len(s.encode()) <= 100 and s not in (".", "..") for s in segments), key


def test_two_runs_started_together_on_one_output_score_each_image_once(ray_session, tiny_model, tmp_path):
    data, out = tmp_path / "night", str(tmp_path / "out")
    names = [f"{i:03d}.png" for i in range(120)]
    noise_pngs(data, names)
    args = ["score", "--model", tiny_model, "--input", str(data), "--output", out, "--piece-rows", "10"]

    runs = [run_cli(*args), run_cli(*args)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]

    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert len(errors_of(refused)) == 1 and "in use by run" in refused and "Traceback" not in refused
    ids = predictions_table(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(names)


def test_a_link_loop_and_odd_names_are_scored_once_or_recorded(ray_session, tiny_model, tmp_path):
    data, out = tmp_path / "night", str(tmp_path / "out")
    long_name = "p" * 251 + ".png"  # 255 bytes: the longest legal name
    names = ["cam/a.png", "x#1.png", "x_row1.png", long_name, "prüf teil.png"]
    noise_pngs(data, names)
    (data / "cam" / "up").symlink_to("..")  # a loop: cam/up/cam/up/...
    (data / "elsewhere").symlink_to(tmp_path / "other")  # a folder outside the input: followed once
    noise_pngs(tmp_path / "other", ["o.png"])
    (tmp_path / "other" / "back").symlink_to(data)
    (data / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(data / "pipe.png")  # never opened: reading it would block the night
    bad = os.fsencode(str(data)) + b"/caf\xe9.png"
    with open(bad, "wb") as f:
        f.write((data / "x#1.png").read_bytes())

    manifest = score(ScoreConfig(model=tiny_model, input=str(data), output=out, attention="all", piece_rows=2))

    expected = sorted(names + ["elsewhere/o.png"])
    rows = predictions_table(out).to_pylist()
    assert sorted(r["id"] for r in rows) == expected
    overlays = [r["attention_png"] for r in rows]
    assert len(set(overlays)) == len(rows) and all(os.path.isfile(os.path.join(out, k)) for k in overlays)
    errors = {r["path"]: r["error"] for r in read_errors(out).to_table().to_pylist()}
    assert errors == {str(data / "dangling.png"): "unreadable", str(data) + "/caf\\xe9.png": "bad-name"}
    assert manifest["counts"]["errors"] == 2 and manifest["error_kinds"]["bad-name"] == 1

    again = score(ScoreConfig(model=tiny_model, input=str(data), output=out, attention="all"))
    assert again["counts"]["scored"] == 0 and again["counts"]["skipped"] == len(expected)


def test_recovery_is_never_blocked_by_one_entry_it_cannot_clean(ray_session, tiny_model, tmp_path):
    data, out = tmp_path / "night", tmp_path / "out"
    noise_pngs(data, ["a.png", "b.png"])
    (out / "_pending").mkdir(parents=True)
    (out / "_pending" / "old-1.json").write_text(json.dumps({"pngs": ["attention/" + "q" * 300 + ".png"]}))
    (out / "_pending" / "old-2.json").write_text("{not json")

    manifest = score(ScoreConfig(model=tiny_model, input=str(data), output=str(out)))

    assert manifest["counts"]["scored"] == 2
    assert manifest["recovered"]["pending_undone"] == 1 and manifest["recovered"]["unrecoverable"] == 1
    assert recover(str(out))["unrecoverable"] == 1  # the damaged marker stays, reported, harmless


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_and_the_rerun_finishes_exactly_once(ray_session, tiny_model, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "96k"):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        data, out = tmp_path / "night", str(disk / "out")
        names = [f"{i:03d}.png" for i in range(80)]
        noise_pngs(data, names)
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
        args = ["score", "--model", tiny_model, "--input", str(data), "--output", out, "--attention", "all",
                "--piece-rows", "8", "--batch-size", "8"]

        full = run_cli(*args, env=env)
        code, stderr = full.wait(timeout=300), full.stderr.read()

        assert code == 1, stderr
        lines = errors_of(stderr)
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        assert "no space left on the device of" in lines[0] and "rerun the same command" in lines[0]
        log = lines[0].rsplit("traceback in ", 1)[1]
        assert "Traceback" in Path(log).read_text()  # under OUT/logs, or the cache folder when OUT is full
        kept = predictions_table(out).column("id").to_pylist()
        assert len(kept) == len(set(kept)) < len(names)

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        again = run_cli(*args, env=env)
        assert again.wait(timeout=300) == 0, again.stderr.read()
        ids = predictions_table(out).column("id").to_pylist()
        assert sorted(ids) == names
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("sig,code,words", [(signal.SIGINT, 130, "interrupted"),
                                            (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_stop_signal_ends_scoring_with_its_code_and_the_rerun_finishes(ray_session, tiny_model, tmp_path, sig,
                                                                         code, words):
    """Ctrl-C, and SIGTERM (`ray job stop`, Kubernetes, a cron's timeout), stop a run on Ray in one line."""
    data, out = tmp_path / "night", tmp_path / "out"
    names = [f"{i:04d}.png" for i in range(400)]
    noise_pngs(data, names)
    args = ["score", "--model", tiny_model, "--input", str(data), "--output", str(out), "--attention", "all",
            "--piece-rows", "4", "--batch-size", "4"]

    # 400 images take a few seconds, and the driver's count lags the commits: a Ctrl-C could land
    # after the last piece. So once a piece is committed, every Ray process of the run (the model's
    # actor, the tasks that commit pieces) is frozen (SIGSTOP), and Ctrl-C comes while the run is
    # mid-way, whatever the machine's speed. A piece frozen half-written is the rerun's to recover.
    proc = run_cli(*args, env={**os.environ, "VITRAY_PROGRESS_INTERVAL": "0.5"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    frozen: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not list((out / "predictions").glob("part-*.parquet")):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "no piece committed in time"
            time.sleep(0.02)
        # The model's actors, the tasks that write pieces, and idle workers that could take one.
        frozen = ray_workers("ray::IDLE", "ray::MapWorker(MapBatches(Predictor)", "ray::MapBatches(write_piece")
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)  # the session's Ray, which this test process started
        assert frozen, "no scoring process found"
        committed = len(list((out / "predictions").glob("part-*.parquet")))
        time.sleep(1.0)  # the driver's loop takes in what was delivered before the freeze
        proc.send_signal(sig)
        exit_code = proc.wait(timeout=60)
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert committed < len(names) // 4, "the run was not mid-way when it was frozen"

    assert exit_code == code, stderr
    lines = errors_of(stderr)
    assert len(lines) == 1 and lines[0].startswith(f"vitray: {words};") and "same command" in lines[0], stderr
    assert "Traceback" not in stderr and not (out / "_lease.json").exists()
    manifests = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert [m["status"] for m in manifests] == ["interrupted"]
    assert manifests[0]["counts"]["scored"] < len(names)

    rerun = run_cli(*args)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    ids = predictions_table(str(out)).column("id").to_pylist()
    assert sorted(ids) == names


@pytest.mark.s3
def test_an_output_bucket_that_does_not_exist_is_refused_before_any_work(tiny_model, tmp_path, capsys, s3):
    noise_pngs(tmp_path / "in", ["a.png"])
    code = main(["score", "--model", tiny_model, "--input", str(tmp_path / "in"), "--output", "s3://no-such-bucket/x"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vitray")]
    assert code == 2 and len(err) == 1 and "bucket 'no-such-bucket' does not exist" in err[0]
    assert "no-such-bucket" not in [b["Name"] for b in s3.client().list_buckets()["Buckets"]]


def test_a_csv_with_a_bad_pixel_is_one_line_before_any_work(tmp_path, capsys):
    header = "label," + ",".join(f"pixel{i}" for i in range(784))
    rows = ["1," + ",".join(["0"] * 784), "2," + ",".join(["0"] * 300 + ["dark"] + ["0"] * 483)]
    (tmp_path / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    from conftest import save_tiny_vit

    model = save_tiny_vit(str(tmp_path / "m"), [str(d) for d in range(10)], size=28, channels=1)
    for args in (["score", "--model", model, "--input", str(tmp_path / "train.csv"), "--output", str(tmp_path / "o")],
                 ["train", "--data", str(tmp_path / "train.csv"), "--out", str(tmp_path / "t")]):
        assert main(args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vitray")]
        assert err == [f"vitray: error: {tmp_path / 'train.csv'}: line 3, column pixel300: 'dark' is not a pixel "
                       "value (a whole number from 0 to 255)"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists()


@pytest.mark.s3
@pytest.mark.slow
def test_an_s3_outage_mid_run_is_one_line(tiny_model, tmp_path):
    from s3server import SeaweedS3

    data = tmp_path / "night"
    noise_pngs(data, [f"{i:04d}.png" for i in range(600)])
    with SeaweedS3() as server:
        server.make_bucket("night")
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **server.env(),
               "XDG_CACHE_HOME": str(tmp_path / "cache")}  # its own Ray, whose workers see this server
        out = "s3://night/scores"
        proc = run_cli("score", "--model", tiny_model, "--input", str(data), "--output", out, "--attention", "all",
                       "--piece-rows", "4", "--batch-size", "4", env=env)
        client, deadline = server.client(), time.monotonic() + 180
        while not client.list_objects_v2(Bucket="night", Prefix="scores/predictions/").get("KeyCount"):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no piece committed in time"
            time.sleep(0.1)
        server.kill()
        code, stderr = proc.wait(timeout=240), proc.stderr.read()

    assert code == 1, stderr
    lines = errors_of(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "cannot reach the S3 endpoint" in lines[0] and "rerun the same command" in lines[0], lines[0]
    assert server.access_key not in stderr and server.secret_key not in stderr


def test_more_actors_than_the_machine_holds_is_one_line_before_any_work(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # an embedded Ray: this machine's slots alone
    noise_pngs(tmp_path / "in", ["a.png"])
    code = main(["score", "--model", tiny_model, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                 "--workers", "64"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vitray")]
    assert code == 2 and len(err) == 1 and err[0].startswith("vitray: error: --workers 64 needs 64 CPUs"), err
    assert "use --workers" in err[0] and not (tmp_path / "o").exists()
