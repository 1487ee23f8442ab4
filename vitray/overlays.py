"""Attention maps drawn on images: one captioned overlay for a person, or a batch for `vitray score`."""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    label: str | None = None,
    score: float | None = None,
    min_side: int = 224,
    alpha: float = 0.6,
) -> Image.Image:
    """Blend a colour-mapped attention map onto `image` → RGB PIL image.

    `image` is H×W or H×W×C uint8 (C = 1 grey, 3 RGB, 4 RGBA; other channel
    counts show their first channel). Images whose short side is below
    `min_side` are first enlarged by a whole factor (nearest, so pixels stay
    crisp). The blend is `overlay_maps`'. `label` and `score` go in the top-left
    corner on a dark box.
    """
    from PIL import Image

    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        factor = math.ceil(min_side / min(h, w))
        rgb = np.asarray(Image.fromarray(rgb).resize((w * factor, h * factor), Image.Resampling.NEAREST))
    heat = np.asarray(amap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"attention map must be 2-D (rows, cols), got shape {heat.shape}")
    out = Image.fromarray(overlay_maps(rgb[None], heat[None], alpha)[0])
    text = " ".join(
        part for part in (label, None if score is None else f"{score:.2f}") if part is not None
    )
    if text:
        _draw_caption(out, text)
    return out


def overlay_maps(images: np.ndarray, maps: np.ndarray, alpha: float = 0.6, peak: float | None = None) -> np.ndarray:
    """Maps (B, rows, cols) blended onto images (B, H, W, C) uint8 → RGB (B, H, W, 3) uint8.

    C = 3 or 4 shows the image's colours, any other channel count its first channel.

    Each map, scaled to [0, 1] by its max (or by `peak`, the same for every map, values above
    it clipped; negative and NaN cells count as 0), is
    upsampled bilinearly to H×W (pixel centres, edges clamped) and coloured with
    matplotlib's "jet"; the colour c is blended per pixel as (1 - a)·image + a·c with
    a = alpha·heat, in 8 bits as PIL's composite rounds it: where the model did not look,
    the part stays visible. Vectorised over the batch: the bulk overlays of `vitray score`
    are drawn a piece at a time.
    """
    images = np.asarray(images)
    heat = np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float32)), 0.0, None)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"overlay_maps needs (B, H, W, C) uint8 images, got {images.dtype} {images.shape}")
    images = _channels_as_rgb(images)
    if heat.ndim != 3 or heat.shape[0] != images.shape[0]:
        raise ValueError(f"overlay_maps needs one (rows, cols) map per image, got {heat.shape}")
    _, h, w, _ = images.shape
    scale = heat.max(axis=(1, 2), keepdims=True) if peak is None else np.full((len(heat), 1, 1), peak, np.float32)
    heat = np.divide(heat, scale, out=np.zeros_like(heat), where=scale > 0)
    up = np.clip(_linear_weights(heat.shape[1], h) @ heat @ _linear_weights(heat.shape[2], w).T, 0.0, 1.0).ravel()
    # Indexed as matplotlib quantises [0, 1] into its table.
    level = np.minimum(up * _JET_LEVELS, _JET_LEVELS - 1).astype(np.uint8)
    a = np.rint(alpha * 255.0 * up).astype(np.uint16)
    keep = 255 - a
    # One channel at a time over flat pixel rows: numpy's loops over a trailing axis of 3 with
    # a broadcast weight ran slower than these (docs/benchmarks.md#what-the-scoring-rate-rests-on).
    pixels = images.reshape(-1, 3)
    out = np.empty_like(pixels)
    for c, table in enumerate(_jet_channels()):
        t = pixels[:, c] * keep
        t += table.take(level) * a
        t += 128
        t += t >> 8  # t / 255, rounded, without a division
        t >>= 8
        out[:, c] = t
    return out.reshape(images.shape)


@functools.lru_cache(maxsize=32)
def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation between pixel centres, clamped at the edges."""
    centre = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    lower = np.floor(centre).astype(np.int64)
    upper = np.minimum(lower + 1, n_in - 1)
    frac = (centre - lower).astype(np.float32)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, lower), 1.0 - frac)
    np.add.at(weights, (rows, upper), frac)
    return weights


_JET_LEVELS = 256  # entries of matplotlib's "jet" lookup table


@functools.lru_cache(maxsize=1)
def _jet_channels() -> np.ndarray:
    """matplotlib's "jet" table as (3, 256) uint16, one contiguous row per channel (integers index its table)."""
    from matplotlib import colormaps

    return np.ascontiguousarray(np.rint(colormaps["jet"](np.arange(_JET_LEVELS))[:, :3] * 255.0).astype(np.uint16).T)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"overlay needs a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"overlay needs an HxW or HxWxC image, got shape {image.shape}")
    return _channels_as_rgb(image)


def _channels_as_rgb(images: np.ndarray) -> np.ndarray:
    """Channels-last uint8 (..., C) → (..., 3): RGB(A) keeps its colours, other counts show channel 0."""
    if images.shape[-1] in (3, 4):
        return np.ascontiguousarray(images[..., :3])
    return np.repeat(images[..., :1], 3, axis=-1)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    """PIL's default font at `size` px (loading it is most of a caption's cost)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _draw_caption(image: Image.Image, text: str) -> None:
    from PIL import ImageDraw

    size = max(12, min(image.size) // 14)
    font = _font(size)
    draw = ImageDraw.Draw(image)
    pad = max(2, size // 4)
    left, top, right, bottom = draw.textbbox((pad, pad), text, font=font)
    draw.rectangle((0, 0, right + pad, bottom + pad), fill=(0, 0, 0))
    draw.text((pad, pad), text, fill=(255, 255, 255), font=font)
