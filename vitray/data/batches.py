"""What a training worker does to its rows before the steps: class balance and augmentation, seeded.

Each worker reads its shard in windows of a few batches. A window is resampled so that
every class gets an equal share (`--class-weights auto`), augmented (`--augment auto`),
shuffled and cut into the steps' batches. The random draws come from a generator seeded
by the run's seed, the epoch, the worker's rank and the window's content, so the same
command on the same data and workers trains on the same batches; the draws are new every
epoch. Done here rather than in Ray Data tasks because only the worker knows the epoch;
Ray Data's prefetch thread runs it while the model computes.
"""
from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np

from vitray.data.preprocess import AugmentConfig, augment_batch

WINDOW_STEPS = 8  # batches per window: a rare image's copies spread over this many steps


def window_rng(seed: int, epoch: int, rank: int, batch: dict[str, np.ndarray]) -> np.random.Generator:
    """The generator of one window: the same rows in the same epoch on the same rank draw the same."""
    content = zlib.crc32(np.ascontiguousarray(batch["label"]).tobytes())
    content = zlib.crc32(np.ascontiguousarray(batch["image"]).tobytes(), content)
    return np.random.default_rng([seed, epoch, rank, content])


def balance_window(batch: dict[str, np.ndarray], rates: Sequence[float], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The same number of rows, each class drawn at its rate (`vitray.data.sampling.balanced_rates`).

    Every row appears the floor of its rate times, plus once more with the probability of
    the fraction; the window is then trimmed or topped up at random to its own length, so
    that an epoch has the same steps on every rank. Rows come out grouped (the caller shuffles).
    """
    n = len(batch["label"])
    rate = np.asarray(rates, dtype=np.float64)[np.asarray(batch["label"], dtype=np.int64)]
    if n == 0 or rate.sum() <= 0:
        return batch
    repeats = np.floor(rate).astype(np.int64) + (rng.random(n) < rate - np.floor(rate))
    index = np.repeat(np.arange(n), repeats)
    if len(index) > n:
        index = rng.choice(index, n, replace=False)
    elif len(index) < n:
        index = np.concatenate([index, rng.choice(n, n - len(index), p=rate / rate.sum())])
    return {k: v[index] for k, v in batch.items()}


def make_collate(rates: Sequence[float] | None, augment: AugmentConfig | None, seed: int, epoch: int,
                 rank: int, box_grid: tuple[int, int] | None = None) -> Any:
    """A Ray Data collate function (numpy window in, uint8 images and long labels as tensors out).

    With `box_grid` (the model's patch rows and columns) the window's `bbox` column, moved by
    the augmentation with its image, comes out as `box_overlap`: each patch's share inside
    the box (`vitray.localisation.box_overlaps`), what the box-attention term needs.
    """
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    from vitray.localisation import box_overlaps

    columns = ("image", "label", "bbox") if box_grid is not None else ("image", "label")

    class TrainingWindow(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            rng = window_rng(seed, epoch, rank, batch)
            batch = {k: batch[k] for k in columns}
            if rates is not None:
                batch = balance_window(batch, rates, rng)
            if augment is not None:
                batch = augment_batch(batch, augment, seed=rng)
            order = rng.permutation(len(batch["label"]))
            out = {"image": torch.from_numpy(np.ascontiguousarray(batch["image"][order])),
                   "label": torch.from_numpy(np.asarray(batch["label"][order], dtype=np.int64))}
            if box_grid is not None:
                side = batch["image"].shape[1:3]
                out["box_overlap"] = torch.from_numpy(
                    box_overlaps(batch["bbox"][order], box_grid, side).astype(np.float32))
            return out

    return TrainingWindow()


def steps_per_epoch(rows: int, world: int, batch_size: int) -> int:
    """Steps each rank takes over an epoch of `rows` images split equally, in whole windows and batches."""
    per_rank = rows // world
    window = batch_size * WINDOW_STEPS
    return max(1, (per_rank // window) * WINDOW_STEPS + (per_rank % window) // batch_size)
