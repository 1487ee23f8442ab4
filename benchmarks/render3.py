"""A third inspection renderer, held out: vitray's defaults are never tuned on its images.

    python benchmarks/render3.py OUT --n 3000 --passed-fraction 0.02 --seed 21 [--size 64]

vitray's own renderers (`vitray synth`, styles synth and alt) paint a rectangular part in a
rectangular seat with vectorised signed-distance fields. This one is written differently, so
that a recipe which fits their look cannot pass for one that learned the task: PIL draws each
scene at four times the size and box-filters it down. The part is a round bearing ring
(a bright annulus with a dark bore and a notch at a random angle) in a round seat bored into
a green board with screw heads, copper pads and silkscreen marks, lit by a ring light
(brighter centre, darker corners), with JPEG-like 8x8 block noise and defocus.

The task is the same: the part's centre sits in its seat (`passed`) or is shifted 2 to 5 px (at
64 px) along +x (`Xplus`), -x, +y or -y. OUT gets Hugging Face parquet shards with an `image`
column (PNG bytes) and a FRAMEimages `response` column (`{'bboxes': [[x1, y1, x2, y2]],
'labels': [name]}`, the part's box), which `vitray train`, `vitray evaluate` and
`benchmarks/maps.py --render3` read.
"""
from __future__ import annotations

import argparse
import io
import math
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("passed", "Xplus", "Xminus", "Yplus", "Yminus")
DIRECTION = {"passed": (0, 0), "Xplus": (1, 0), "Xminus": (-1, 0), "Yplus": (0, 1), "Yminus": (0, -1)}
SUPER = 4  # drawn at this multiple of the output size, then box-filtered down
ROWS_PER_SHARD = 1000


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (size, size, 3) uint8
    label: str
    bbox: tuple[float, float, float, float]  # the part, x1 y1 x2 y2 at output size
    seat: tuple[float, float, float, float]  # the seat's bore, where the part belongs


def counts(n: int, passed_fraction: float) -> dict[str, int]:
    passed = int(round(n * passed_fraction))
    rest = n - passed
    share, extra = divmod(rest, 4)
    return {"passed": passed, **{c: share + (i < extra) for i, c in enumerate(CLASSES[1:])}}


def scenes(n: int, passed_fraction: float, size: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(CLASSES, [counts(n, passed_fraction)[c] for c in CLASSES]))
    for label in labels:
        yield draw(str(label), size, rng)


def draw(label: str, size: int, rng: np.random.Generator) -> Scene:
    s = size / 64.0  # lengths below are pixels at 64 px
    big = size * SUPER
    k = SUPER * s  # output-64px units to drawing pixels
    board = tuple(int(c) for c in rng.uniform([20, 70, 35], [45, 110, 60]))
    img = Image.new("RGB", (big, big), board)
    d = ImageDraw.Draw(img)
    _board_details(d, big, k, rng)

    radius = rng.uniform(8.0, 10.5)  # the ring's outer radius
    clearance = rng.uniform(0.9, 1.4)
    seat_r = radius + clearance
    room = 32 - seat_r - 6
    cx, cy = 32 + rng.uniform(-room, room, 2)
    # The seat: a counterbore (a lighter rim), then the dark bore floor.
    rim = seat_r + rng.uniform(2.0, 3.0)
    d.ellipse(_circle(cx, cy, rim, k), fill=tuple(int(c * 1.35) for c in board))
    d.ellipse(_circle(cx, cy, seat_r, k), fill=tuple(int(v) for v in rng.uniform(15, 35, 3)))

    ux, uy = DIRECTION[label]
    shift = rng.uniform(2.0, 5.0)
    play = rng.uniform(-0.3, 0.3, 2)
    px = cx + ux * shift + (play[0] if ux == 0 else 0)
    py = cy + uy * shift + (play[1] if uy == 0 else 0)
    metal = rng.uniform(150, 215)
    tint = rng.uniform([0.95, 0.95, 0.9], [1.05, 1.02, 1.0])
    d.ellipse(_circle(px + 0.6, py + 0.8, radius, k), fill=(8, 12, 10))  # contact shadow
    d.ellipse(_circle(px, py, radius, k), fill=tuple(int(min(255, metal * t)) for t in tint))
    inner = radius * rng.uniform(0.45, 0.6)
    d.ellipse(_circle(px, py, (radius + inner) / 2, k), outline=tuple(int(min(255, metal * 1.15 * t)) for t in tint),
              width=max(1, int(0.8 * k)))  # a bright groove between race and bore
    d.ellipse(_circle(px, py, inner, k), fill=tuple(int(v) for v in rng.uniform(10, 30, 3)))
    notch = rng.uniform(0, 2 * math.pi)
    nx, ny = px + math.cos(notch) * (radius - 1.2), py + math.sin(notch) * (radius - 1.2)
    d.ellipse(_circle(nx, ny, 1.1, k), fill=tuple(int(metal * 0.35) for _ in range(3)))

    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2) * SUPER * s))
    img = img.resize((size, size), Image.BOX)
    pixels = _ring_light(np.asarray(img, dtype=np.float32), rng)
    pixels = _sensor(pixels, rng)
    return Scene(pixels, label, _box(px, py, radius, s, size), _box(cx, cy, seat_r, s, size))


