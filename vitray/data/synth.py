"""Synthetic inspection images: a part seen from above in its housing seat, passed or shifted out.

`generate` renders samples in vectorised numpy batches; `write` stores them as Hugging Face
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
from vitray.png import encode
from vitray.errors import VitrayError

CLASSES: tuple[str, ...] = ("passed", "Xplus", "Xminus", "Yplus", "Yminus")
# The parquet `label` column is a ClassLabel whose ids index the sorted names, as `datasets` sorts them.
LABEL_NAMES: tuple[str, ...] = tuple(sorted(CLASSES))
STYLES: tuple[str, ...] = ("synth", "alt")
FORMATS: tuple[str, ...] = ("parquet", "imagefolder")
MIN_SIZE = 16
# The arguments and class counts, beside the data. Hidden, because `datasets.load_dataset(data_dir=OUT)`
# hands every visible file to the parquet reader; hidden files it skips, as pyarrow and Ray do.
RECORD = ".synth.json"

# Direction of each class's shift in image coordinates (+x right, +y down).
_DIRECTION = {"passed": (0, 0), "Xplus": (1, 0), "Xminus": (-1, 0), "Yplus": (0, 1), "Yminus": (0, -1)}
_SHIFT_PX = (2.0, 5.0)    # defect shift at 64 px, scaled with the image size
_TOLERANCE_PX = 0.3       # play of a seated part (and across a defect's shift), at 64 px
_PIXELS_PER_BATCH = 1 << 20  # keeps a batch's float arrays to a few tens of MB at any size

_HF_FEATURES = {
    "image": {"_type": "Image"},
    "label": {"_type": "ClassLabel", "names": list(LABEL_NAMES)},
    "response": {"_type": "Value", "dtype": "string"},
}
_SCHEMA = pa.schema(
    [
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("label", pa.int64()),
        ("response", pa.string()),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": _HF_FEATURES}})},
)


@dataclass(frozen=True)
class Sample:
    """One rendered image with its class and the box of the part (x1, y1, x2, y2, pixels)."""

    image: np.ndarray  # HxWx3 uint8
    label: str  # one of CLASSES
    bbox: tuple[float, float, float, float]  # the part
    seat: tuple[float, float, float, float] | None = None  # the seat cutout, where the part belongs


@dataclass(frozen=True)
class _Look:
    """A rendering style. Lengths are pixels at 64 px; colours are RGB in 0..1."""

    part: tuple[float, float]  # half width, half height of the part
    hole: tuple[float, float]  # half size of its opening (frame window or slot) as a share of the part's
    part_round: float
    hole_round: float
    clearance: float  # gap between a seated part and the seat wall
    margin: float  # housing wall around the seat
    seat_round: float
    housing_round: float
    max_angle_deg: float
    background: tuple[float, float, float]
    housing: tuple[float, float, float]
    floor: tuple[float, float, float]
    metal: tuple[float, float, float]
    texture: str  # "brushed" streaks or "speckle" grain
    light: str  # "gradient" across the image or a "spot"
    noise: str  # "gaussian" or signal-dependent "shot" noise with sensor row banding
    blur_px: tuple[float, float]


_LOOKS = {
    # A silver frame in a dark plastic housing on a brushed aluminium plate, lit from one side.
    "synth": _Look(
        part=(11.0, 8.5), hole=(0.72, 0.62), part_round=0.6, hole_round=0.4,
        clearance=1.0, margin=6.0, seat_round=0.5, housing_round=1.5, max_angle_deg=3.0,
        background=(0.62, 0.64, 0.66), housing=(0.21, 0.23, 0.26), floor=(0.07, 0.07, 0.08),
        metal=(0.80, 0.80, 0.77), texture="brushed", light="gradient", noise="gaussian",
        blur_px=(0.0, 0.8),
    ),
    # A portrait copper terminal with a slot in an ivory housing on a dark mat, under a spotlight.
    "alt": _Look(
        part=(7.5, 11.5), hole=(0.17, 0.6), part_round=2.0, hole_round=1.2,
        clearance=1.3, margin=5.0, seat_round=2.0, housing_round=3.0, max_angle_deg=5.0,
        background=(0.10, 0.11, 0.13), housing=(0.86, 0.84, 0.78), floor=(0.42, 0.41, 0.40),
        metal=(0.88, 0.52, 0.28), texture="speckle", light="spot", noise="shot",
        blur_px=(0.3, 1.1),
    ),
}


@dataclass(frozen=True)
class _Scenes:
    """Geometry of a batch of scenes in pixels; u, v is the housing's own frame."""

    unit: np.ndarray  # (B,) pixels per 64-px pixel, times a random scale of the whole scene
    centre: np.ndarray  # (B, 2) seat centre in the image
    angle: np.ndarray  # (B,) rotation of housing and part, radians
    part: np.ndarray  # (B, 2) part half size
    seat: np.ndarray  # (B, 2) seat half size
    housing: np.ndarray  # (B, 2) housing half size
    offset: np.ndarray  # (B, 2) part centre relative to the seat centre, in u, v


