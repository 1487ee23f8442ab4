"""How well a map points at a labelled box: the pointing game and the energy in the box."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
    x1, y1, x2, y2 = _as_box(bbox)
    rows, cols = heat.shape
    height, width = image_hw
    total = heat.sum()
    if total <= 0:
        return 0.0
    # Overlap is separable: (share of each column's width) × (share of each row's height).
    overlap_x = _interval_overlap(np.arange(cols + 1) * width / cols, x1, x2)
    overlap_y = _interval_overlap(np.arange(rows + 1) * height / rows, y1, y2)
    return float((heat * np.outer(overlap_y, overlap_x)).sum() / total)


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


def _interval_overlap(edges: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fraction of each interval [edges[i], edges[i+1]] covered by [lo, hi]."""
    covered = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)
    return covered / np.diff(edges)