def _box(x: float, y: float, r: float, s: float, size: int) -> tuple[float, float, float, float]:
    """x1, y1, x2, y2 of a circle at output size, clipped to the image, 2 decimals."""
    return tuple(round(float(np.clip(v * s, 0, size)), 2) for v in (x - r, y - r, x + r, y + r))


def _circle(x: float, y: float, r: float, k: float) -> tuple[float, float, float, float]:
    return ((x - r) * k, (y - r) * k, (x + r) * k, (y + r) * k)


def _board_details(d: ImageDraw.ImageDraw, big: int, k: float, rng: np.random.Generator) -> None:
    """Copper pads, traces, screw heads and silkscreen ticks where the seat may not be."""
    for _ in range(int(rng.integers(3, 7))):
        x, y = rng.uniform(0, 64, 2)
        w, h = rng.uniform(1.5, 4.0, 2)
        d.rectangle(((x - w) * k, (y - h) * k, (x + w) * k, (y + h) * k), fill=(176, 128, 60))
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = rng.uniform(0, 64, 2)
        horizontal = rng.random() < 0.5
        x1, y1 = (x0 + rng.uniform(-30, 30), y0) if horizontal else (x0, y0 + rng.uniform(-30, 30))
        d.line((x0 * k, y0 * k, x1 * k, y1 * k), fill=(60, 120, 70), width=max(1, int(0.9 * k)))
    for corner in ((4, 4), (60, 4), (4, 60), (60, 60)):
        x, y = np.array(corner) + rng.uniform(-1.5, 1.5, 2)
        d.ellipse(_circle(x, y, 2.6, k), fill=(170, 170, 165))
        d.line(((x - 1.6) * k, y * k, (x + 1.6) * k, y * k), fill=(70, 70, 70), width=max(1, int(0.5 * k)))
    for _ in range(int(rng.integers(2, 6))):
        x, y = rng.uniform(0, 64, 2)
        d.line((x * k, y * k, (x + rng.uniform(1, 4)) * k, y * k), fill=(235, 235, 225), width=max(1, int(0.6 * k)))


def _ring_light(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = pixels.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cx, cy = size / 2 + rng.normal(0, 0.08 * size, 2)
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (0.5 * size) ** 2
    gain = rng.uniform(0.85, 1.2) * (1.0 - rng.uniform(0.15, 0.4) * r2)
    return pixels * gain[..., None]


def _sensor(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel noise plus a level per 8x8 block, as a compressed camera stream shows."""
    size = pixels.shape[0]
    pixels = pixels + rng.normal(0, rng.uniform(2, 7), pixels.shape)
    blocks = -(-size // 8)
    level = rng.normal(0, rng.uniform(0, 3), (blocks, blocks, 1))
    pixels = pixels + np.kron(level, np.ones((8, 8, 1)))[:size, :size]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def write(out: str, n: int, passed_fraction: float, size: int, seed: int) -> int:
    """Parquet shards of PNG images with their `response`; returns the shard count."""
    os.makedirs(out, exist_ok=True)
    shards = -(-n // ROWS_PER_SHARD)
    it = scenes(n, passed_fraction, size, seed)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for k in range(shards):
        rows = [next(it) for _ in range(min(ROWS_PER_SHARD, n - k * ROWS_PER_SHARD))]
        encoded = []
        for i, row in enumerate(rows):
            buffer = io.BytesIO()
            Image.fromarray(row.image).save(buffer, format="PNG")
            encoded.append({"bytes": buffer.getvalue(), "path": f"{k * ROWS_PER_SHARD + i:05d}.png"})
        responses = [repr({"bboxes": [list(r.bbox)], "labels": [r.label]}) for r in rows]
        table = pa.table({"image": pa.array(encoded, image_type), "response": pa.array(responses, pa.string())})
        pq.write_table(table, os.path.join(out, f"data-{k:05d}-of-{shards:05d}.parquet"))
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--passed-fraction", type=float, default=0.02)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    if args.n < 5 or not 0 <= args.passed_fraction < 1 or args.size < 32:
        parser.error("--n takes 5 or more, --passed-fraction 0 to 1, --size 32 or more")
    shards = write(args.out, args.n, args.passed_fraction, args.size, args.seed)
    print(f"render3: {args.n} images in {shards} parquet shards under {args.out}")


if __name__ == "__main__":
    main()