def class_counts(n: int, passed_fraction: float) -> dict[str, int]:
    """Images per class: round(n * fraction) passed (at least one for a fraction above 0), the
    defect classes share the rest equally (the first ones in CLASSES take the remainder)."""
    passed = min(n, round(n * passed_fraction))
    if passed_fraction > 0 and passed == 0:
        passed = 1  # a fraction above zero asks for passed parts: never silently none
    rest = n - passed
    counts = {"passed": passed}
    for i, name in enumerate(CLASSES[1:]):
        counts[name] = rest // 4 + (1 if i < rest % 4 else 0)
    return counts


def generate(
    n: int, passed_fraction: float = 0.02, size: int = 64, seed: int = 0, style: str = "synth"
) -> Iterator[Sample]:
    """Render n samples in a shuffled order; the same arguments give the same images."""
    _check(n, passed_fraction, size, seed, style)
    return _samples(n, passed_fraction, size, seed, _LOOKS[style])


def write(
    out: str,
    n: int,
    passed_fraction: float = 0.02,
    size: int = 64,
    seed: int = 0,
    fmt: str = "parquet",
    style: str = "synth",
    shard_rows: int = 1000,
) -> dict:
    """Render a data set to OUT (local path, file:// or s3://) and return a summary of it.

    parquet: OUT/data-0000i-of-0000K.parquet in the Hugging Face image layout; imagefolder:
    OUT/<class>/<index>.png. Both leave OUT/.synth.json with the arguments and class counts.
    """
    _check(n, passed_fraction, size, seed, style)
    if fmt not in FORMATS:
        raise VitrayError(f"synth: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not _whole(shard_rows, 1):
        raise VitrayError(f"synth: shard_rows must be a whole number of at least 1, got {shard_rows!r}")
    n, size, seed, shard_rows, passed_fraction = int(n), int(size), int(seed), int(shard_rows), float(passed_fraction)
    root = storage.resolve(out)
    if storage.list_files(root.uri):
        # Old shards or images would silently join the new set when it is read back.
        raise VitrayError(f"synth: {root.uri} already holds files; write into a new or empty folder")

    samples = _samples(n, passed_fraction, size, seed, _LOOKS[style])
    if fmt == "parquet":
        files = _write_parquet(root, samples, n, shard_rows)
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
        "counts": class_counts(n, passed_fraction),
        "label_names": list(LABEL_NAMES),
    }
    # No output path or time in the record, so that the same seed writes byte-identical files.
    storage.write_json(storage.join(root.uri, RECORD), record)
    return {**record, "out": root.uri, "files": files + 1}


# --- arguments -------------------------------------------------------------------------------


