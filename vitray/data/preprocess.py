"""Preprocessing shared by train, evaluate and score, and the training augmentation.

Images travel as uint8 (B, S, S, C) at the model's size: `resize_batch` makes
them (in Ray Data tasks), `normalize` turns them into the model's float input
(on the worker or the inference actor). Augmentation is label-aware: a flip
that mirrors a defect maps its label too, and is not used when no mirror exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vitray.domain import INSPECTION, Domain


def resize_image(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """One HxWxC uint8 image → size x size x channels uint8 (PIL bilinear, antialiased)."""
    from PIL import Image

    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        pil = Image.fromarray(image[:, :, 0], mode="L")
    else:
        pil = Image.fromarray(image[:, :, :3], mode="RGB")
    if channels == 1 and pil.mode != "L":
        pil = pil.convert("L")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    out = np.asarray(pil, dtype=np.uint8)
    if out.ndim == 2:
        out = out[:, :, None]
    if channels == 3 and out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return out


def scale_boxes(boxes: np.ndarray, shapes: Sequence[tuple[int, int]], size: int) -> np.ndarray:
    """Boxes in each image's own pixels → pixels of the size x size model input."""
    boxes = np.asarray(boxes, dtype=np.float32).copy()
    for i, (h, w) in enumerate(shapes):
        boxes[i, [0, 2]] *= size / w
        boxes[i, [1, 3]] *= size / h
    return boxes


