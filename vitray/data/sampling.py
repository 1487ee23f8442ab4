"""Which images a run trains and validates on, and how often: stratified splits, class balance."""
from __future__ import annotations

import numpy as np


def stratified_split(ids: list[str], labels: np.ndarray, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split ids so that every class keeps its share in validation (at least one image each)."""
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        k = int(round(fraction * len(members)))
        k = min(max(k, 1), len(members) - 1) if len(members) > 1 else 0
        val.extend(members[:k].tolist())
    chosen = np.zeros(len(ids), dtype=bool)
    chosen[val] = True
    return [i for i, v in zip(ids, chosen) if not v], [i for i, v in zip(ids, chosen) if v]


def balanced_rates(counts: np.ndarray) -> list[float]:
    """How many times per epoch, on average, each image of a class is drawn so that every
    class present gets an equal share of an epoch of the same length (`--class-weights auto`).

    A class at 1/50 of the data is drawn ~10x per epoch (5 classes), each time with its own
    augmentation, and the common ones ~0.8x. Measured against inverse-frequency loss weights
    on the inspection images (docs/benchmarks.md): the few rare images, each seen once an
    epoch at ten times the weight, gave noisy steps and a passed recall of 0.5 to 0.95 from
    run to run.
    """
    # The inverse-frequency numbers of the loss weights, used as rates: N / (classes · count).
    return class_weights(counts)


def class_weights(counts: np.ndarray) -> list[float]:
    """Inverse-frequency loss weights (`--class-weights loss`), normalised so that the average image weighs 1.

    A class at 1/50 of the data then weighs ~10x a common one, which is what
    lets the rare `passed` class be learned instead of ignored.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights.round(6).tolist()
