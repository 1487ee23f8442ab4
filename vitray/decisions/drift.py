"""Whether tonight's images are still like the ones the model was calibrated on.

The calibration keeps a reference: the top principal directions of the calibration images'
embeddings, their projections on those directions and their defect scores (a bounded sample).
A scoring run projects each image as the model sees it, keeps a bounded uniform sample of the
night (reservoir sampling: the driver's memory does not grow with the night), and at its end
compares the two samples direction by direction with the two-sample Kolmogorov-Smirnov test.
The night drifted when the smallest p-value, Bonferroni-corrected for the directions, is below
`alpha`. The population stability index of the defect scores is reported beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DIRECTIONS = 8  # principal directions compared
SAMPLE = 2000  # images kept of the reference and of a night
ALPHA = 0.01  # a stable night raises the alarm with at most this chance


@dataclass(frozen=True)
class Reference:
    """The calibration images as the drift test sees them."""

    mean: np.ndarray  # (D,)
    directions: np.ndarray  # (K, D), orthonormal rows
    projections: np.ndarray  # (N, K)
    scores: np.ndarray  # (N,) defect scores

    @classmethod
    def fit(cls, embeddings: np.ndarray, scores: np.ndarray, seed: int = 0) -> "Reference":
        x = np.asarray(embeddings, np.float64)
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        directions = vt[:min(DIRECTIONS, vt.shape[0])]
        keep = np.random.default_rng(seed).permutation(len(x))[:SAMPLE]
        projections = (x[keep] - mean) @ directions.T
        return cls(mean.astype(np.float32), directions.astype(np.float32), projections.astype(np.float32),
                   np.asarray(scores, np.float32)[keep])

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        return ((np.asarray(embeddings, np.float32) - self.mean) @ self.directions.T).astype(np.float32)


@dataclass
class NightSample:
    """A uniform sample of at most SAMPLE of a night's (projection, score) pairs, however many come."""

    seed: int = 0
    size: int = SAMPLE
    seen: int = 0
    projections: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def add(self, projections: np.ndarray, scores: np.ndarray) -> None:
        for p, s in zip(np.asarray(projections, np.float32), np.asarray(scores, np.float32)):
            if not np.isfinite(p).all() or not np.isfinite(s):
                continue  # an image that could not be read
            self.seen += 1
            if len(self.scores) < self.size:
                self.projections.append(p)
                self.scores.append(float(s))
            else:
                j = int(self._rng.integers(self.seen))
                if j < self.size:
                    self.projections[j], self.scores[j] = p, float(s)


def compare(reference: Reference, night: NightSample, alpha: float = ALPHA) -> dict[str, object]:
    """The drift test of a night against the reference: statistics, p-value, PSI and the alarm."""
    from scipy.stats import ks_2samp

    if len(night.scores) < 20:
        return {"images": night.seen, "tested": False, "drifted": False,
                "why": "too few images to test (fewer than 20)"}
    sample = np.stack(night.projections)
    tests = [ks_2samp(reference.projections[:, k], sample[:, k]) for k in range(sample.shape[1])]
    p_min = min(float(t.pvalue) for t in tests)
    p_value = min(1.0, p_min * len(tests))
    return {"images": night.seen, "sample": len(night.scores), "tested": True,
            "ks": [round(float(t.statistic), 4) for t in tests], "p_value": p_value, "alpha": alpha,
            "psi": round(psi(reference.scores, np.array(night.scores)), 4), "drifted": p_value < alpha}


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `actual` against `expected`, in bins of the expected quantiles."""
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)))
    if len(edges) < 3:
        return 0.0
    e = np.histogram(np.clip(expected, edges[0], edges[-1]), edges)[0] / len(expected)
    a = np.histogram(np.clip(actual, edges[0], edges[-1]), edges)[0] / max(1, len(actual))
    e, a = np.clip(e, 1e-4, None), np.clip(a, 1e-4, None)
    return float(((a - e) * np.log(a / e)).sum())
