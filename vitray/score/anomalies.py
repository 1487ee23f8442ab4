"""The anomaly head in a scoring run (`vitray score --anomaly BANK`): its columns, overlays and counts.

The model stage (`vitray.inference`) adds each image's `anomaly_map` (its patches' distances to
the nearest good patch of the bank), `anomaly_score` (the largest) and `anomalous` (above the
bank's threshold). A committed piece stores them with its predictions, beside the anomaly
overlays under `anomaly/` (named as the attention overlays are), and sends the driver the
number of anomalous images. Outputs scored without a bank read these columns as null.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FOLDER = "anomaly"  # OUT/anomaly/<key>.png: the anomaly overlays


@dataclass(frozen=True)
class AnomalyPlan:
    """What the writer stage needs of the bank (pickled to the Ray tasks)."""

    bank: str  # the bank's URI
    grid: tuple[int, int]  # its encoder's patch grid
    threshold: float  # image score above which an image is anomalous
    good_level: float  # mean patch distance of held-out good images: transparent in an overlay
    overlays: str  # all | anomalous | none: which images get an overlay (from --attention)


def plan_of(bank: str, attention: str, size: int) -> AnomalyPlan:
    """The plan of a bank, checked against the model's input size on the driver (one line otherwise)."""
    from vitray.anomaly.bank import read_meta
    from vitray.errors import VitrayError

    meta = read_meta(bank)
    if int(meta.size) != int(size):
        raise VitrayError(f"--anomaly {bank}: its encoder takes {meta.size}x{meta.size} px images, the model "
                          f"{size}x{size}; fit the bank with an encoder of the model's input size")
    overlays = {"all": "all", "defects": "anomalous", "none": "none"}[attention]
    return AnomalyPlan(bank, (int(meta.grid[0]), int(meta.grid[1])), float(meta.threshold),
                       float(meta.good_patch_level), overlays)


def schema_fields() -> list[tuple[str, Any]]:
    import pyarrow as pa

    return [("anomaly_score", pa.float32()), ("anomalous", pa.bool_()), ("anomaly_map", pa.list_(pa.float32())),
            ("anomaly_shape", pa.list_(pa.int32())), ("anomaly_png", pa.string())]


def overlay_rows(batch: dict[str, np.ndarray], plan: AnomalyPlan | None, ok: np.ndarray,
                 key: Any) -> dict[int, str]:
    """Row → OUT-relative key of the rows that get an anomaly overlay; `key(id, folder)` names it."""
    if plan is None or plan.overlays == "none" or "image" not in batch or "anomaly_map" not in batch:
        return {}
    want = ok & ~np.isnan(np.asarray(batch["anomaly_map"], dtype=np.float32)).any(axis=1)
    if plan.overlays == "anomalous":
        want &= np.asarray(batch["anomalous"], dtype=bool)
    return {int(i): key(str(batch["id"][i]), FOLDER) for i in np.flatnonzero(want)}


def overlay_pngs(images: np.ndarray, maps: np.ndarray, plan: AnomalyPlan) -> list[bytes]:
    """PNGs of anomaly maps on their images: patches at the good level and below are clear, patches
    at the threshold's distance and above fully coloured (one scale for every image of the bank)."""
    from vitray.overlays import overlay_maps
    from vitray.png import encode

    heat = np.asarray(maps, dtype=np.float32).reshape(len(maps), *plan.grid) - plan.good_level
    span = max(plan.threshold - plan.good_level, 1e-6)
    return [encode(o) for o in overlay_maps(np.asarray(images, dtype=np.uint8), heat, peak=span)]


def prediction_columns(batch: dict[str, np.ndarray], rows: np.ndarray, pngs: dict[int, str],
                       plan: AnomalyPlan | None) -> dict[str, Any]:
    """The anomaly columns of the committed `rows` of a model-stage batch; nulls without a bank."""
    import pyarrow as pa

    n = len(rows)
    if plan is None or "anomaly_score" not in batch:
        return {name: pa.nulls(n, type_) for name, type_ in schema_fields()}
    maps = np.asarray(batch["anomaly_map"], dtype=np.float32)[rows]
    has = ~np.isnan(maps).any(axis=1) if n else np.zeros(0, dtype=bool)
    offsets = pa.array(np.arange(0, (n + 1) * maps.shape[1], maps.shape[1], dtype=np.int32))
    return {
        "anomaly_score": pa.array(np.asarray(batch["anomaly_score"], np.float32)[rows], pa.float32()),
        "anomalous": pa.array(np.asarray(batch["anomalous"], dtype=bool)[rows], pa.bool_()),
        "anomaly_map": pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(maps).ravel()),
                                                mask=pa.array(~has)),
        "anomaly_shape": pa.array([list(plan.grid) if h else None for h in has], pa.list_(pa.int32())),
        "anomaly_png": pa.array([pngs.get(int(i)) for i in rows], pa.string()),
    }


def anomalous_count(batch: dict[str, np.ndarray], rows: np.ndarray) -> int:
    """How many of the committed `rows` are anomalous (0 without a bank)."""
    if "anomalous" not in batch or not len(rows):
        return 0
    return int(np.asarray(batch["anomalous"], dtype=bool)[rows].sum())
