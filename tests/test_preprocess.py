"""Preprocessing and label-aware augmentation: what the model sees, and labels that stay true."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vitray.data.preprocess import AugmentConfig, augment_batch, flip_maps, normalize, resize_batch, resize_image

INSPECTION = ["Xminus", "Xplus", "Yminus", "Yplus", "passed"]


def _marked(n: int, size: int = 16) -> np.ndarray:
    """Images with one bright pixel in the top-left quadrant, so flips are visible."""
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    images[:, 2, 3] = 255
    return images


def test_flip_maps_swap_mirrored_defects_only():
    h, v = flip_maps(INSPECTION)
    assert [INSPECTION[i] for i in h] == ["Xplus", "Xminus", "Yminus", "Yplus", "passed"]
    assert [INSPECTION[i] for i in v] == ["Xminus", "Xplus", "Yplus", "Yminus", "passed"]


def test_no_flips_for_classes_without_a_known_mirror():
    assert flip_maps([str(d) for d in range(10)]) == (None, None)
    # Xplus without Xminus: a horizontal flip would make an image of a class that is not there.
    h, v = flip_maps(["Xplus", "Yminus", "Yplus", "passed"])
    assert h is None and v is not None


def test_another_domain_flips_its_own_mirror_classes():
    from vitray.domain import Domain

    arrows = Domain(ok_class="ok", classes=("ok", "left", "right"), hflip_pairs=(("left", "right"),), vflip_pairs=())
    h, v = flip_maps(["left", "ok", "right"], arrows)
    assert h.tolist() == [2, 1, 0] and v.tolist() == [0, 1, 2]
    assert flip_maps(INSPECTION, arrows) == (None, None)  # not its classes


def test_every_flipped_image_gets_its_mirrored_label():
    n = 400
    labels = np.arange(n) % len(INSPECTION)
    batch = {"image": _marked(n), "label": labels.copy(), "bbox": np.tile([[2.0, 1.0, 6.0, 5.0]], (n, 1))}
    config = AugmentConfig(*[tuple(m) for m in flip_maps(INSPECTION)], max_shift=0.0, brightness=0.0, contrast=0.0,
                           rotate=0.0, scale=0.0)
    out = augment_batch(batch, config, seed=1)
    ys, xs = np.nonzero(out["image"][..., 0] == 255)[1:]
    h_flipped = xs > 8
    v_flipped = ys > 8
    assert h_flipped.any() and (~h_flipped).any() and v_flipped.any()
    for i in range(n):
        name = INSPECTION[labels[i]]
        if h_flipped[i]:
            name = {"Xplus": "Xminus", "Xminus": "Xplus"}.get(name, name)
        if v_flipped[i]:
            name = {"Yplus": "Yminus", "Yminus": "Yplus"}.get(name, name)
        assert INSPECTION[out["label"][i]] == name
    # The box follows the part.
    flipped = np.flatnonzero(h_flipped & ~v_flipped)[0]
    np.testing.assert_allclose(out["bbox"][flipped], [10.0, 1.0, 14.0, 5.0])


def test_digits_are_never_flipped():
    n = 200
    batch = {"image": _marked(n), "label": np.arange(n) % 10}
    config = dataclasses.replace(AugmentConfig.for_labels([str(d) for d in range(10)]),
                                 max_shift=0.0, brightness=0.0, contrast=0.0, rotate=0.0, scale=0.0)
    out = augment_batch(batch, config, seed=0)
    np.testing.assert_array_equal(out["image"], batch["image"])
    np.testing.assert_array_equal(out["label"], batch["label"])


def _only_shifts(max_shift: float) -> AugmentConfig:
    return AugmentConfig(max_shift=max_shift, brightness=0.0, contrast=0.0, rotate=0.0, scale=0.0)


def test_shifts_never_push_the_part_out_of_view():
    n, size = 300, 32
    boxes = np.tile([[0.0, 20.0, 6.0, 31.0]], (n, 1)).astype(np.float32)  # touching the left edge, near the bottom
    batch = {"image": np.zeros((n, size, size, 3), np.uint8), "label": np.zeros(n, np.int64), "bbox": boxes}
    out = augment_batch(batch, _only_shifts(0.25), seed=3)
    b = out["bbox"]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= size).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= size).all()
    assert (b[:, 0] > 0).any()  # it did move


def test_shift_moves_pixels_and_box_together():
    batch = {"image": _marked(50, 32), "label": np.zeros(50, np.int64),
             "bbox": np.tile([[3.0, 2.0, 4.0, 3.0]], (50, 1)).astype(np.float32)}
    out = augment_batch(batch, _only_shifts(0.1), seed=5)
    for img, box in zip(out["image"], out["bbox"]):
        y, x = np.argwhere(img[..., 0] == 255)[0]
        assert (x, y) == (int(box[0]), int(box[1]))


def test_resize_converts_channels_and_scales_boxes():
    grey = np.arange(20 * 10, dtype=np.uint8).reshape(20, 10, 1)
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert resize_image(grey, 16, 3).shape == (16, 16, 3)
    assert resize_image(rgb, 16, 1).shape == (16, 16, 1)
    batch = {"image": np.array([grey, rgb[..., :1]], dtype=object),
             "bbox": np.array([[0, 0, 10, 20], [2, 2, 4, 4]], np.float32)}
    out = resize_batch(batch, 32, 1)
    assert out["image"].shape == (2, 32, 32, 1) and out["image"].dtype == np.uint8
    np.testing.assert_allclose(out["bbox"], [[0, 0, 32, 32], [8, 8, 16, 16]])


def test_normalize_matches_the_processor_definition():
    x = torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    y = normalize(x, [0.5, 0.5, 0.2], [0.5, 0.25, 0.2])
    assert y.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(y.flatten().numpy(), [-1.0, 2.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("size", [8, 28, 64])
def test_augment_keeps_shape_and_dtype(size):
    batch = {"image": np.random.default_rng(0).integers(0, 256, (5, size, size, 1), dtype=np.uint8),
             "label": np.zeros(5, np.int64)}
    out = augment_batch(batch, AugmentConfig(), seed=0)
    assert out["image"].shape == batch["image"].shape and out["image"].dtype == np.uint8


def _no_lighting(rotate: float, scale: float) -> AugmentConfig:
    return AugmentConfig(max_shift=0.0, brightness=0.0, contrast=0.0, rotate=rotate, scale=scale)


def test_rotation_turns_pixels_about_the_centre_and_the_box_follows():
    size = 33
    images = np.zeros((1, size, size, 1), np.uint8)
    images[0, 16, 26] = 255  # 10 px right of the centre pixel (16, 16)
    box = np.array([[25.0, 15.0, 27.0, 17.0]], np.float32)
    # A fixed 90 degree turn: in image coordinates (y down) +90 turns right of centre into below it.
    rng = type("Fixed", (), {"uniform": lambda self, lo, hi, n: np.full(n, hi)})()
    from vitray.data.preprocess import _affine

    out, moved = _affine(images, box, 90.0, 0.0, rng)
    y, x = np.unravel_index(out[0, :, :, 0].argmax(), (size, size))
    assert (y, x) == (26, 16)
    np.testing.assert_allclose(moved[0], [15.0, 25.0, 17.0, 27.0], atol=1e-4)


def test_rotation_and_zoom_never_push_the_part_out_of_view():
    n, size = 300, 32
    boxes = np.tile([[0.5, 1.0, 12.0, 31.0]], (n, 1)).astype(np.float32)  # nearly the whole height
    batch = {"image": np.random.default_rng(1).integers(0, 256, (n, size, size, 3), dtype=np.uint8),
             "label": np.zeros(n, np.int64), "bbox": boxes}
    out = augment_batch(batch, _no_lighting(rotate=20.0, scale=0.2), seed=4)
    b = out["bbox"]
    assert (b[:, :2] >= 0).all() and (b[:, 2:] <= size).all()
    changed = (out["image"] != batch["image"]).any(axis=(1, 2, 3))
    assert changed.any() and (~changed).any()  # some turned, those that would lose the part did not
    np.testing.assert_array_equal(b[~changed], boxes[~changed])


def test_zoom_keeps_the_centre_and_the_label():
    size = 17
    images = np.full((40, size, size, 1), 10, np.uint8)
    images[:, 8, 8] = 250
    labels = np.arange(40) % 3
    out = augment_batch({"image": images, "label": labels.copy()}, _no_lighting(rotate=30.0, scale=0.3), seed=2)
    assert (out["image"][:, 8, 8, 0] > 100).all()  # the centre stays put under turns and zooms
    np.testing.assert_array_equal(out["label"], labels)


def test_turns_and_zooms_for_digits_never_for_displacement_classes():
    digits = AugmentConfig.for_labels([str(d) for d in range(10)])
    assert digits.rotate > 0 and digits.scale > 0
    inspection = AugmentConfig.for_labels(INSPECTION)
    assert (inspection.rotate, inspection.scale) == (0.0, 0.0) and inspection.hflip is not None
