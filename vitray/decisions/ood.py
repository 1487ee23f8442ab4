"""How unlike the calibration images an image is, from the model's own features.

Two standard scores, both larger for stranger images. Mahalanobis: the squared distance of
the image's embedding (the classifier's input, the [CLS] token after the final layer norm) to
the nearest class mean under one covariance shared by the classes (Lee et al. 2018), with
Ledoit-Wolf shrinkage so that a few hundred images per class give a usable inverse. Energy: the
negative log-sum-exp of the logits (Liu et al. 2020), which needs no fitting. The threshold is
the conformal quantile of held-out in-distribution scores: an in-distribution image exceeds it
with probability at most the chosen rate (docs/decisions.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("mahalanobis", "energy")


@dataclass(frozen=True)
class Gaussians:
    """Class means (C, D) and the shared precision matrix (D, D), float32."""

    means: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray) -> "Gaussians":
        from sklearn.covariance import LedoitWolf

        x = np.asarray(embeddings, np.float64)
        y = np.asarray(labels)
        classes = np.unique(y)
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        full = np.zeros((int(classes.max()) + 1, x.shape[1]))
        full[:] = np.nan  # a class without images has no mean: never the nearest
        full[classes] = means
        return cls(full.astype(np.float32), precision.astype(np.float32))

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, per image."""
        x = np.asarray(embeddings, np.float32)
        best = np.full(len(x), np.inf, np.float32)
        for mean in self.means:
            if np.isnan(mean).any():
                continue
            d = x - mean
            best = np.minimum(best, np.einsum("ij,jk,ik->i", d, self.precision, d))
        return best


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """-T log sum exp(logits / T): larger where the model is less sure of any class."""
    z = np.asarray(logits, np.float64) / temperature
    top = z.max(axis=1, keepdims=True)
    return (-(temperature * (top[:, 0] + np.log(np.exp(z - top).sum(axis=1))))).astype(np.float32)


def conformal_threshold(scores: np.ndarray, rate: float) -> float:
    """The ceil((n + 1)(1 - rate))-th smallest held-out score: a new in-distribution image's score
    exceeds it with probability at most `rate` (exchangeability); +inf when n is too small."""
    s = np.sort(np.asarray(scores, np.float64))
    rank = int(np.ceil((len(s) + 1) * (1 - rate)))
    return float("inf") if rank > len(s) else float(s[rank - 1])


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The chance that an outside image scores above an inside one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))
