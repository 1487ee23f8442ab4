"""Whether tonight's images are still like the ones the model was calibrated on.

The calibration keeps a reference: for a bounded sample of its images, the predicted class,
the embedding's projections on its top principal directions, and a few statistics of the
pixels themselves (brightness, contrast, the means of four quarters, the histogram of edge
directions, sharpness, the colour channels' means: a camera turned by a few degrees or a blurred lens shows there even
where the model's features are built not to notice), with their defect scores. A scoring run
computes the same for every image in the model's pass, keeps a bounded uniform sample of the
night (the driver's memory does not grow with the night), and at its end compares the two,
class by class (so that a night with more or fewer OK parts is not taken for drift), feature
by feature, with the two-sample Kolmogorov-Smirnov test, and the statistics of light, lens and
pose over all images too. The night drifted when the smallest
p-value, Bonferroni-corrected for the tests made, is below `alpha`. The population stability
index of the defect scores is reported beside it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

DIRECTIONS = 8  # principal directions of the embeddings compared
SAMPLE = 2000  # images kept of the reference and of a night
ALPHA = 0.01  # a stable night raises the alarm with at most this chance
MIN_PER_CLASS = 30  # images of a class on both sides for its tests to be made
ORIENTATION_BINS = 8


def image_statistics(images: np.ndarray) -> np.ndarray:
    """(B, 18) statistics of uint8 (B, H, W, C) images: brightness, contrast, the four quarters'
    means, the edge-direction histogram (8 bins over 180 degrees, weighted by edge strength), sharpness,
    and the mean of each colour channel.

    Computed on every few pixels (about 32 a side) of the middle channel (green, of RGB): a small
    share of the model's pass.
    """
    images = np.asarray(images)
    step = max(1, round(images.shape[1] / 32))
    few = images[:, ::step, ::step]
    colour = few.reshape(len(few), -1, few.shape[-1]).mean(axis=1, dtype=np.float32) / 255.0
    colour = np.repeat(colour, 3, axis=1) if colour.shape[1] == 1 else colour[:, :3]
    grey = few[..., images.shape[-1] // 2].astype(np.float32) * (1.0 / 255.0)
    b = len(grey)
    h, w = grey.shape[1:]
    brightness, contrast = grey.mean(axis=(1, 2)), grey.std(axis=(1, 2))
    quarters = [grey[:, i * h // 2:(i + 1) * h // 2, j * w // 2:(j + 1) * w // 2].mean(axis=(1, 2))
                for i in (0, 1) for j in (0, 1)]
    gy, gx = grey[:, 1:, :-1] - grey[:, :-1, :-1], grey[:, :-1, 1:] - grey[:, :-1, :-1]
    strength = np.hypot(gx, gy)
    which = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) * (ORIENTATION_BINS / np.pi)).astype(np.int32),
                       ORIENTATION_BINS - 1)
    which += np.arange(b, dtype=np.int32)[:, None, None] * ORIENTATION_BINS
    histogram = np.bincount(which.ravel(), weights=strength.ravel(), minlength=b * ORIENTATION_BINS)
    histogram = histogram.reshape(b, ORIENTATION_BINS).astype(np.float32)
    histogram /= np.maximum(histogram.sum(axis=1, keepdims=True), 1e-9)
    lap = grey[:, 1:-1, 1:-1] * 4 - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]
    sharpness = np.abs(lap).mean(axis=(1, 2)) / np.maximum(contrast, 1e-3)
    return np.column_stack([brightness, contrast, *quarters, histogram, sharpness, colour]).astype(np.float32)


@dataclass(frozen=True)
class Reference:
    """The calibration images as the drift test sees them.

    A row of `projections` is [predicted class, the embedding's projections on `directions`,
    the standardised image statistics]: what `project` gives a night's image.
    """

    mean: np.ndarray  # (D,) of the embeddings
    directions: np.ndarray  # (K, D), orthonormal rows
    stats_mean: np.ndarray  # (S,) of the image statistics
    stats_scale: np.ndarray  # (S,)
    projections: np.ndarray  # (N, 1 + K + S)
    scores: np.ndarray  # (N,) defect scores

    @classmethod
    def fit(cls, embeddings: np.ndarray, stats: np.ndarray, classes: np.ndarray, scores: np.ndarray,
            seed: int = 0) -> "Reference":
        x = np.asarray(embeddings, np.float64)
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        stats = np.asarray(stats, np.float64)
        partial = cls(mean.astype(np.float32), vt[:min(DIRECTIONS, vt.shape[0])].astype(np.float32),
                      stats.mean(axis=0).astype(np.float32), np.maximum(stats.std(axis=0), 1e-6).astype(np.float32),
                      np.zeros((0, 0), np.float32), np.zeros(0, np.float32))
        keep = np.random.default_rng(seed).permutation(len(x))[:SAMPLE]
        rows = partial.project(x[keep], stats[keep], np.asarray(classes)[keep])
        return cls(partial.mean, partial.directions, partial.stats_mean, partial.stats_scale, rows,
                   np.asarray(scores, np.float32)[keep])

    def project(self, embeddings: np.ndarray, stats: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Rows of [class, embedding projections, standardised image statistics], float32."""
        along = (np.asarray(embeddings, np.float32) - self.mean) @ self.directions.T
        standard = (np.asarray(stats, np.float32) - self.stats_mean) / self.stats_scale
        return np.column_stack([np.asarray(classes, np.float32), along, standard]).astype(np.float32)


def sample_keys(ids: list[str] | np.ndarray) -> np.ndarray:
    """A uniform key in [0, 1) per image id, the same wherever it is computed (SHA-1 of the id)."""
    return np.array([int.from_bytes(hashlib.sha1(str(i).encode("utf-8", "surrogatepass")).digest()[:8], "big")
                     / 2.0**64 for i in ids], dtype=np.float64)


