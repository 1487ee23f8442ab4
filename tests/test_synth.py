"""The synthetic inspection data set: classes, shifts, determinism and the files `write` leaves."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vitray.data import scenes, synth
from vitray.data.scenes import LOOKS, draw_scenes, render_novel
from vitray.errors import VitrayError


def _centre(box: tuple[float, float, float, float]) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_images_other_seed_other_images():
    first = list(synth.generate(40, seed=3))
    again = list(synth.generate(40, seed=3))
    other = list(synth.generate(40, seed=4))
    assert [s.label for s in first] == [s.label for s in again]
    assert all(np.array_equal(a.image, b.image) and a.bbox == b.bbox for a, b in zip(first, again))
    assert not any(np.array_equal(a.image, b.image) for a, b in zip(first, other))


@pytest.mark.parametrize(
    "n, fraction, passed",
    [(3000, 0.02, 60), (100, 0.5, 50), (10, 0.01, 1), (10, 0.0, 0), (7, 1.0, 7)],
)
def test_passed_fraction_is_honoured_and_defects_share_the_rest(n, fraction, passed):
    labels = [s.label for s in synth.generate(n, passed_fraction=fraction, size=16)]
    counts = {c: labels.count(c) for c in synth.CLASSES}
    assert counts == synth.class_counts(n, fraction)
    assert counts["passed"] == passed
    defects = [counts[c] for c in synth.CLASSES[1:]]
    assert sum(defects) == n - passed and max(defects) - min(defects) <= 1
    if n - passed >= 4:
        assert min(defects) >= 1


def test_order_is_shuffled():
    labels = [s.label for s in synth.generate(200, passed_fraction=0.2, size=16)]
    assert labels != sorted(labels, key=synth.CLASSES.index)


@pytest.mark.parametrize("style, size", [("synth", 64), ("alt", 64), ("synth", 128)])
def test_boxes_lie_in_the_image_and_show_the_shift_relative_to_the_seat(style, size):
    scale = size / 64
    for sample in synth.generate(100, passed_fraction=0.2, size=size, seed=7, style=style):
        assert sample.image.shape == (size, size, 3) and sample.image.dtype == np.uint8
        x1, y1, x2, y2 = sample.bbox
        assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
        dx, dy = (_centre(sample.bbox) - _centre(sample.seat)) / scale
        along, across = {
            "passed": (0.0, max(abs(dx), abs(dy))),
            "Xplus": (dx, dy), "Xminus": (-dx, dy), "Yplus": (dy, dx), "Yminus": (-dy, dx),
        }[sample.label]
        if sample.label == "passed":
            assert across < 0.6, sample  # seated: at most a fraction of a pixel off
        else:
            assert 1.8 < along < 5.3 and abs(across) < 0.8, sample  # 2-5 px the named way


@pytest.mark.parametrize("style", synth.STYLES)
def test_a_shift_changes_the_part_and_leaves_the_rest_of_the_scene(style):
    # The same scenes and nuisances rendered seated and moved 4 px right.
    look = scenes.LOOKS[style]
    seated = scenes.draw_scenes(np.zeros((6, 2)), 64, look, np.random.default_rng(1))
    moved = dataclasses.replace(seated, offset=seated.offset + [4.0, 0.0])
    before = scenes.render(seated, 64, look, np.random.default_rng(2)).astype(int)
    after = scenes.render(moved, 64, look, np.random.default_rng(2)).astype(int)
    for i, (old, new) in enumerate(zip(scenes.part_boxes(seated, 64), scenes.part_boxes(moved, 64))):
        x1, y1 = int(min(old[0], new[0])) - 4, int(min(old[1], new[1])) - 4
        x2, y2 = int(max(old[2], new[2])) + 5, int(max(old[3], new[3])) + 5
        diff = np.abs(after[i] - before[i]).sum(axis=2)
        assert diff[max(y1, 0) : y2, max(x1, 0) : x2].mean() > 10  # the part moved visibly
        diff[max(y1, 0) : y2, max(x1, 0) : x2] = 0
        assert diff.max() <= 3  # housing, seat, background and noise stay as they were
    if style == "synth":  # bright metal now covers the seat's right rim; the left gap shows dark floor
        grey = (after - before).sum(axis=3)
        xs = np.arange(64)[None, None, :]
        gained, lost = np.clip(grey, 0, None), np.clip(-grey, 0, None)
        assert (xs * gained).sum() / gained.sum() > (xs * lost).sum() / lost.sum() + 4


def test_alt_style_renders_the_same_task_differently():
    plain = list(synth.generate(60, passed_fraction=0.2, seed=5))
    alt = list(synth.generate(60, passed_fraction=0.2, seed=5, style="alt"))
    assert [s.label for s in plain] == [s.label for s in alt]  # same classes, same order
    plain_images = np.stack([s.image for s in plain]).astype(float)
    alt_images = np.stack([s.image for s in alt]).astype(float)
    assert np.abs(plain_images.mean(axis=(0, 1, 2)) - alt_images.mean(axis=(0, 1, 2))).max() > 20

    def aspect(samples):
        return np.median([(s.bbox[2] - s.bbox[0]) / (s.bbox[3] - s.bbox[1]) for s in samples])

    assert aspect(plain) > 1.1 and aspect(alt) < 0.9  # a landscape frame, a portrait terminal


def test_parquet_is_read_by_hugging_face_datasets(tmp_path):
    import datasets

    out = tmp_path / "set"
    summary = synth.write(str(out), 30, passed_fraction=0.1, size=48, seed=1, shard_rows=12)
    assert sorted(p.name for p in out.iterdir()) == [
        ".synth.json", "data-00000-of-00003.parquet", "data-00001-of-00003.parquet", "data-00002-of-00003.parquet",
    ]
    assert summary["counts"] == synth.class_counts(30, 0.1) and summary["files"] == 4
    record = json.loads((out / ".synth.json").read_text())
    assert record["n"] == 30 and record["seed"] == 1 and record["counts"]["passed"] == 3

    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 30
    assert ds.features["label"].names == sorted(synth.CLASSES)
    expected = list(synth.generate(30, passed_fraction=0.1, size=48, seed=1))
    for row, sample in zip(ds, expected):
        assert row["image"].size == (48, 48) and row["image"].mode == "RGB"
        assert np.array_equal(np.asarray(row["image"]), sample.image)
        assert ds.features["label"].int2str(row["label"]) == sample.label
        response = ast.literal_eval(row["response"])
        assert response == {"bboxes": [list(sample.bbox)], "labels": [sample.label]}


@pytest.mark.parametrize("fmt", synth.FORMATS)
def test_same_seed_writes_byte_identical_files(tmp_path, fmt):
    synth.write(str(tmp_path / "a"), 25, seed=2, fmt=fmt, shard_rows=10)
    synth.write(str(tmp_path / "b"), 25, seed=2, fmt=fmt, shard_rows=10)
    synth.write(str(tmp_path / "c"), 25, seed=3, fmt=fmt, shard_rows=10)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_imagefolder_layout(tmp_path):
    out = tmp_path / "folder"
    summary = synth.write(f"file://{out}", 25, passed_fraction=0.2, size=32, fmt="imagefolder")
    counts = synth.class_counts(25, 0.2)
    assert summary["files"] == 26 and summary["format"] == "imagefolder"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(synth.CLASSES)
    names = []
    for name in synth.CLASSES:
        pngs = sorted((out / name).glob("*.png"))
        assert len(pngs) == counts[name]
        names += [p.name for p in pngs]
        with Image.open(pngs[0]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    assert sorted(names) == [f"{i:05d}.png" for i in range(25)]


def test_write_refuses_a_folder_that_holds_files(tmp_path):
    synth.write(str(tmp_path), 5, size=16)
    with pytest.raises(VitrayError, match="already holds files"):
        synth.write(str(tmp_path), 5, size=16)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n": 0}, "n must be"),
        ({"n": -3}, "n must be"),
        ({"n": 2.5}, "n must be"),
        ({"passed_fraction": 1.5}, "passed fraction"),
        ({"passed_fraction": -0.1}, "passed fraction"),
        ({"size": 8}, "size must be"),
        ({"seed": -1}, "seed must be"),
        ({"style": "photo"}, "unknown style"),
    ],
)
def test_bad_arguments_raise_one_line(tmp_path, kwargs, words):
    args = {"n": 10, **kwargs}
    with pytest.raises(VitrayError, match=words) as generated:
        synth.generate(**args)
    with pytest.raises(VitrayError, match=words):
        synth.write(str(tmp_path / "out"), **args)
    assert "\n" not in str(generated.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, words", [({"fmt": "jpeg"}, "unknown format"), ({"shard_rows": 0}, "shard_rows")])
def test_bad_write_arguments_raise(tmp_path, kwargs, words):
    with pytest.raises(VitrayError, match=words):
        synth.write(str(tmp_path / "out"), 10, **kwargs)


@pytest.mark.parametrize("style", ["synth", "alt"])
def test_novel_defects_are_drawn_on_seated_parts_with_the_defects_box(style):
    samples = list(synth.generate(60, passed_fraction=0.2, size=64, seed=5, style=style, defects="novel"))
    counts = {c: sum(s.label == c for s in samples) for c in synth.NOVEL_CLASSES}
    assert counts == synth.class_counts(60, 0.2, synth.NOVEL_CLASSES) and counts["passed"] == 12
    for sample in samples:
        x1, y1, x2, y2 = sample.bbox
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64, sample
    # Each kind changes the scene where its box says, compared with the same scene drawn without it.
    rng = np.random.default_rng(1)
    look = LOOKS[style]
    kinds = list(synth.NOVEL_DEFECTS)
    geometry = draw_scenes(np.zeros((len(kinds), 2)), 64, look, np.random.default_rng(2))
    with_defects, boxes = render_novel(geometry, kinds, 64, look, np.random.default_rng(3))
    without, _ = render_novel(geometry, [""] * len(kinds), 64, look, np.random.default_rng(3))
    for kind, a, b, (x1, y1, x2, y2) in zip(kinds, with_defects, without, boxes):
        changed = np.abs(a.astype(int) - b.astype(int)).sum(-1) > 40
        inside = changed[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))].sum()
        assert changed.sum() > 0 and inside / changed.sum() > 0.6, kind


def test_novel_defects_are_written_with_their_own_class_names(tmp_path):
    summary = synth.write(str(tmp_path / "novel"), n=12, passed_fraction=0.25, size=32, seed=1, defects="novel")
    assert summary["label_names"] == sorted(synth.NOVEL_CLASSES) and summary["defects"] == "novel"
    table = pq.read_table(next((tmp_path / "novel").glob("*.parquet")))
    names = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["label"]["names"]
    assert names == sorted(synth.NOVEL_CLASSES)
    assert {names[i] for i in table.column("label").to_pylist()} <= set(synth.NOVEL_CLASSES)
    with pytest.raises(VitrayError, match="unknown defects 'odd'"):
        synth.write(str(tmp_path / "odd"), n=4, defects="odd")
