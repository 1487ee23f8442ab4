"""How well a map points at a labelled box: the pointing game and the energy in the box, and
the training term that keeps a map there (`box_attention_loss`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# The share of a map's mass that the box-attention term asks to find in the box.
BOX_SHARE = 0.5


def pointing_game(amap: np.ndarray, bbox: Sequence[float], image_hw: tuple[int, int]) -> bool:
    """True if the centre of the map's highest cell lies in `bbox` (x1, y1, x2, y2).

    The map's grid is taken to cover the whole image of size `image_hw` = (H, W)
    (the model input was a resize, not a crop), so cell (r, c) has its centre at
    ((c + 0.5)·W/cols, (r + 0.5)·H/rows). The box edges count as inside; on ties
    the first cell in row-major order is the highest.
    """
    heat = _as_map(amap)
    x1, y1, x2, y2 = _as_box(bbox)
    rows, cols = heat.shape
    height, width = image_hw
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    x = (c + 0.5) * width / cols
    y = (r + 0.5) * height / rows
    return bool(x1 <= x <= x2 and y1 <= y <= y2)


def energy_in_box(amap: np.ndarray, bbox: Sequence[float], image_hw: tuple[int, int]) -> float:
    """Share of the map's mass inside `bbox` (x1, y1, x2, y2), in [0, 1].

    Each cell of the map is a rectangle of the image (grid over the whole image,
    as in `pointing_game`) and counts with the fraction of its area that the box
    covers: energy = Σ map·overlap / Σ map. This is exact for the map held
    constant over each cell (nearest upsampling), with no resampling. Negative
    values count as 0; a map with no mass has energy 0.
    """
    heat = np.clip(_as_map(amap), 0.0, None)
    total = heat.sum()
    if total <= 0:
        return 0.0
    overlap = box_overlaps(np.asarray([_as_box(bbox)]), heat.shape, image_hw)[0]
    return float((heat.ravel() * overlap).sum() / total)


def box_overlaps(boxes: np.ndarray, grid: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """(B, rows·cols) share of each map cell's area inside each box (x1, y1, x2, y2), row-major.

    The grid covers the whole image of size `image_hw` = (H, W), as in `pointing_game`. A box
    with a NaN coordinate (no box known) covers nothing: its row is all zero.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    rows, cols = grid
    height, width = image_hw
    # Overlap is separable: (share of each column's width) x (share of each row's height).
    overlap_x = _interval_overlap(np.arange(cols + 1) * width / cols, boxes[:, 0:1], boxes[:, 2:3])
    overlap_y = _interval_overlap(np.arange(rows + 1) * height / rows, boxes[:, 1:2], boxes[:, 3:4])
    overlap = np.nan_to_num(overlap_y[:, :, None] * overlap_x[:, None, :], nan=0.0)
    return overlap.reshape(len(boxes), rows * cols)


def box_attention_loss(maps: torch.Tensor, overlaps: torch.Tensor, share: float = BOX_SHARE) -> torch.Tensor:
    """The training term that keeps a map on its image's box: mean of max(0, log(share) - log(energy)).

    `maps` (B, cells) are attention maps (rollout's, differentiable), `overlaps` the matching
    `box_overlaps`. An image whose map holds at least `share` of its mass in the box adds
    nothing: the rest of the map is free to go where the evidence is (a shift shows in the
    gap beside the part). Images without a box (an all-zero row) do not count; zero when
    none has one.
    """
    import math

    import torch

    overlaps = overlaps.to(maps.dtype)
    known = overlaps.sum(dim=-1) > 0
    if not bool(known.any()):
        return maps.sum() * 0.0  # keeps the graph (DDP expects every step to reach the same parameters)
    maps = maps[known].clamp(min=0)
    energy = (maps * overlaps[known]).sum(dim=-1) / maps.sum(dim=-1).clamp(min=torch.finfo(maps.dtype).tiny)
    return torch.relu(math.log(share) - torch.log(energy.clamp(min=1e-6))).mean()


def _as_map(amap: np.ndarray) -> np.ndarray:
    heat = np.asarray(amap, dtype=np.float64)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"attention map must be a non-empty 2-D (rows, cols) array, got shape {heat.shape}")
    return heat


def _as_box(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    if len(bbox) != 4:
        raise ValueError(f"bbox must be x1, y1, x2, y2, got {list(bbox)}")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return x1, y1, x2, y2


def _interval_overlap(edges: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Fraction of each interval [edges[i], edges[i+1]] covered by [lo, hi] (one row per lo, hi)."""
    covered = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)
    return covered / np.diff(edges)
