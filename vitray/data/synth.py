"""Synthetic inspection images: a part seen from above in its housing seat, passed or shifted out.

`generate` renders samples in vectorised numpy batches (`vitray.data.scenes`); `write` stores them as Hugging Face
parquet or as an image folder through `vitray.storage`. Two styles render the same task differently.
"""
from __future__ import annotations

import itertools
import json
import math
import numbers
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitray import storage
from vitray.data.scenes import LOOKS, NOVEL_DEFECTS, Look, draw_scenes, part_boxes, render, render_novel, seat_boxes
from vitray.domain import INSPECTION
from vitray.errors import VitrayError
from vitray.png import encode

CLASSES: tuple[str, ...] = INSPECTION.classes
# The parquet `label` column is a ClassLabel whose ids index the sorted names, as `datasets` sorts them.
LABEL_NAMES: tuple[str, ...] = tuple(sorted(CLASSES))
# `--defects novel`: seated parts with defects no training sees (a scratch, an empty seat, ...),
# for measuring what a line's model does with them; never for training.
DEFECTS: tuple[str, ...] = ("shifted", "novel")
NOVEL_CLASSES: tuple[str, ...] = ("passed", *NOVEL_DEFECTS)
STYLES: tuple[str, ...] = ("synth", "alt")
FORMATS: tuple[str, ...] = ("parquet", "imagefolder")
MIN_SIZE = 16
# The arguments and class counts, beside the data. Hidden, because `datasets.load_dataset(data_dir=OUT)`
# hands every visible file to the parquet reader; hidden files it skips, as pyarrow and Ray do.
RECORD = ".synth.json"

# Direction of each class's shift in image coordinates (+x right, +y down).
_DIRECTION = {"passed": (0, 0), "Xplus": (1, 0), "Xminus": (-1, 0), "Yplus": (0, 1), "Yminus": (0, -1)}
_PIXELS_PER_BATCH = 1 << 20  # keeps a batch's float arrays to a few tens of MB at any size

def _schema(names: tuple[str, ...]) -> pa.Schema:
    """The Hugging Face image layout, its `label` a ClassLabel of `names`."""
    features = {
        "image": {"_type": "Image"},
        "label": {"_type": "ClassLabel", "names": list(names)},
        "response": {"_type": "Value", "dtype": "string"},
    }
    return pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("label", pa.int64()),
            ("response", pa.string()),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )


@dataclass(frozen=True)
class Sample:
    """One rendered image with its class and the box of the part (x1, y1, x2, y2, pixels)."""

    image: np.ndarray  # HxWx3 uint8
    label: str  # one of CLASSES (NOVEL_CLASSES for novel defects)
    bbox: tuple[float, float, float, float]  # the part (a novel defect's own box)
    seat: tuple[float, float, float, float] | None = None  # the seat cutout, where the part belongs


def class_counts(n: int, passed_fraction: float, classes: tuple[str, ...] = CLASSES) -> dict[str, int]:
    """Images per class: round(n * fraction) passed (at least one for a fraction above 0), the
    defect classes share the rest equally (the first ones in `classes` take the remainder)."""
    passed = min(n, round(n * passed_fraction))
    if passed_fraction > 0 and passed == 0:
        passed = 1  # a fraction above zero asks for passed parts: never silently none
    rest = n - passed
    counts = {"passed": passed}
    kinds = len(classes) - 1
    for i, name in enumerate(classes[1:]):
        counts[name] = rest // kinds + (1 if i < rest % kinds else 0)
    return counts


def classes_of(defects: str) -> tuple[str, ...]:
    return NOVEL_CLASSES if defects == "novel" else CLASSES


def generate(
    n: int, passed_fraction: float = 0.02, size: int = 64, seed: int = 0, style: str = "synth",
    defects: str = "shifted",
) -> Iterator[Sample]:
    """Render n samples in a shuffled order; the same arguments give the same images."""
    _check(n, passed_fraction, size, seed, style, defects)
    return _samples(n, passed_fraction, size, seed, LOOKS[style], defects)


