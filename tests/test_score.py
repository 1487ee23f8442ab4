"""Bulk scoring end to end on local disk and S3: outputs, exactly-once commits, kills, bad input, explain."""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from PIL import Image

from conftest import INSPECTION_LABELS, as_a_fresh_process_without_ray, save_tiny_vit
from vitray import storage
from vitray.cli import main
from vitray.data import synth
from vitray.data.preprocess import resize_image
from vitray.data.decode import decode_image
from vitray.errors import VitrayError
from vitray.lease import Lease, LeaseLost
from vitray.explain import ExplainConfig, explain_images
from vitray.overlays import overlay
from vitray.score import (
    PREDICTIONS_SCHEMA,
    PiecePlan,
    ScoreConfig,
    attention_key,
    committed_ids,
    read_errors,
    read_predictions,
    recover,
    score,
    write_piece,
)

COLUMNS = ["id", "path", "label", "score", "probs", "attention", "attention_shape", "attention_png", "model",
           "run_id", "decision", "reason", "defect_score", "ood_score", "probs_calibrated"]


def synth_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Synthetic parts as ROOT/<class>/<i>.png; returns the ids (relative paths)."""
    synth.write(str(folder), n=n, size=32, seed=seed, fmt="imagefolder", passed_fraction=0.3)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))


def noise_pngs(folder: Path, names: list[str], seed: int = 0, size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def predictions_table(out: str) -> pa.Table:
    """Read as a user would: plain pyarrow.dataset on OUT/predictions."""
    loc = storage.resolve(storage.join(out, "predictions"))
    return pads.dataset(loc.path, filesystem=loc.fs, format="parquet").to_table()


def the_manifest(out: str, run_id: str) -> dict:
    return storage.read_json(storage.join(out, "runs", f"{run_id}.json"))


def png_size(uri: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
        assert img.format == "PNG"
        return img.size


# --------------------------------------------------------------------------- scoring a folder


def test_scores_each_image_once_with_the_documented_outputs_then_only_new_ones(ray_session, tiny_model, tmp_path):
    data, out = tmp_path / "night", str(tmp_path / "scored")
    ids = synth_images(data, 24)
    noise_pngs(data, ["line 2/cam/extra.png"])  # deeper, with a space: ids keep the subfolders
    ids = sorted(ids + ["line 2/cam/extra.png"])

    manifest = score(ScoreConfig(model=tiny_model, input=str(data), output=out, piece_rows=8))

    table = predictions_table(out)
    # The documented columns first, in order; a calibrated model's decision columns may follow.
    assert table.schema.names == PREDICTIONS_SCHEMA.names and table.schema.names[:len(COLUMNS)] == COLUMNS
    assert sorted(table.column("id").to_pylist()) == ids
    rows = table.to_pylist()
    for row in rows:
        assert row["path"] == str(data / row["id"])
        assert row["label"] in INSPECTION_LABELS
        assert len(row["probs"]) == len(INSPECTION_LABELS) and sum(row["probs"]) == pytest.approx(1, abs=1e-4)
        assert row["score"] == pytest.approx(max(row["probs"]))
        assert row["probs"][INSPECTION_LABELS.index(row["label"])] == pytest.approx(row["score"])
        assert row["model"] == tiny_model and row["run_id"] == manifest["run_id"]
    # --attention defects (the default): a map and an overlay for every image not predicted passed.
    defects = [r for r in rows if r["label"] != "passed"]
    passed = [r for r in rows if r["label"] == "passed"]
    assert defects and passed, "the tiny model should predict both passed and defects on synth parts"
    assert all(r["attention"] is None and r["attention_png"] is None for r in passed)
    for r in defects:
        assert r["attention_shape"] == [8, 8] and len(r["attention"]) == 64
        assert max(r["attention"]) == pytest.approx(1.0) and min(r["attention"]) >= 0
        assert r["attention_png"] == attention_key(r["id"])
        # At the size the model saw (32 px): bulk overlays are neither enlarged nor captioned.
        assert png_size(os.path.join(out, r["attention_png"])) == (32, 32)
    # The overlay is the map on the image as the model saw it, pixel for pixel.
    seen = resize_image(decode_image(storage.read_bytes(defects[0]["path"])), 32, 3)
    with Image.open(os.path.join(out, defects[0]["attention_png"])) as img:
        np.testing.assert_array_equal(
            np.asarray(img), np.asarray(overlay(seen, np.reshape(defects[0]["attention"], (8, 8)), min_side=0)))
    assert not os.listdir(os.path.join(out, "_pending"))
    assert read_errors(out).count_rows() == 0

    assert manifest["counts"] == {"scored": 25, "skipped": 0, "errors": 0, "total": 25}
    saved = the_manifest(out, manifest["run_id"])
    assert saved["status"] == "complete" and saved["counts"] == manifest["counts"]
    assert saved["model"] == tiny_model and saved["arguments"]["piece_rows"] == 8
    assert saved["images_per_s"] > 0 and saved["wall_s"] >= saved["scoring_s"] > 0
    assert sum(saved["labels"].values()) == 25 and saved["pieces"] >= 4
    assert os.path.isfile(os.path.join(out, "report.html"))

    # Tomorrow: three new images, one in a new folder; only they are scored.
    noise_pngs(data, ["passed/new-1.png", "Xplus/new-2.png", "line 3/new-3.png"], seed=5)
    again = score(ScoreConfig(model=tiny_model, input=str(data), output=out, piece_rows=8))
    assert again["counts"] == {"scored": 3, "skipped": 25, "errors": 0, "total": 28}
    table = predictions_table(out)
    assert table.num_rows == 28 and len(set(table.column("id").to_pylist())) == 28
    by_run = {r["id"]: r["run_id"] for r in table.select(["id", "run_id"]).to_pylist()}
    assert {i for i, run in by_run.items() if run == again["run_id"]} == {
        "passed/new-1.png", "Xplus/new-2.png", "line 3/new-3.png"}
    assert len(os.listdir(os.path.join(out, "runs"))) == 2
    nothing_new = score(ScoreConfig(model=tiny_model, input=str(data), output=out))
    assert nothing_new["counts"] == {"scored": 0, "skipped": 28, "errors": 0, "total": 28}
    assert nothing_new["images_per_s"] is None and predictions_table(out).num_rows == 28


@pytest.mark.s3
def test_parquet_on_s3_scored_to_s3_with_every_map_then_a_new_shard(ray_session, tiny_model, s3_prefix, tmp_path):
    data, out = f"{s3_prefix}/data", f"{s3_prefix}/out"
    synth.write(data, n=12, size=32, seed=1, fmt="parquet")
    shard = "data-00000-of-00001.parquet"

    manifest = score(ScoreConfig(model=tiny_model, input=data, output=out, attention="all", piece_rows=5))

    assert manifest["counts"] == {"scored": 12, "skipped": 0, "errors": 0, "total": 12}
    rows = read_predictions(out).to_table().to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(f"{shard}#{i}" for i in range(12))
    for r in rows:
        assert r["path"] == f"{data}/{r['id']}"
        # `#` starts a fragment in a link: the overlay key spells the row as _row<i>.
        assert r["attention_png"].startswith(f"attention/{shard.replace('.parquet', '.parquet_row')}{r['id'].split('#')[1]}-")
        assert png_size(f"{out}/{r['attention_png']}") == (32, 32)  # the model's input size
    assert predictions_table(out).num_rows == 12  # plain pyarrow.dataset on the S3 prefix
    assert the_manifest(out, manifest["run_id"])["status"] == "complete"
    assert storage.exists(f"{out}/report.html")

    # A new shard arrives beside the first one: only its rows are scored.
    synth.write(str(tmp_path / "more"), n=4, size=32, seed=2, fmt="parquet")
    storage.write_bytes(f"{data}/more/extra.parquet", (tmp_path / "more" / shard).read_bytes())
    again = score(ScoreConfig(model=tiny_model, input=data, output=out, attention="none", piece_rows=5))
    assert again["counts"] == {"scored": 4, "skipped": 12, "errors": 0, "total": 16}
    new = [r for r in read_predictions(out).to_table().to_pylist() if r["run_id"] == again["run_id"]]
    assert sorted(r["id"] for r in new) == [f"more/extra.parquet#{i}" for i in range(4)]
    assert all(r["attention"] is None and r["attention_png"] is None for r in new)  # --attention none
    assert committed_ids(out) == {f"{shard}#{i}" for i in range(12)} | {r["id"] for r in new}


# --------------------------------------------------------------------------- exactly once


def test_attention_keys_are_safe_and_keep_subfolders():
    assert attention_key("a/b/c.png").startswith("attention/a/b/c.png-")
    assert attention_key("data.parquet#12").startswith("attention/data.parquet_row12-")
    assert attention_key("../x/./y.png").startswith("attention/_/x/_/y.png-")
    assert all(attention_key(i).endswith(".png") for i in ("a/b/c.png", "data.parquet#12"))


def _piece_batch(ids: list[str], bad: dict[int, str] | None = None) -> dict[str, np.ndarray]:
    """What reaches the writer stage: ids, model-input images, predictions, maps (NaN = none)."""
    n, bad = len(ids), bad or {}
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(INSPECTION_LABELS)), n).astype(np.float32)
    maps = rng.random((n, 64)).astype(np.float32)
    maps /= maps.max(axis=1, keepdims=True)
    maps[0] = np.nan  # the first image got no map
    return {"id": np.array(ids, dtype=object), "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "error_kind": np.array([bad.get(i, "") for i in range(n)], dtype=object),
            "error": np.array(["boom" if i in bad else "" for i in range(n)], dtype=object),
            "pred": probs.argmax(1), "score": probs.max(1), "probs": probs, "attention": maps}


def test_a_retried_piece_overwrites_itself_and_errors_go_beside_it(tmp_path):
    out = str(tmp_path / "out")
    plan = PiecePlan(out, "run1", "m", tuple(INSPECTION_LABELS), (8, 8), "/in")
    batch = _piece_batch(["a.png", "b/c.png", "d.png", "e.png"], bad={3: "corrupt"})
    with Lease(out, "run1"):
        first = write_piece(batch, plan)
        second = write_piece(batch, plan)  # Ray retrying the same task
    assert first["piece"][0] == second["piece"][0]
    assert (int(first["scored"][0]), int(first["errors"][0])) == (3, 1)
    table = predictions_table(out)
    assert sorted(table.column("id").to_pylist()) == ["a.png", "b/c.png", "d.png"]
    assert table.schema == PREDICTIONS_SCHEMA
    assert read_errors(out).to_table().to_pylist() == [
        {"path": "/in/e.png", "error": "corrupt", "message": "boom", "run_id": "run1"}]
    assert os.path.isfile(os.path.join(out, attention_key("b/c.png")))
    assert not os.path.exists(os.path.join(out, attention_key("a.png")))  # no map, no overlay
    assert os.listdir(os.path.join(out, "_pending")) == []


def test_a_run_that_lost_its_lease_commits_nothing(tmp_path):
    out = str(tmp_path / "out")
    plan = PiecePlan(out, "stalled", "m", tuple(INSPECTION_LABELS), (8, 8), "/in")
    with Lease(out, "new-holder"):  # it took the stalled run's lease over
        with pytest.raises(LeaseLost, match="no longer holds the output's lease"):
            write_piece(_piece_batch(["a.png", "b.png"]), plan)
    assert committed_ids(out) == set()


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_recovery_after_a_kill_at_each_step_of_the_commit(where, tmp_path, request):
    out = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_prefix") + "/out"
    plan = PiecePlan(out, "run1", "m", tuple(INSPECTION_LABELS), (8, 8), "/in")
    with Lease(out, "run1"):
        write_piece(_piece_batch(["a.png", "b.png"]), plan)  # committed
    committed = plan.name(["a.png", "b.png"])
    # Killed between the commit and deleting the pending marker:
    key_b, key_c, key_d = (attention_key(i) for i in ("b.png", "c.png", "d.png"))
    storage.write_json(f"{out}/_pending/{committed}.json", {"pngs": [key_b]})
    # Killed after its overlays, before its commit (and one overlay half-written on local disk):
    lost = plan.name(["c.png", "d.png"])
    storage.write_json(f"{out}/_pending/{lost}.json", {"pngs": [key_c, key_d]})
    storage.write_bytes(f"{out}/{key_c}", b"\x89PNG...")
    if where == "local":
        Path(out, "attention", f".{key_d.split('/')[-1]}.tmp-1-abc").write_bytes(b"\x89PN")
        # Killed in the middle of writing a predictions file: a hidden temp, invisible to readers.
        Path(out, "predictions", f".part-{lost}.parquet.tmp-1-abc").write_bytes(b"PAR1 half")
    assert sorted(predictions_table(out).column("id").to_pylist()) == ["a.png", "b.png"]

    found = recover(out)

    assert found["pending_dropped"] == 1 and found["pending_undone"] == 1
    assert storage.exists(f"{out}/{key_b}")  # belongs to a committed row
    assert not storage.exists(f"{out}/{key_c}")
    assert storage.list_files(f"{out}/_pending") == []
    if where == "local":
        assert found["temp_files"] == 1
        assert not any(name.startswith(".") for _, _, names in os.walk(out) for name in names)
    assert committed_ids(out) == {"a.png", "b.png"}
    assert recover(out) == {"pending_dropped": 0, "pending_undone": 0, "temp_files": 0, "unrecoverable": 0,
                            "compactions_finished": 0, "compactions_undone": 0}


def _session_processes(sid: int) -> list[int]:
    """PIDs of the processes in a session (a killed embedded Ray's workers have their own groups)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
                pids.append(int(entry))
    return pids


def _kill_session(sid: int) -> None:
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 30
    while (pids := _session_processes(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    assert not _session_processes(sid), "processes of the killed run are still alive"


def test_a_run_killed_mid_way_is_finished_by_the_next_one_exactly_once(ray_session, tiny_model, tmp_path):
    data, out = tmp_path / "images", str(tmp_path / "out")
    names = [f"cam{i % 3}/{i:04d}.png" for i in range(150)]
    noise_pngs(data, names)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, in its own session
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vitray.cli", "score", "--model", tiny_model, "--input", str(data),
                             "--output", out, "--attention", "all", "--piece-rows", "5", "--batch-size", "10"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list(Path(out, "predictions").glob("part-*.parquet")):
            assert proc.poll() is None, f"it ended before it was killed: {(tmp_path / 'killed.log').read_text()}"
            assert time.monotonic() < deadline, "no piece committed in time"
            time.sleep(0.02)
    finally:
        _kill_session(proc.pid)
        proc.wait()
        log.close()

    kept = committed_ids(out)
    table = predictions_table(out)  # every visible file is whole, every id once
    assert table.num_rows == len(kept) and 0 < len(kept) < len(names)
    lease = json.loads(Path(out, "_lease.json").read_text())  # the killed run's, left behind
    assert lease["pid"] == proc.pid and time.time() - lease["heartbeat"] < 60

    # Its holder ran on this host and its process has ended: taken over at once, not after --lease-timeout.
    manifest = score(ScoreConfig(model=tiny_model, input=str(data), output=out, attention="all", piece_rows=50))
    assert manifest["took_over_lease_of"]["run_id"] != manifest["run_id"]
    assert manifest["took_over_lease_of"]["holder_gone"] is True

    assert manifest["counts"]["skipped"] == len(kept)
    assert manifest["counts"]["scored"] == len(names) - len(kept)
    table = predictions_table(out)
    assert sorted(table.column("id").to_pylist()) == sorted(names)
    pngs = {p.relative_to(out).as_posix() for p in Path(out, "attention").rglob("*.png")}
    assert pngs == {attention_key(n) for n in names}
    assert not [p for p in Path(out).rglob(".*")] and not list(Path(out, "_pending").iterdir())
    assert not Path(out, "_lease.json").exists()  # released at the end
    killed = [m for m in (json.loads(p.read_text()) for p in Path(out, "runs").glob("*.json"))
              if m["run_id"] != manifest["run_id"]]
    assert [m["status"] for m in killed] == ["running"]  # the killed run shows as never finished


# --------------------------------------------------------------------------- bad input


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels (a decompression bomb's header)."""
    data = bytearray(_encoded(Image.new("L", (8, 8)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def image_zoo(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Odd but valid images (scored) and unusable files (errors, by kind)."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    frames = [Image.new("L", (12, 12), v) for v in (10, 200)]
    good = {
        "cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG"),
        "grey16.png": _encoded(Image.fromarray((rng.random((20, 20)) * 65535).astype(np.uint16)), "PNG"),
        "palette.png": _encoded(rgb.convert("P"), "PNG"),
        "alpha.png": _encoded(rgb.convert("RGBA"), "PNG"),
        "one-pixel.png": _encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "large.jpg": _encoded(Image.new("RGB", (3000, 2000), (120, 30, 60)), "JPEG"),
        "animated.gif": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "plain.bmp": _encoded(rgb, "BMP"),
        "scan.tif": _encoded(rgb, "TIFF"),
        "photo.webp": _encoded(rgb, "WEBP"),
        "prüfteil ß 日本.png": _encoded(rgb, "PNG"),
        "<script>alert(1)</script>.png": _encoded(rgb, "PNG"),
        "deep/er/&amp;#1.png": _encoded(rgb, "PNG"),
    }
    whole = _encoded(rgb, "PNG")
    bad = {"empty.png": b"", "text.jpg": b"hello, not a picture", "truncated.png": whole[: len(whole) // 2],
           "bomb.png": _png_claiming(20_000, 20_000)}
    kinds = {"empty.png": "empty", "text.jpg": "not-an-image", "truncated.png": "corrupt", "bomb.png": "too-large"}
    for name, data in {**good, **bad}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return sorted(good), kinds


def test_bad_files_become_error_rows_and_a_high_error_rate_fails_the_cli(ray_session, tiny_model, tmp_path):
    data, out = tmp_path / "zoo", tmp_path / "out"
    good, kinds = image_zoo(data)
    result = subprocess.run([sys.executable, "-m", "vitray.cli", "score", "--model", tiny_model, "--input", str(data),
                             "--output", str(out), "--attention", "all", "--max-error-rate", "0.2"],
                            capture_output=True, text=True, timeout=300)

    # 4 of 17 unusable is over 20%: exit 1, one line, after everything readable was committed.
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("vitray: error:")]
    assert len(errors) == 1 and "4 of 17 images could not be read" in errors[0]
    assert "Traceback" not in result.stderr
    table = predictions_table(str(out))
    assert sorted(table.column("id").to_pylist()) == good
    for row in table.to_pylist():
        assert (out / row["attention_png"]).is_file()
    assert (out / attention_key("deep/er/&amp;#1.png")).is_file()
    found = read_errors(str(out)).to_table().to_pylist()
    assert {r["path"]: r["error"] for r in found} == {str(data / name): kind for name, kind in kinds.items()}
    assert all(r["message"] and r["run_id"] for r in found)
    manifest = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert manifest["status"] == "failed" and manifest["counts"]["errors"] == 4
    assert manifest["error_kinds"] == {"empty": 1, "not-an-image": 1, "corrupt": 1, "too-large": 1}
    report = (out / "report.html").read_text()
    assert "<script>alert" not in report and "&lt;script&gt;alert(1)&lt;/script&gt;.png" in report


def test_a_small_run_scores_in_this_process_and_commits_what_ray_commits(ray_session, tiny_model, tmp_path,
                                                                          monkeypatch):
    data = tmp_path / "zoo"
    good, kinds = image_zoo(data)
    noise_pngs(data / "more", [f"{i:03d}.png" for i in range(40)])
    base = dict(model=tiny_model, input=str(data), attention="all", piece_rows=7, batch_size=5)
    # Relative paths, as a user types them: Ray's actors, in other folders, must still find the model.
    monkeypatch.chdir(tmp_path)
    relative = {**base, "model": os.path.relpath(tiny_model), "input": "zoo"}
    on_ray = score(ScoreConfig(output="ray", in_process_max=0, **relative))
    as_a_fresh_process_without_ray(monkeypatch)  # no cluster named: a small run stays in this process
    here = score(ScoreConfig(output=str(tmp_path / "here"), **base))
    assert (on_ray["in_process"], here["in_process"]) == (False, True)
    assert here["counts"] == on_ray["counts"] and here["pieces"] == 9  # 57 rows (4 of them errors) by 7
    assert here["error_kinds"] == on_ray["error_kinds"] and here["labels"] == on_ray["labels"]

    tables = [predictions_table(str(tmp_path / out)).sort_by("id") for out in ("ray", "here")]
    for name in ("id", "label", "attention_png"):
        assert tables[0].column(name).to_pylist() == tables[1].column(name).to_pylist(), name
    assert np.allclose(tables[0].column("score").to_numpy(), tables[1].column("score").to_numpy(), atol=1e-5)
    assert sorted(tables[1].column("id").to_pylist()) == sorted([*good, *(f"more/{i:03d}.png" for i in range(40))])
    for row in tables[1].to_pylist():
        assert (tmp_path / "here" / row["attention_png"]).is_file()
    errors = [{(r["path"], r["error"]) for r in read_errors(str(tmp_path / out)).to_table().to_pylist()}
              for out in ("ray", "here")]
    assert errors[0] == errors[1] == {(str(data / name), kind) for name, kind in kinds.items()}
    again = score(ScoreConfig(output=str(tmp_path / "here"), **base))
    assert again["counts"]["scored"] == 0 and again["counts"]["skipped"] == len(tables[1])
    with pytest.raises(VitrayError, match="--in-process-max must be >= 0"):
        ScoreConfig(output="o", in_process_max=-1, **base).check()


def _not_a_vit(folder: Path) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    return str(folder)


def test_unusable_input_or_model_is_one_line_and_exit_2_before_any_work(tiny_model, tmp_path, capsys,
                                                                         monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "vitray.cli", "score", "--model", tiny_model, "--input", str(empty),
                             "--output", str(tmp_path / "o1")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("vitray: error:") and "no images" in result.stderr
    assert not (tmp_path / "o1").exists()

    images = tmp_path / "images"
    noise_pngs(images, ["a.png"])
    cases = [(["--model", _not_a_vit(tmp_path / "bert"), "--input", str(images)], "not a ViT"),
             (["--model", str(tmp_path / "nowhere"), "--input", str(images)], "model folder not found"),
             (["--model", tiny_model, "--input", str(tmp_path / "missing")], "not found"),
             (["--model", tiny_model, "--input", str(images), "--submission", "s.csv"], "digit-recognizer CSV"),
             (["--model", tiny_model, "--input", str(images), "--gpus-per-worker", "64"], "GPUs (join a GPU cluster")]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # GPUs are only checked for an embedded Ray
    for args, message in cases:
        assert main(["score", *args, "--output", str(tmp_path / "o2")]) == 2
        # In this process transformers was imported before the CLI could silence its load bar.
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
        assert len(err) == 1 and err[0].startswith("vitray: error:") and message in err[0], err
    assert main(["score", "--model", tiny_model, "--input", str(images), "--output", str(images / "out")]) == 2
    assert "inside --input" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


# --------------------------------------------------------------------------- Kaggle submission


def test_digit_csv_gives_a_kaggle_submission_in_file_order(ray_session, tmp_path):
    model = save_tiny_vit(str(tmp_path / "digits-model"), [str(d) for d in range(10)], size=28, channels=1)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (15, 784))
    header = ",".join(f"pixel{i}" for i in range(784))
    (tmp_path / "test.csv").write_text(header + "\n" + "\n".join(",".join(map(str, row)) for row in pixels) + "\n")
    out, submission = str(tmp_path / "out"), tmp_path / "submission.csv"

    manifest = score(ScoreConfig(model=model, input=str(tmp_path / "test.csv"), output=out, attention="none",
                                 submission=str(submission)))

    assert manifest["counts"]["scored"] == 15
    lines = submission.read_text().splitlines()
    assert lines[0] == "ImageId,Label" and len(lines) == 16
    by_id = {r["id"]: r["label"] for r in predictions_table(out).select(["id", "label"]).to_pylist()}
    assert lines[1:] == [f"{i + 1},{by_id[f'test.csv#{i}']}" for i in range(15)]
    assert not os.path.exists(os.path.join(out, "attention"))


# --------------------------------------------------------------------------- explain


def test_explain_writes_overlay_input_and_map_per_image(tiny_model, tmp_path, capsys):
    noise_pngs(tmp_path / "a", ["part.png"], seed=1)
    noise_pngs(tmp_path / "b", ["part.png"], seed=2, size=50)
    images = [str(tmp_path / "a" / "part.png"), str(tmp_path / "b" / "part.png")]
    out = tmp_path / "maps"

    assert main(["explain", "--model", tiny_model, "--out", str(out), "--head-fusion", "max", *images]) == 0

    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and all(line.split()[1] in INSPECTION_LABELS for line in printed[:2])
    for name in ("part", "part-2"):  # the same file name twice: both kept
        amap = np.load(out / f"{name}.npy")
        assert amap.shape == (8, 8) and amap.max() == pytest.approx(1.0)
        overlay_size = png_size(str(out / f"{name}.png"))
        assert overlay_size == png_size(str(out / f"{name}_input.png")) and min(overlay_size) >= 224
    results = explain_images(ExplainConfig(tuple(images[:1]), tiny_model, str(tmp_path / "grad"), method="grad-rollout"))
    assert results[0]["label"] in INSPECTION_LABELS and 0 < results[0]["score"] <= 1

    (tmp_path / "broken.png").write_bytes(b"nope")
    with pytest.raises(VitrayError, match="broken.png: not-an-image"):
        explain_images(ExplainConfig((str(tmp_path / "broken.png"),), tiny_model, str(tmp_path / "x")))
    with pytest.raises(VitrayError, match="--discard-ratio"):
        explain_images(ExplainConfig(tuple(images), tiny_model, str(tmp_path / "x"), discard_ratio=1.5))


def test_ctrl_c_while_the_summary_is_written_says_every_image_is_in(tiny_model, tmp_path, monkeypatch):
    """All images committed, Ctrl-C during the report: the run's own line (exit 130), and the rerun writes it."""
    data, out = tmp_path / "night", tmp_path / "out"
    noise_pngs(data, [f"{i:02d}.png" for i in range(12)])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a small run, scored in this process
    config = ScoreConfig(model=tiny_model, input=str(data), output=str(out), attention="none")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vitray.score.report.write_report", ctrl_c)
    with pytest.raises(VitrayError) as info:
        score(config)
    assert info.value.exit_code == 130 and "every image is scored and committed" in str(info.value)
    (manifest,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert manifest["status"] == "interrupted" and manifest["counts"]["scored"] == 12

    monkeypatch.undo()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    again = score(config)
    assert again["status"] == "complete" and again["counts"]["scored"] == 0 and again["counts"]["skipped"] == 12
    assert (out / "report.html").is_file()