@dataclass
class NightSample:
    """A uniform sample of at most `size` of a night's (projection, score) pairs, however many come.

    Each image keeps a key; the sample is the images with the smallest keys (bottom-k sampling),
    so samples taken piece by piece on the workers merge into the night's own on the driver.
    Keys drawn from `seed` by `add`, or given by `add_keyed` (`sample_keys` of the ids).
    """

    seed: int = 0
    size: int = SAMPLE
    seen: int = 0
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0))
    projections_array: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    scores_array: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    @property
    def projections(self) -> list[np.ndarray]:
        return list(self.projections_array)

    @property
    def scores(self) -> list[float]:
        return self.scores_array.tolist()

    def add(self, projections: np.ndarray, scores: np.ndarray) -> None:
        self.add_keyed(self._rng.random(len(scores)), projections, scores)

    def add_keyed(self, keys: np.ndarray, projections: np.ndarray, scores: np.ndarray, seen: int | None = None) -> None:
        """Images with their keys; `seen`: how many images these stand for (a worker's piece sends its smallest)."""
        projections, scores = np.asarray(projections, np.float32), np.asarray(scores, np.float32)
        readable = np.isfinite(projections).all(axis=1) & np.isfinite(scores)  # unreadable images have none
        self.seen += int(readable.sum()) if seen is None else seen
        keys = np.r_[self.keys, np.asarray(keys, np.float64)[readable]]
        projections = projections[readable] if not len(self.keys) else np.r_[self.projections_array,
                                                                             projections[readable]]
        scores = np.r_[self.scores_array, scores[readable]]
        keep = np.argsort(keys, kind="stable")[:self.size]
        self.keys, self.projections_array, self.scores_array = keys[keep], projections[keep], scores[keep]

    def summary(self) -> dict[str, object]:
        """The sample as plain data (what a worker's piece sends the driver)."""
        return {"seen": self.seen, "keys": self.keys.tolist(), "projections": self.projections_array.tolist(),
                "scores": self.scores_array.tolist()}

    def merge(self, summary: dict[str, object]) -> None:
        if summary["keys"]:
            self.add_keyed(np.array(summary["keys"]), np.array(summary["projections"], np.float32),
                           np.array(summary["scores"], np.float32), seen=int(summary["seen"]))
        else:
            self.seen += int(summary["seen"])


def compare(reference: Reference, night: NightSample, alpha: float = ALPHA) -> dict[str, object]:
    """The drift test of a night against the reference: class by class, feature by feature."""
    from scipy.stats import ks_2samp

    sample = night.projections_array
    tests: list[tuple[int, int, float, float]] = []  # class (-1: all), feature, statistic, p-value
    if len(sample) >= MIN_PER_CLASS and len(reference.projections) >= MIN_PER_CLASS:
        # The light, the lens and the camera's pose show in every image whatever its class: those
        # statistics are also compared over all images (the quarters' means, which follow where
        # the part sits, only class by class).
        first = 1 + reference.directions.shape[0]
        for k in [first, first + 1, *range(first + 6, sample.shape[1])]:  # all but the quarters
            t = ks_2samp(reference.projections[:, k], sample[:, k])
            tests.append((-1, k, float(t.statistic), float(t.pvalue)))
        for c in np.unique(sample[:, 0]):
            ours, theirs = sample[sample[:, 0] == c], reference.projections[reference.projections[:, 0] == c]
            if len(ours) < MIN_PER_CLASS or len(theirs) < MIN_PER_CLASS:
                continue
            for k in range(1, sample.shape[1]):
                t = ks_2samp(theirs[:, k], ours[:, k])
                tests.append((int(c), k, float(t.statistic), float(t.pvalue)))
    if not tests:
        return {"images": night.seen, "sample": len(sample), "tested": False, "drifted": False,
                "why": f"too few images to test (fewer than {MIN_PER_CLASS})"}
    worst = min(tests, key=lambda t: t[3])
    p_value = min(1.0, worst[3] * len(tests))
    return {"images": night.seen, "sample": len(sample), "tested": True, "tests": len(tests),
            "p_value": p_value, "alpha": alpha, "largest_ks": round(max(t[2] for t in tests), 4),
            "worst": {"class": worst[0], "feature": feature_name(worst[1], reference.directions.shape[0]),
                      "ks": round(worst[2], 4)},
            "psi": round(psi(reference.scores, night.scores_array), 4), "drifted": p_value < alpha}


def feature_name(column: int, directions: int = DIRECTIONS) -> str:
    """What a column of a projection row is (column 0 is the class)."""
    names = [f"embedding direction {k + 1}" for k in range(directions)]
    names += ["brightness", "contrast", "top-left mean", "top-right mean", "bottom-left mean", "bottom-right mean"]
    names += [f"edges at {int(180 * k / ORIENTATION_BINS)} degrees" for k in range(ORIENTATION_BINS)] + ["sharpness"]
    names += ["red mean", "green mean", "blue mean"]
    return names[column - 1] if 0 < column <= len(names) else f"feature {column}"


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `actual` against `expected`, in bins of the expected quantiles."""
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)))
    if len(edges) < 3:
        return 0.0
    e = np.histogram(np.clip(expected, edges[0], edges[-1]), edges)[0] / len(expected)
    a = np.histogram(np.clip(actual, edges[0], edges[-1]), edges)[0] / max(1, len(actual))
    e, a = np.clip(e, 1e-4, None), np.clip(a, 1e-4, None)
    return float(((a - e) * np.log(a / e)).sum())
