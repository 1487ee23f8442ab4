"""Calibrated probabilities (temperature scaling) and the OK / NG thresholds with their guarantees.

The defect score of an image is the calibrated probability that it is not OK: 1 - p(OK class).
An image is decided OK at or below `t_ok`, NG at or above `t_ng`, REVIEW between. `t_ok` is the
largest threshold whose escape rate (defective images at or below it) has an upper confidence
bound at most the target; `t_ng` the smallest whose false-reject rate (OK images at or above it)
has one at most its target. The bound is Clopper and Pearson's exact binomial upper bound; since
both rates are monotone in the threshold, the scan keeps the guarantee (a risk-controlling
prediction set, Bates et al. 2021): with probability at least the confidence, over the draw of
the calibration images, the rate on new images from the same distribution is at most the target.
docs/decisions.md has the formulas and the assumption (the night's images exchangeable with the
calibration set's).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that minimises the negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_p[np.arange(len(labels)), labels].mean())

    found = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                            options={"xatol": 1e-4})
    return float(np.exp(found.x))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-label confidence, in equal-width bins (Guo et al. 2017)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """Per bin of top-label confidence: its mean confidence, its accuracy and its share of images."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows: dict[str, list[float]] = {"confidence": [], "accuracy": [], "share": []}
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows["confidence"].append(float(confidence[inside].mean()))
            rows["accuracy"].append(float(correct[inside].mean()))
            rows["share"].append(float(inside.mean()))
    return rows


def upper_bound(k: int | np.ndarray, n: int, confidence: float) -> np.ndarray:
    """Clopper-Pearson upper bound of a binomial rate: k events in n trials, at `confidence`."""
    from scipy.stats import beta

    k = np.asarray(k, np.float64)
    if n == 0:
        return np.ones_like(k)
    bound = beta.ppf(confidence, k + 1, n - k)
    return np.where(k >= n, 1.0, bound)


def interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a rate (for reporting)."""
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    a = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


@dataclass(frozen=True)
class Thresholds:
    """Where OK ends and NG begins on the defect score; None where no threshold meets its bound."""

    ok: float | None  # decided OK at or below; None: no image is decided OK
    ng: float | None  # decided NG at or above; None: no image is decided NG


def choose_thresholds(defect_score: np.ndarray, is_defect: np.ndarray, escape_rate: float,
                      false_reject_rate: float, confidence: float) -> Thresholds:
    """The two thresholds whose rates' upper bounds at `confidence` are within their targets."""
    score = np.asarray(defect_score, np.float64)
    defect = np.asarray(is_defect, bool)
    bad, good = np.sort(score[defect]), np.sort(score[~defect])
    ok = _largest_within(bad, escape_rate, confidence)
    ng = _smallest_within(good, false_reject_rate, confidence)
    return Thresholds(ok, ng)


def _largest_within(bad: np.ndarray, target: float, confidence: float) -> float | None:
    """The largest t whose bound on P(defective score <= t) is within target (`bad` ascending).

    Just under bad[i], i defective scores lie at or below the threshold (ties counted against
    it). The bound grows with i, so the thresholds within target are a prefix of the candidates.
    """
    count = _prefix_within(len(bad), target, confidence)
    if count is None:
        return None
    return 1.0 if count == len(bad) else float(np.nextafter(bad[count], -np.inf))


def _smallest_within(good: np.ndarray, target: float, confidence: float) -> float | None:
    """The smallest t whose bound on P(OK score >= t) is within target (`good` ascending)."""
    count = _prefix_within(len(good), target, confidence)
    if count is None:
        return None
    descending = good[::-1]  # just above descending[i], i OK scores lie at or above the threshold
    return 0.0 if count == len(good) else float(np.nextafter(descending[count], np.inf))


def _prefix_within(n: int, target: float, confidence: float) -> int | None:
    """The largest count k of n whose upper bound is within target (None: not even k = 0)."""
    if n == 0:
        return None
    within = upper_bound(np.arange(n + 1), n, confidence) <= target
    if not within[0]:
        return None
    return n if within.all() else int(np.argmin(within)) - 1


def rates(defect_score: np.ndarray, is_defect: np.ndarray, thresholds: Thresholds,
          confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """Escape, false-reject and review rates of the thresholds on a labelled set, with intervals."""
    score = np.asarray(defect_score, np.float64)
    defect = np.asarray(is_defect, bool)
    decided = decide_scores(score, thresholds)
    out = {}
    for name, hits, among in (("escape", (decided == "ok") & defect, defect),
                              ("false_reject", (decided == "ng") & ~defect, ~defect),
                              ("review", decided == "review", np.ones_like(defect))):
        k, n = int(hits.sum()), int(among.sum())
        low, high = interval(k, n, confidence)
        out[name] = {"rate": k / n if n else 0.0, "low": low, "high": high, "k": k, "n": n}
    return out


def decide_scores(score: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """ok / ng / review per defect score (the thresholds alone; OOD and drift are the policy's)."""
    score = np.asarray(score, np.float64)
    out = np.full(len(score), "review", dtype=object)
    if thresholds.ng is not None:
        out[score >= thresholds.ng] = "ng"
    if thresholds.ok is not None:
        out[score <= thresholds.ok] = "ok"  # the escape bound first: a part is OK only below t_ok
    return out