def resize_batch(batch: dict[str, np.ndarray], size: int, channels: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: `image` column (any sizes) → uint8 (B, size, size, channels); boxes follow."""
    images = batch["image"]
    shapes = [img.shape[:2] for img in images]
    out = dict(batch)
    out["image"] = np.stack([resize_image(img, size, channels) for img in images]) if len(images) else \
        np.zeros((0, size, size, channels), np.uint8)
    if "bbox" in batch:
        out["bbox"] = scale_boxes(batch["bbox"], shapes, size) if len(images) else batch["bbox"]
    return out


def normalize(images: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """uint8 (B, S, S, C) torch tensor → float32 (B, C, S, S), scaled to [0,1] and normalised."""
    import torch

    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def flip_maps(labels: Sequence[str], domain: Domain = INSPECTION
              ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Label-id maps for horizontal and vertical flips, or None where a flip is unsafe.

    Flips are only used for the domain's classes, whose mirror images are known; any
    other class list (digits, say) gets no flips at all.
    """
    if not labels or not set(labels) <= set(domain.classes):
        return None, None
    index = {name: i for i, name in enumerate(labels)}

    def mapping(pairs: dict[str, str]) -> np.ndarray | None:
        if any(name in pairs and pairs[name] not in index for name in labels):
            return None  # e.g. Xplus present without Xminus: the flip would invent a class
        return np.array([index[pairs.get(name, name)] for name in labels], dtype=np.int64)

    return mapping(domain.mirror(domain.hflip_pairs)), mapping(domain.mirror(domain.vflip_pairs))


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; every random change keeps the label true."""

    hflip: tuple[int, ...] | None = None  # label map for a horizontal flip, None = no flips
    vflip: tuple[int, ...] | None = None
    max_shift: float = 0.0625  # random translation, as a share of the image side
    rotate: float = 10.0  # random rotation about the centre, up to this many degrees either way
    scale: float = 0.1  # random zoom by a factor in [1 - scale, 1 + scale]
    brightness: float = 0.15  # multiplicative jitter range
    contrast: float = 0.15

    @classmethod
    def for_labels(cls, labels: Sequence[str], domain: Domain = INSPECTION) -> "AugmentConfig":
        h, v = flip_maps(labels, domain)
        # The domain's classes are displacements of a given size along an axis: a zoom changes the
        # size and a turn mixes the axes, so they get neither (docs/benchmarks.md#inspection-images).
        geometric = bool(labels) and set(labels) <= set(domain.classes)
        return cls(hflip=tuple(h) if h is not None else None, vflip=tuple(v) if v is not None else None,
                   **({"rotate": 0.0, "scale": 0.0} if geometric else {}))


def augment_batch(batch: dict[str, np.ndarray], config: AugmentConfig, seed: int | None = None) -> dict[str, np.ndarray]:
    """Ray Data UDF on resized uint8 batches: label-aware flips, small turns and zooms, shifts, lighting."""
    rng = np.random.default_rng(seed)
    images = batch["image"].copy()
    labels = batch["label"].copy()
    boxes = batch["bbox"].copy() if "bbox" in batch else np.full((len(images), 4), np.nan, np.float32)
    n, size = len(images), images.shape[1] if len(images) else 0
    if n == 0:
        return batch
    if config.hflip is not None:
        flip = rng.random(n) < 0.5
        images[flip] = images[flip, :, ::-1]
        labels[flip] = np.asarray(config.hflip)[labels[flip]]
        boxes[flip] = np.stack([size - boxes[flip, 2], boxes[flip, 1], size - boxes[flip, 0], boxes[flip, 3]], 1)
    if config.vflip is not None:
        flip = rng.random(n) < 0.5
        images[flip] = images[flip, ::-1]
        labels[flip] = np.asarray(config.vflip)[labels[flip]]
        boxes[flip] = np.stack([boxes[flip, 0], size - boxes[flip, 3], boxes[flip, 2], size - boxes[flip, 1]], 1)
    if config.rotate or config.scale:
        images, boxes = _affine(images, boxes, config.rotate, config.scale, rng)
    # At least one pixel when shifts are on: small images (8x8 digits) need them most.
    limit = max(1, int(round(config.max_shift * size))) if config.max_shift > 0 else 0
    if limit > 0:
        images, boxes = _shift(images, boxes, limit, rng)
    if config.brightness or config.contrast:
        x = images.astype(np.float32)
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        c = 1.0 + rng.uniform(-config.contrast, config.contrast, (n, 1, 1, 1))
        b = 1.0 + rng.uniform(-config.brightness, config.brightness, (n, 1, 1, 1))
        images = np.clip(((x - mean) * c + mean) * b, 0, 255).astype(np.uint8)
    out = dict(batch)
    out.update(image=np.ascontiguousarray(images), label=labels)
    if "bbox" in batch:
        out["bbox"] = boxes.astype(np.float32)
    return out


def _shift(images: np.ndarray, boxes: np.ndarray, limit: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Translate each image by up to `limit` px (edge pixels repeated), never moving a box out of view."""
    n, size = len(images), images.shape[1]
    lo = np.full((n, 2), -limit, dtype=np.int64)
    hi = np.full((n, 2), limit, dtype=np.int64)
    known = ~np.isnan(boxes).any(axis=1)
    # A box may only move as far as the border allows (x then y).
    lo[known, 0] = np.maximum(lo[known, 0], np.ceil(-boxes[known, 0]).astype(np.int64))
    hi[known, 0] = np.minimum(hi[known, 0], np.floor(size - boxes[known, 2]).astype(np.int64))
    lo[known, 1] = np.maximum(lo[known, 1], np.ceil(-boxes[known, 1]).astype(np.int64))
    hi[known, 1] = np.minimum(hi[known, 1], np.floor(size - boxes[known, 3]).astype(np.int64))
    hi = np.maximum(hi, lo)
    dx = rng.integers(lo[:, 0], hi[:, 0] + 1)
    dy = rng.integers(lo[:, 1], hi[:, 1] + 1)
    padded = np.pad(images, ((0, 0), (limit, limit), (limit, limit), (0, 0)), mode="edge")
    # Gather rows/cols per image: output pixel (y, x) comes from (y - dy, x - dx).
    rows = (np.arange(size)[None, :] - dy[:, None] + limit)[:, :, None]
    cols = (np.arange(size)[None, :] - dx[:, None] + limit)[:, None, :]
    shifted = padded[np.arange(n)[:, None, None], rows, cols]
    boxes = boxes.copy()
    boxes[:, [0, 2]] += dx[:, None]
    boxes[:, [1, 3]] += dy[:, None]
    return shifted, boxes


def _affine(images: np.ndarray, boxes: np.ndarray, degrees: float, scale: float,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rotate and zoom each image about its centre (bilinear, edge pixels repeated).

    An image whose box the transform would move out of view keeps its pixels: the part is never
    cut away. Boxes become the axis-aligned hull of their transformed corners.
    """
    n, size = len(images), images.shape[1]
    angle = np.deg2rad(rng.uniform(-degrees, degrees, n))
    zoom = 1.0 + rng.uniform(-scale, scale, n)
    cos, sin = np.cos(angle) * zoom, np.sin(angle) * zoom
    c = np.float32((size - 1) / 2.0)
    # Forward map of the box corners: p' = zoom * R(angle) (p - c) + c.
    xs = boxes[:, [0, 2, 2, 0]] - c
    ys = boxes[:, [1, 1, 3, 3]] - c
    fx = cos[:, None] * xs - sin[:, None] * ys + c
    fy = sin[:, None] * xs + cos[:, None] * ys + c
    moved = np.stack([fx.min(1), fy.min(1), fx.max(1), fy.max(1)], 1)
    known = ~np.isnan(boxes).any(axis=1)
    out_of_view = known & ((moved[:, :2] < 0).any(1) | (moved[:, 2:] > size).any(1))
    angle[out_of_view], zoom[out_of_view] = 0.0, 1.0
    cos, sin = (np.cos(angle) / zoom).astype(np.float32), (np.sin(angle) / zoom).astype(np.float32)
    boxes = np.where((known & ~out_of_view)[:, None], moved, boxes).astype(np.float32)
    # Inverse map of every output pixel to its source: q = R(-angle) (p - c) / zoom + c.
    grid = np.arange(size, dtype=np.float32) - c
    gx, gy = grid[None, None, :], grid[None, :, None]
    sx = np.clip(cos[:, None, None] * gx + sin[:, None, None] * gy + c, 0, size - 1)
    sy = np.clip(-sin[:, None, None] * gx + cos[:, None, None] * gy + c, 0, size - 1)
    x0, y0 = sx.astype(np.int32), sy.astype(np.int32)  # coordinates are >= 0: truncation is floor
    x1, y1 = np.minimum(x0 + 1, size - 1), np.minimum(y0 + 1, size - 1)
    wx, wy = (sx - x0)[..., None], (sy - y0)[..., None]
    flat = images.reshape(n * size * size, -1)
    base = (np.arange(n, dtype=np.int32) * size * size)[:, None, None]
    row0, row1 = base + y0 * size, base + y1 * size
    top = flat[row0 + x0] * (1 - wx) + flat[row0 + x1] * wx
    bottom = flat[row1 + x0] * (1 - wx) + flat[row1 + x1] * wx
    warped = np.rint(top * (1 - wy) + bottom * wy).astype(np.uint8)
    return warped, boxes