def write(
    out: str,
    n: int,
    passed_fraction: float = 0.02,
    size: int = 64,
    seed: int = 0,
    fmt: str = "parquet",
    style: str = "synth",
    shard_rows: int = 1000,
    defects: str = "shifted",
) -> dict:
    """Render a data set to OUT (local path, file:// or s3://) and return a summary of it.

    parquet: OUT/data-0000i-of-0000K.parquet in the Hugging Face image layout; imagefolder:
    OUT/<class>/<index>.png. Both leave OUT/.synth.json with the arguments and class counts.
    `defects`: "shifted" (the inspection classes) or "novel" (passed, and defects no training sees).
    """
    _check(n, passed_fraction, size, seed, style, defects)
    if fmt not in FORMATS:
        raise VitrayError(f"synth: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not _whole(shard_rows, 1):
        raise VitrayError(f"synth: shard_rows must be a whole number of at least 1, got {shard_rows!r}")
    n, size, seed, shard_rows, passed_fraction = int(n), int(size), int(seed), int(shard_rows), float(passed_fraction)
    root = storage.resolve(out)
    if storage.list_files(root.uri):
        # Old shards or images would silently join the new set when it is read back.
        raise VitrayError(f"synth: {root.uri} already holds files; write into a new or empty folder")

    samples = _samples(n, passed_fraction, size, seed, LOOKS[style], defects)
    names = tuple(sorted(classes_of(defects)))
    if fmt == "parquet":
        files = _write_parquet(root, samples, n, shard_rows, names)
    else:
        files = _write_imagefolder(root, samples)
    record = {
        "generator": "vitray.data.synth",
        "n": n,
        "passed_fraction": passed_fraction,
        "size": size,
        "seed": seed,
        "style": style,
        "format": fmt,
        "shard_rows": shard_rows if fmt == "parquet" else None,
        "defects": defects,
        "counts": class_counts(n, passed_fraction, classes_of(defects)),
        "label_names": list(names),
    }
    # No output path or time in the record, so that the same seed writes byte-identical files.
    storage.write_json(storage.join(root.uri, RECORD), record)
    return {**record, "out": root.uri, "files": files + 1}


# --- arguments -------------------------------------------------------------------------------


def _whole(value: object, least: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def _check(n: int, passed_fraction: float, size: int, seed: int, style: str, defects: str = "shifted") -> None:
    if defects not in DEFECTS:
        raise VitrayError(f"synth: unknown defects {defects!r} (choose from {', '.join(DEFECTS)})")
    if not _whole(n, 1):
        raise VitrayError(f"synth: n must be a whole number of at least 1, got {n!r}")
    if not isinstance(passed_fraction, numbers.Real) or not 0 <= passed_fraction <= 1:
        raise VitrayError(f"synth: passed fraction must be between 0 and 1, got {passed_fraction!r}")
    if not _whole(size, MIN_SIZE):
        raise VitrayError(f"synth: size must be a whole number of at least {MIN_SIZE} pixels, got {size!r}")
    if not _whole(seed, 0):
        raise VitrayError(f"synth: seed must be a whole number of at least 0, got {seed!r}")
    if style not in LOOKS:
        raise VitrayError(f"synth: unknown style {style!r} (choose from {', '.join(STYLES)})")


# --- sampling --------------------------------------------------------------------------------


def _samples(n: int, passed_fraction: float, size: int, seed: int, look: Look,
             defects: str = "shifted") -> Iterator[Sample]:
    classes = classes_of(defects)
    counts = class_counts(n, passed_fraction, classes)
    labels = np.repeat(np.arange(len(classes)), [counts[c] for c in classes])
    labels = np.random.default_rng(seed).permutation(labels)
    batch = max(1, _PIXELS_PER_BATCH // (size * size))
    for k, start in enumerate(range(0, n, batch)):
        # One generator per batch, derived from the seed, keeps batches independent of each other.
        rng = np.random.default_rng([seed, k])
        ids = labels[start : start + batch]
        names = [classes[i] for i in ids]
        if defects == "novel":  # every part seated; the defect is drawn on the scene
            scenes = draw_scenes(np.zeros((len(ids), 2)), size, look, rng)
            images, defect_boxes = render_novel(scenes, [c if c != "passed" else "" for c in names], size, look,
                                                rng)
        else:
            direction = np.array([_DIRECTION[c] for c in names], dtype=float).reshape(len(ids), 2)
            scenes = draw_scenes(direction, size, look, rng)
            images, defect_boxes = render(scenes, size, look, rng), None
        boxes = part_boxes(scenes, size)
        seats = seat_boxes(scenes, size)
        for i, name in enumerate(names):
            box = boxes[i] if defect_boxes is None or name == "passed" else defect_boxes[i]
            yield Sample(images[i], name, tuple(box), tuple(seats[i]))


# --- writing ---------------------------------------------------------------------------------


def _response(sample: Sample) -> str:
    # A Python-literal dict, as in the FRAMEimages data set.
    return repr({"bboxes": [list(sample.bbox)], "labels": [sample.label]})


def _write_parquet(root: storage.Location, samples: Iterator[Sample], n: int, shard_rows: int,
                   names: tuple[str, ...] = LABEL_NAMES) -> int:
    schema = _schema(names)
    shards = math.ceil(n / shard_rows)
    for k in range(shards):
        rows = list(itertools.islice(samples, shard_rows))
        first = k * shard_rows
        image = pa.StructArray.from_arrays(
            [pa.array([encode(r.image) for r in rows], pa.binary()),
             pa.array([f"{first + i:05d}.png" for i in range(len(rows))], pa.string())],
            fields=list(schema.field("image").type),
        )
        label = pa.array([names.index(r.label) for r in rows], pa.int64())
        response = pa.array([_response(r) for r in rows], pa.string())
        table = pa.Table.from_arrays([image, label, response], schema=schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(root.child(f"data-{k:05d}-of-{shards:05d}.parquet").uri, sink.getvalue().to_pybytes())
    return shards


def _write_imagefolder(root: storage.Location, samples: Iterator[Sample]) -> int:
    count = 0
    for i, sample in enumerate(samples):
        storage.write_bytes(root.child(sample.label, f"{i:05d}.png").uri, encode(sample.image))
        count += 1
    return count
