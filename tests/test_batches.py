"""The training worker's windows: class balance, augmentation and their seeding."""
from __future__ import annotations

import numpy as np
import pytest

from vitray.data.batches import WINDOW_STEPS, balance_window, make_collate, steps_per_epoch, window_rng
from vitray.data.preprocess import AugmentConfig
from vitray.data.sampling import balanced_rates


def _window(n: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(n) < 0.02, 4, rng.integers(0, 4, n))
    return {"image": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), "label": labels}


def test_balanced_windows_give_every_class_an_equal_share_and_keep_their_length():
    counts = np.array([735, 735, 735, 735, 54, 0])
    rates = balanced_rates(counts)
    labels = np.repeat(np.arange(6), counts)
    batch = {"label": labels, "image": np.arange(len(labels))}
    drawn = []
    for s in range(20):
        out = balance_window(batch, rates, np.random.default_rng(s))
        assert len(out["label"]) == len(labels)  # same steps on every rank
        assert np.array_equal(labels[out["image"]], out["label"])  # rows stay whole
        drawn.append(np.bincount(out["label"], minlength=6))
    assert np.mean(drawn, axis=0)[:5] == pytest.approx([counts.sum() / 5] * 5, rel=0.05)
    rare = out["image"][out["label"] == 4]
    assert len(np.unique(rare)) == 54  # every rare image drawn, each several times


def test_a_window_draws_the_same_for_the_same_seed_epoch_rank_and_rows():
    rates = balanced_rates(np.array([100, 100, 100, 100, 2]))
    augment = AugmentConfig.for_labels(["Xminus", "Xplus", "Yminus", "Yplus", "passed"])
    window = _window()

    def draw(seed: int, epoch: int, rank: int) -> dict:
        out = make_collate(rates, augment, seed, epoch, rank)(dict(window))
        return {k: v.numpy() for k, v in out.items()}

    first = draw(0, 1, 0)
    assert first["image"].dtype == np.uint8 and first["label"].dtype == np.int64
    assert first["image"].shape == window["image"].shape
    again = draw(0, 1, 0)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    for other in (draw(0, 2, 0), draw(1, 1, 0), draw(0, 1, 1)):  # a new epoch, seed or rank draws anew
        assert not np.array_equal(first["image"], other["image"])


def test_the_window_generator_depends_on_the_rows():
    a, b = _window(seed=0), _window(seed=1)
    assert window_rng(0, 1, 0, a).random() == window_rng(0, 1, 0, dict(a)).random()
    assert window_rng(0, 1, 0, a).random() != window_rng(0, 1, 0, b).random()


def test_without_balance_or_augmentation_a_window_is_only_shuffled():
    window = _window(64)
    out = make_collate(None, None, 0, 1, 0)(dict(window))
    assert sorted(out["label"].tolist()) == sorted(window["label"].tolist())
    assert sorted(map(bytes, out["image"].numpy())) == sorted(map(bytes, window["image"]))


@pytest.mark.parametrize("rows,world,batch", [(1000, 1, 32), (1000, 2, 32), (100, 1, 32), (5000, 3, 16)])
def test_steps_per_epoch_counts_whole_batches_of_whole_windows(rows, world, batch):
    per_rank = rows // world
    windows = [min(batch * WINDOW_STEPS, per_rank - start) for start in range(0, per_rank, batch * WINDOW_STEPS)]
    assert steps_per_epoch(rows, world, batch) == max(1, sum(w // batch for w in windows))


def test_with_a_box_grid_each_image_comes_with_its_boxs_cells_moved_as_the_image_was():
    """A bright square drawn in each box: after balance, flips and shifts, the overlaps still cover it."""
    labels = ["Xminus", "Xplus", "Yminus", "Yplus", "passed"]
    rng = np.random.default_rng(0)
    n, side = 64, 32
    images = np.zeros((n, side, side, 3), np.uint8)
    boxes = np.zeros((n, 4), np.float32)
    for i in range(n):
        x, y = rng.integers(4, 18, 2)
        w, h = rng.integers(4, 10, 2)
        images[i, y:y + h, x:x + w] = 200
        boxes[i] = (x, y, x + w, y + h)
    boxes[-4:] = np.nan  # images without a box
    window = {"image": images, "label": rng.integers(0, 5, n), "bbox": boxes}
    collate = make_collate(balanced_rates(np.array([20, 20, 20, 20, 4])), AugmentConfig.for_labels(labels), 0, 1, 0,
                           box_grid=(8, 8))
    out = {k: v.numpy() for k, v in collate(dict(window)).items()}
    assert out["box_overlap"].shape == (n, 64) and out["box_overlap"].dtype == np.float32
    centres = (np.arange(8) + 0.5) * 4
    boxed = 0
    for image, overlap in zip(out["image"], out["box_overlap"]):
        if not overlap.any():  # an image without a box
            continue
        boxed += 1
        bright = image.mean(axis=-1) > (int(image.max()) + int(image.min())) / 2
        ys, xs = np.nonzero(bright)
        cells = overlap.reshape(8, 8)
        assert np.average(centres, weights=cells.sum(axis=0)) == pytest.approx(xs.mean() + 0.5, abs=0.6)
        assert np.average(centres, weights=cells.sum(axis=1)) == pytest.approx(ys.mean() + 0.5, abs=0.6)
        assert cells.sum() * 16 == pytest.approx(bright.sum(), rel=0.01)  # the box's area in pixels
    assert boxed >= n // 2