def _whole(value: object, least: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def _check(n: int, passed_fraction: float, size: int, seed: int, style: str) -> None:
    if not _whole(n, 1):
        raise VitrayError(f"synth: n must be a whole number of at least 1, got {n!r}")
    if not isinstance(passed_fraction, numbers.Real) or not 0 <= passed_fraction <= 1:
        raise VitrayError(f"synth: passed fraction must be between 0 and 1, got {passed_fraction!r}")
    if not _whole(size, MIN_SIZE):
        raise VitrayError(f"synth: size must be a whole number of at least {MIN_SIZE} pixels, got {size!r}")
    if not _whole(seed, 0):
        raise VitrayError(f"synth: seed must be a whole number of at least 0, got {seed!r}")
    if style not in _LOOKS:
        raise VitrayError(f"synth: unknown style {style!r} (choose from {', '.join(STYLES)})")


# --- sampling --------------------------------------------------------------------------------


def _samples(n: int, passed_fraction: float, size: int, seed: int, look: _Look) -> Iterator[Sample]:
    counts = class_counts(n, passed_fraction)
    labels = np.repeat(np.arange(len(CLASSES)), [counts[c] for c in CLASSES])
    labels = np.random.default_rng(seed).permutation(labels)
    batch = max(1, _PIXELS_PER_BATCH // (size * size))
    for k, start in enumerate(range(0, n, batch)):
        # One generator per batch, derived from the seed, keeps batches independent of each other.
        rng = np.random.default_rng([seed, k])
        ids = labels[start : start + batch]
        scenes = _draw_scenes(ids, size, look, rng)
        images = _render(scenes, size, look, rng)
        boxes = _part_boxes(scenes, size)
        seats = _seat_boxes(scenes, size)
        for i, label_id in enumerate(ids):
            yield Sample(images[i], CLASSES[label_id], tuple(boxes[i]), tuple(seats[i]))


def _draw_scenes(label_ids: np.ndarray, size: int, look: _Look, rng: np.random.Generator) -> _Scenes:
    """Random geometry per scene; only `offset` depends on the class."""
    b = len(label_ids)
    s = size / 64
    unit = s * rng.uniform(0.9, 1.1, b)
    part = np.array(look.part) * unit[:, None] * rng.uniform(0.92, 1.08, (b, 2))
    seat = part + look.clearance * unit[:, None]
    housing = seat + look.margin * unit[:, None]
    angle = np.radians(rng.uniform(-look.max_angle_deg, look.max_angle_deg, b))
    # Jitter the whole housing as far as it stays in the image, so that only the part's
    # position relative to its seat tells the class.
    c, si = np.abs(np.cos(angle)), np.abs(np.sin(angle))
    reach = np.stack([housing[:, 0] * c + housing[:, 1] * si, housing[:, 0] * si + housing[:, 1] * c], 1)
    room = np.maximum(size / 2 - reach - 1.5 * s, 0)
    centre = size / 2 + rng.uniform(-1, 1, (b, 2)) * room

    direction = np.array([_DIRECTION[CLASSES[i]] for i in label_ids], dtype=float).reshape(b, 2)
    shift = rng.uniform(*_SHIFT_PX, b)[:, None] * s
    play = rng.uniform(-_TOLERANCE_PX, _TOLERANCE_PX, (b, 2)) * s
    offset = direction * shift + play * (1 - np.abs(direction))  # play only across the shift
    return _Scenes(unit, centre, angle, part, seat, housing, offset)


def _rotated_box(centre: np.ndarray, angle: np.ndarray, half: np.ndarray, size: int) -> list[list[float]]:
    """Axis-aligned x1, y1, x2, y2 of rotated rectangles, clipped to the image, 2 decimals."""
    c, s = np.abs(np.cos(angle)), np.abs(np.sin(angle))
    ex = half[:, 0] * c + half[:, 1] * s
    ey = half[:, 0] * s + half[:, 1] * c
    box = np.stack([centre[:, 0] - ex, centre[:, 1] - ey, centre[:, 0] + ex, centre[:, 1] + ey], 1)
    return np.round(np.clip(box, 0, size), 2).tolist()


def _part_boxes(sc: _Scenes, size: int) -> list[list[float]]:
    cos, sin = np.cos(sc.angle), np.sin(sc.angle)
    du, dv = sc.offset[:, 0], sc.offset[:, 1]
    centre = sc.centre + np.stack([cos * du - sin * dv, sin * du + cos * dv], 1)
    return _rotated_box(centre, sc.angle, sc.part, size)


def _seat_boxes(sc: _Scenes, size: int) -> list[list[float]]:
    return _rotated_box(sc.centre, sc.angle, sc.seat, size)


# --- rendering -------------------------------------------------------------------------------


def _sdf_box(u, v, cu, cv, half_u, half_v, radius) -> np.ndarray:
    """Signed distance in pixels to a rounded rectangle, negative inside."""
    qu = np.abs(u - cu) - (half_u - radius)
    qv = np.abs(v - cv) - (half_v - radius)
    ou, ov = np.maximum(qu, 0), np.maximum(qv, 0)
    return np.sqrt(ou * ou + ov * ov) + np.minimum(np.maximum(qu, qv), 0) - radius


def _cover(distance: np.ndarray, width: float | np.ndarray = 1.0) -> np.ndarray:
    """Share of a pixel inside a shape: a ramp one pixel wide antialiases sub-pixel shifts;
    a wider one makes a soft shadow."""
    return np.clip(0.5 - distance / width, 0, 1)


def _stretch(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix that linearly interpolates n_in lattice values onto n_out pixels."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    weight = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1 - weight)
    np.add.at(m, (np.arange(n_out), hi), weight)
    return m


def _noise_field(rng: np.random.Generator, b: int, size: int, rows: int, cols: int) -> np.ndarray:
    """(B, 1, size, size) gaussian noise on a rows x cols lattice, stretched bilinearly."""
    lattice = rng.standard_normal((b, rows, cols), dtype=np.float32)
    if rows != size:  # one matrix product for the whole batch rather than one per image
        lattice = (_stretch(rows, size) @ lattice.transpose(1, 0, 2).reshape(rows, -1))
        lattice = lattice.reshape(size, b, cols).transpose(1, 0, 2)
    if cols != size:
        lattice = lattice.reshape(-1, cols) @ _stretch(cols, size).T
    return lattice.reshape(b, 1, size, size)


def _texture(kind: str, rng: np.random.Generator, b: int, size: int) -> np.ndarray:
    if kind == "brushed":  # independent rows, smooth along x: streaks like brushed metal
        streaks = _noise_field(rng, b, size, size, max(2, size // 10))
        return streaks + 0.3 * _noise_field(rng, b, size, size, size)
    grain = _noise_field(rng, b, size, max(2, size // 2), max(2, size // 2))
    return grain + 0.5 * _noise_field(rng, b, size, max(2, size // 8), max(2, size // 8))


def _colours(rgb: tuple[float, float, float], rng: np.random.Generator, b: int) -> np.ndarray:
    """(B, 3, 1, 1) colours: the style's colour with its brightness and tint varied per image."""
    base = np.array(rgb) * rng.uniform(0.85, 1.15, (b, 1)) * rng.normal(1, 0.04, (b, 3))
    return base.astype(np.float32)[:, :, None, None]


def _blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Gaussian blur of (B, C, H, W) with a sigma per image: a product with a banded matrix
    on each side."""
    size = images.shape[-1]
    idx = np.arange(size, dtype=np.float32)
    sig = np.maximum(sigma, 1e-3).astype(np.float32)[:, None, None, None]
    kernel = np.exp(-((idx[:, None] - idx[None, :]) ** 2) / (2 * sig**2))
    kernel /= kernel.sum(axis=-1, keepdims=True)  # rows sum to 1: edges are not darkened
    return kernel @ images @ kernel.transpose(0, 1, 3, 2)


def _render(sc: _Scenes, size: int, look: _Look, rng: np.random.Generator) -> np.ndarray:
    """(B, size, size, 3) uint8 images of the scenes, with the style's nuisances drawn from rng.

    Works channel-first, (B, 3, H, W) colour and (B, 1, H, W) maps, so that numpy broadcasts
    along whole rows of pixels.
    """
    b = len(sc.angle)
    s = size / 64

    def per_image(values) -> np.ndarray:  # (B,) -> (B, 1, 1, 1) to broadcast over channels and pixels
        return np.asarray(values, np.float32)[:, None, None, None]

    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres: pixel j covers [j, j+1)
    dx = grid[None, None, None, :] - per_image(sc.centre[:, 0])
    dy = grid[None, None, :, None] - per_image(sc.centre[:, 1])
    cos, sin = per_image(np.cos(sc.angle)), per_image(np.sin(sc.angle))
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    unit = per_image(sc.unit)

    grain = _texture(look.texture, rng, b, size)
    metal_grain = _texture(look.texture, rng, b, size)
    blotch = _noise_field(rng, b, size, 4, 4)
    background, housing, floor, metal = (
        _colours(rgb, rng, b) for rgb in (look.background, look.housing, look.floor, look.metal)
    )
    # The light's direction sets where shadows fall and which side of the part shines.
    light = rng.uniform(0, 2 * np.pi, b)
    lu, lv = per_image(np.cos(light)), per_image(np.sin(light))
    drop = per_image(rng.uniform(0.5, 1.2, b)) * unit

    img = background * (1 + 0.08 * grain + 0.06 * blotch)
    hu, hv, hr = per_image(sc.housing[:, 0]), per_image(sc.housing[:, 1]), look.housing_round * unit
    housing_shadow = _cover(_sdf_box(u - 2 * drop * lu, v - 2 * drop * lv, 0, 0, hu, hv, hr), 3 * unit)
    img *= 1 - 0.4 * housing_shadow
    img += _cover(_sdf_box(u, v, 0, 0, hu, hv, hr)) * (housing * (1 + 0.05 * grain + 0.05 * blotch) - img)

    seat = _sdf_box(u, v, 0, 0, per_image(sc.seat[:, 0]), per_image(sc.seat[:, 1]), look.seat_round * unit)
    inside_seat = _cover(seat)
    img += inside_seat * (floor * (1 + 0.05 * grain) - img)
    img += 0.18 * (inside_seat - _cover(seat + unit))  # a lit bevel along the seat wall outlines the seat

    ou, ov = per_image(sc.offset[:, 0]), per_image(sc.offset[:, 1])
    pu, pv = per_image(sc.part[:, 0]), per_image(sc.part[:, 1])
    hole_u, hole_v = pu * look.hole[0], pv * look.hole[1]

    def part_cover(su: np.ndarray, sv: np.ndarray, width: float | np.ndarray = 1.0) -> np.ndarray:
        outer = _sdf_box(su, sv, ou, ov, pu, pv, look.part_round * unit)
        hole = _sdf_box(su, sv, ou, ov, hole_u, hole_v, look.hole_round * unit)
        return _cover(outer, width) * (1 - _cover(hole, width))

    img *= 1 - 0.45 * part_cover(u - drop * lu, v - drop * lv, 2 * unit)
    # Metal: brighter towards the light, a specular band at a random place, its own grain.
    across = ((u - ou) * lu + (v - ov) * lv) / pu
    glint = rng.uniform(0, np.pi, b)
    band = ((u - ou) * per_image(np.cos(glint)) + (v - ov) * per_image(np.sin(glint))) / pu
    band = (band - per_image(rng.uniform(-0.6, 0.6, b))) / per_image(rng.uniform(0.15, 0.4, b))
    shine = 0.78 + 0.15 * across + 0.3 * per_image(rng.uniform(0, 1, b)) * np.exp(-band * band) + 0.05 * metal_grain
    img += part_cover(u, v) * (metal * shine - img)

    if look.light == "gradient":
        tilt = rng.uniform(0, 2 * np.pi, b)
        ramp = (dx * per_image(np.cos(tilt)) + dy * per_image(np.sin(tilt))) / size
        img *= 1 + per_image(rng.uniform(0, 0.6, b)) * ramp
    else:
        spot = size / 2 + rng.normal(0, 0.15 * size, (b, 2))
        sx, sy = grid[None, None, None, :] - per_image(spot[:, 0]), grid[None, None, :, None] - per_image(spot[:, 1])
        r2 = sx * sx + sy * sy
        reach = per_image(rng.uniform(0.35, 0.7, b)) * size
        img *= 0.45 + 0.75 * np.exp(-r2 / (2 * reach * reach))

    contrast, brightness = per_image(rng.uniform(0.8, 1.2, b)), per_image(rng.uniform(-0.08, 0.08, b))
    img = (img - 0.5) * contrast + 0.5 + brightness
    img = _blur(img, rng.uniform(*look.blur_px, b) * s)

    pixel_noise = rng.standard_normal(img.shape, dtype=np.float32)
    if look.noise == "gaussian":
        img += pixel_noise * per_image(rng.uniform(0.005, 0.035, b))
    else:  # photon noise grows with the signal; a line sensor adds a level per row
        img += pixel_noise * np.sqrt(np.clip(img, 0, None)) * per_image(rng.uniform(0.02, 0.06, b))
        img += rng.standard_normal((b, 1, size, 1), dtype=np.float32) * per_image(rng.uniform(0, 0.025, b))
    img = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(img.transpose(0, 2, 3, 1))


# --- writing ---------------------------------------------------------------------------------


def _response(sample: Sample) -> str:
    # A Python-literal dict, as in the FRAMEimages data set.
    return repr({"bboxes": [list(sample.bbox)], "labels": [sample.label]})


def _write_parquet(root: storage.Location, samples: Iterator[Sample], n: int, shard_rows: int) -> int:
    shards = math.ceil(n / shard_rows)
    for k in range(shards):
        rows = list(itertools.islice(samples, shard_rows))
        first = k * shard_rows
        image = pa.StructArray.from_arrays(
            [pa.array([encode(r.image) for r in rows], pa.binary()),
             pa.array([f"{first + i:05d}.png" for i in range(len(rows))], pa.string())],
            fields=list(_SCHEMA.field("image").type),
        )
        label = pa.array([LABEL_NAMES.index(r.label) for r in rows], pa.int64())
        response = pa.array([_response(r) for r in rows], pa.string())
        table = pa.Table.from_arrays([image, label, response], schema=_SCHEMA)
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
