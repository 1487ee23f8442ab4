"""Attention rollout against a plain reference, on a tiny ViT, and the overlay and box metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from vitray.attention import register_weights_attention
from vitray.localisation import box_attention_loss, box_overlaps, energy_in_box, pointing_game
from vitray.overlays import overlay, overlay_maps
from vitray.rollout import attention_maps, grad_rollout, rollout


def reference_rollout(attentions: list[np.ndarray], head_fusion: str, discard_ratio: float) -> np.ndarray:
    """The definition in DESIGN.md, one image and one layer at a time, in float64."""
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion]
    batch, _, n, _ = attentions[0].shape
    maps = []
    for b in range(batch):
        result = np.eye(n)
        for layer in attentions:
            a = fuse(layer[b].astype(np.float64), axis=0)
            if discard_ratio > 0:
                body = a[:, 1:].ravel().copy()
                k = int(discard_ratio * body.size)
                body[np.argsort(body)[:k]] = 0.0
                a[:, 1:] = body.reshape(n, n - 1)
            a_hat = 0.5 * a + 0.5 * np.eye(n)
            a_hat /= a_hat.sum(axis=1, keepdims=True)
            result = a_hat @ result
        cls_row = result[0, 1:]
        maps.append(cls_row / cls_row.max())
    return np.stack(maps)


def random_attentions(batch: int = 3, heads: int = 4, n: int = 17, layers: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, n, generator=gen).mul(2).softmax(dim=-1) for _ in range(layers)]


def tiny_vit(attn_implementation: str = "eager", dropout: float = 0.0) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        attn_implementation=attn_implementation,
    )
    return ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# --- rollout ---------------------------------------------------------------------


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.3, 0.9])
def test_rollout_matches_reference(head_fusion: str, discard_ratio: float) -> None:
    attentions = random_attentions()
    maps = rollout(attentions, head_fusion=head_fusion, discard_ratio=discard_ratio)
    expected = reference_rollout([a.numpy() for a in attentions], head_fusion, discard_ratio)
    assert maps.shape == (3, 16)
    assert maps.dtype == torch.float32
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps.amax(dim=1).numpy(), 1.0, rtol=1e-6)


def test_heavy_discard_gives_finite_maps() -> None:
    # Discarding all but one entry per image leaves most maps all zero: they
    # must stay zero (not NaN) and the others still peak at 1.
    maps = rollout(random_attentions(layers=1), discard_ratio=0.999)
    assert torch.isfinite(maps).all()
    assert set(maps.amax(dim=1).tolist()) <= {0.0, 1.0}


def test_rollout_of_an_all_zero_map_is_zero_not_nan() -> None:
    # Every token attends only to the CLS token: no patch gets any mass.
    n = 5
    attention = torch.zeros(2, 1, n, n)
    attention[..., 0] = 1.0
    attention[:, :, 1:, 1:] = 0.0
    maps = rollout([attention], discard_ratio=0.0)
    assert torch.equal(maps, torch.zeros(2, n - 1))


def test_the_patch_everyone_attends_to_wins() -> None:
    n, hot = 17, 6  # token 6 is patch 5: row 1, column 1 of a 4x4 grid
    attention = torch.full((2, 2, n, n), 0.1 / (n - 1))
    attention[..., hot] = 0.9
    maps = rollout([attention, attention])
    assert (maps.argmax(dim=1) == hot - 1).all()
    grid = maps[0].reshape(4, 4).numpy()
    assert pointing_game(grid, (4, 4, 8, 8), (16, 16))
    assert not pointing_game(grid, (8, 8, 16, 16), (16, 16))


def test_rollout_rejects_bad_arguments() -> None:
    attentions = random_attentions(layers=1)
    with pytest.raises(ValueError, match="head_fusion"):
        rollout(attentions, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        rollout(attentions, discard_ratio=1.0)
    with pytest.raises(ValueError, match="eager"):
        rollout(())


# --- on a tiny ViT --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rollout", "grad-rollout"])
def test_attention_maps_on_a_tiny_vit(method: str, pixels: torch.Tensor) -> None:
    model = tiny_vit()
    maps, logits = attention_maps(model, pixels, method=method)
    assert maps.shape == (2, 4, 4)
    assert maps.dtype == torch.float32
    assert logits.shape == (2, 3)
    np.testing.assert_allclose(maps.amax(dim=(1, 2)).numpy(), 1.0, rtol=1e-6)
    assert (maps >= 0).all()
    assert not maps.requires_grad and not logits.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_rollout_maps_equal_rollout_of_the_returned_attentions(pixels: torch.Tensor) -> None:
    model = tiny_vit()
    maps, _ = attention_maps(model, pixels, head_fusion="max", discard_ratio=0.5)
    with torch.no_grad():
        attentions = model(pixel_values=pixels, output_attentions=True).attentions
    expected = reference_rollout([a.numpy() for a in attentions], "max", 0.5)
    np.testing.assert_allclose(maps.reshape(2, -1).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["rollout", "grad-rollout"])
def test_weights_attention_gives_eager_results(method: str, pixels: torch.Tensor) -> None:
    eager = tiny_vit()
    fast = tiny_vit(attn_implementation=register_weights_attention())
    with torch.no_grad():
        expected = eager(pixel_values=pixels, output_attentions=True)
        got = fast(pixel_values=pixels, output_attentions=True)
    torch.testing.assert_close(got.logits, expected.logits)
    for a, b in zip(got.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(a, b)
    # grad-rollout differentiates through the weights.
    torch.testing.assert_close(attention_maps(fast, pixels, method=method)[0],
                               attention_maps(eager, pixels, method=method)[0])


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_heads_fused_in_the_attention_give_the_same_maps(head_fusion: str, pixels: torch.Tensor) -> None:
    eager = tiny_vit()
    fused = tiny_vit(attn_implementation=register_weights_attention(head_fusion))
    with torch.no_grad():
        expected = eager(pixel_values=pixels, output_attentions=True).attentions
        got = fused(pixel_values=pixels, output_attentions=True).attentions
    fuse = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}[head_fusion]
    for a, b in zip(got, expected, strict=True):
        assert a.shape == (2, 1, 17, 17)
        torch.testing.assert_close(a, fuse(b, dim=1, keepdim=True))
    torch.testing.assert_close(attention_maps(fused, pixels, head_fusion=head_fusion, discard_ratio=0.3)[0],
                               attention_maps(eager, pixels, head_fusion=head_fusion, discard_ratio=0.3)[0])


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min", None])
def test_a_last_layer_of_its_cls_row_gives_the_same_maps_and_logits(head_fusion: str | None,
                                                                    pixels: torch.Tensor) -> None:
    eager = tiny_vit()
    fused = tiny_vit(attn_implementation=register_weights_attention(head_fusion))
    heads = 2 if head_fusion is None else 1
    head_fusion = head_fusion or "max"  # heads apart in the attention, fused by rollout
    seen: list[tuple[int, ...]] = []
    hook = fused.vit.layers[-1].attention.register_forward_hook(lambda m, i, out: seen.append(tuple(out[1].shape)))
    try:
        maps, logits = attention_maps(fused, pixels, head_fusion=head_fusion)
    finally:
        hook.remove()
    assert seen == [(2, heads, 1, 17)]  # the last layer gave its CLS row only
    expected_maps, expected_logits = attention_maps(eager, pixels, head_fusion=head_fusion)
    torch.testing.assert_close(maps, expected_maps)
    torch.testing.assert_close(logits, expected_logits)
    # Outside attention_maps the model gives every row again.
    with torch.no_grad():
        assert fused(pixel_values=pixels, output_attentions=True).attentions[-1].shape == (2, heads, 17, 17)


def test_rollout_of_a_cls_row_last_layer() -> None:
    attentions = random_attentions()
    cls_row = attentions[:-1] + [attentions[-1][:, :, :1]]
    torch.testing.assert_close(rollout(cls_row, "max"), rollout(attentions, "max"))
    with pytest.raises(ValueError, match="every row of the last layer"):
        rollout(cls_row, "mean", discard_ratio=0.5)
    with pytest.raises(ValueError, match="attentions must be"):  # only the last layer may be one row
        rollout([attentions[0][:, :, :1]] + attentions[1:], "mean")


@pytest.mark.parametrize("method", ["rollout", "grad-rollout"])
def test_maps_in_chunks_are_the_maps_of_the_whole_batch(method: str) -> None:
    model = tiny_vit()
    pixels = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    whole, logits = attention_maps(model, pixels, method=method)
    parts, part_logits = attention_maps(model, pixels, method=method, chunk=2)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(part_logits, logits)


def test_grad_rollout_depends_on_the_target_class(pixels: torch.Tensor) -> None:
    model = tiny_vit()
    predicted, logits = grad_rollout(model, pixels)
    per_class = [grad_rollout(model, pixels, target=torch.full((2,), c))[0] for c in range(3)]
    assert not torch.allclose(per_class[0], per_class[1])
    assert not torch.allclose(per_class[1], per_class[2])
    # Without a target, the predicted class is explained.
    top = logits.argmax(dim=1)
    for i in range(2):
        torch.testing.assert_close(predicted[i], per_class[int(top[i])][i])


def test_grad_rollout_works_on_a_frozen_model(pixels: torch.Tensor) -> None:
    model = tiny_vit()
    model.requires_grad_(False)
    maps, _ = attention_maps(model, pixels, method="grad-rollout")
    np.testing.assert_allclose(maps.amax(dim=(1, 2)).numpy(), 1.0, rtol=1e-6)


def test_maps_ignore_dropout_and_keep_the_training_mode(pixels: torch.Tensor) -> None:
    model = tiny_vit(dropout=0.5).train()
    first, _ = attention_maps(model, pixels)
    second, _ = attention_maps(model, pixels)
    torch.testing.assert_close(first, second)
    assert model.training


def test_an_sdpa_model_gets_a_clear_error(pixels: torch.Tensor) -> None:
    model = tiny_vit(attn_implementation="sdpa")
    for method in ("rollout", "grad-rollout"):
        with pytest.raises(ValueError, match='attn_implementation="eager"'):
            attention_maps(model, pixels, method=method)


def test_unknown_method_is_rejected(pixels: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="method"):
        attention_maps(tiny_vit(), pixels, method="gradcam")


# --- pointing game and energy -----------------------------------------------------------


def test_pointing_game_on_a_non_square_image() -> None:
    amap = np.zeros((2, 4))
    amap[1, 3] = 1.0  # on a 20x80 image (H, W) the cell is x 60..80, y 10..20, centre (70, 15)
    assert pointing_game(amap, (60, 10, 80, 20), (20, 80))
    assert pointing_game(amap, (70, 15, 200, 200), (20, 80))  # edges count, box may leave the image
    assert not pointing_game(amap, (0, 0, 60, 20), (20, 80))
    assert not pointing_game(amap, (60, 0, 80, 14.9), (20, 80))


def test_energy_in_box_by_cell_overlap() -> None:
    amap = np.arange(1.0, 9.0).reshape(2, 4)  # cells are 20 wide, 10 high on a 20x80 image
    total = amap.sum()
    assert energy_in_box(amap, (0, 0, 80, 20), (20, 80)) == pytest.approx(1.0)
    assert energy_in_box(amap, (-10, -10, 500, 500), (20, 80)) == pytest.approx(1.0)
    assert energy_in_box(amap, (60, 0, 80, 20), (20, 80)) == pytest.approx(amap[:, 3].sum() / total)
    assert energy_in_box(amap, (70, 0, 90, 10), (20, 80)) == pytest.approx(0.5 * amap[0, 3] / total)
    assert energy_in_box(amap, (30, 5, 30, 15), (20, 80)) == 0.0  # empty box
    assert energy_in_box(np.zeros((2, 4)), (0, 0, 80, 20), (20, 80)) == 0.0


def test_energy_equals_the_mass_of_the_nearest_upsampled_map() -> None:
    rng = np.random.default_rng(0)
    amap = rng.random((3, 5))
    height, width = 30, 100  # cells of 10x20 pixels
    upsampled = np.kron(amap, np.ones((10, 20)))
    for x1, y1, x2, y2 in [(0, 0, 37, 13), (13, 7, 100, 30), (41, 0, 59, 30), (99, 29, 100, 30)]:
        expected = upsampled[y1:y2, x1:x2].sum() / upsampled.sum()
        assert energy_in_box(amap, (x1, y1, x2, y2), (height, width)) == pytest.approx(expected)


def test_uniform_map_energy_is_the_box_area_share() -> None:
    assert energy_in_box(np.ones((7, 7)), (10, 20, 40, 50), (224, 224)) == pytest.approx(900 / 224**2)


def test_box_overlaps_of_a_batch_are_each_boxs_energy_weights() -> None:
    rng = np.random.default_rng(1)
    boxes = np.array([(0, 0, 37, 13), (13, 7, 100, 30), (np.nan, 0, 10, 10), (41, 0, 59, 30)])
    overlaps = box_overlaps(boxes, (3, 5), (30, 100))
    assert overlaps.shape == (4, 15)
    assert not overlaps[2].any()  # no box known
    for amap in rng.random((5, 3, 5)):
        for box, row in zip(boxes[[0, 1, 3]], overlaps[[0, 1, 3]]):
            assert (amap.ravel() * row).sum() / amap.sum() == pytest.approx(energy_in_box(amap, box, (30, 100)))


def test_the_box_attention_term_pulls_a_map_into_its_box() -> None:
    overlaps = torch.from_numpy(box_overlaps(np.array([(0, 0, 8, 8), (np.nan,) * 4]), (4, 4), (16, 16))).float()
    maps = torch.full((2, 16), 0.5, requires_grad=True)
    loss = box_attention_loss(maps, overlaps)
    assert loss.item() == pytest.approx(np.log(0.5) - np.log(4 / 16))  # a uniform map: the box's area share
    loss.backward()
    inside = overlaps[0] > 0
    assert (maps.grad[0, inside] < 0).all() and (maps.grad[0, ~inside] > 0).all()
    assert not maps.grad[1].any()  # an image without a box takes no part
    none = box_attention_loss(maps, torch.zeros(2, 16))
    assert none.item() == 0.0 and none.requires_grad
    # A map with at least half its mass in the box is left alone: the rest may go where the evidence is.
    there = torch.where(overlaps[0] > 0, 1.0, 0.3).expand(2, 16)
    assert box_attention_loss(there, overlaps).item() == 0.0


def test_the_box_attention_term_trains_a_vits_rollout_onto_the_box(pixels: torch.Tensor) -> None:
    """Through a real ViT: a few steps on the term raise the rollout's energy in the box."""
    from vitray.rollout import patch_grid

    model = tiny_vit(register_weights_attention("mean")).train()
    x = pixels[:2]
    overlaps = torch.from_numpy(box_overlaps(np.array([(0, 0, 8, 8), (8, 8, 16, 16)]), patch_grid(model.config),
                                             (16, 16))).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = box_attention_loss(rollout(model(pixel_values=x, output_attentions=True).attentions), overlaps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# --- overlay --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected_size"),
    [
        ((16, 16), (224, 224)),
        ((20, 30, 3), (360, 240)),  # short side 20 → x12
        ((28, 28, 1), (224, 224)),
        ((300, 400, 4), (400, 300)),  # large enough: kept
    ],
)
def test_overlay_size_and_mode(shape: tuple[int, ...], expected_size: tuple[int, int]) -> None:
    image = np.full(shape, 128, dtype=np.uint8)
    out = overlay(image, np.random.default_rng(0).random((4, 4)), label="Xplus", score=0.97)
    assert out.mode == "RGB"
    assert out.size == expected_size


def test_overlay_colours_where_the_map_is_high() -> None:
    image = np.full((256, 256), 128, dtype=np.uint8)
    amap = np.zeros((4, 4))
    amap[1, 2] = 1.0  # cell x 128..192, y 64..128
    out = np.asarray(overlay(image, amap))
    assert np.abs(out[96, 160].astype(int) - 128).max() > 40
    assert (out[224, 32] == 128).all()  # far from the hot cell: the image shows through


def test_overlay_caption_sits_on_a_dark_box() -> None:
    image = np.full((224, 224, 3), 255, dtype=np.uint8)
    plain = np.asarray(overlay(image, np.zeros((4, 4))))
    captioned = np.asarray(overlay(image, np.zeros((4, 4)), label="Yminus", score=0.5))
    assert (plain == 255).all()
    assert (captioned[1, 1] < 40).all()
    assert (captioned[200, 200] == 255).all()


def test_overlay_rejects_float_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        overlay(np.zeros((8, 8), dtype=np.float32), np.ones((2, 2)))


def test_overlays_of_a_batch_are_the_single_overlays() -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(5, 32, 48, 3), dtype=np.uint8)
    maps = rng.random((5, 4, 6)).astype(np.float32)
    maps[1] = 0.0  # no mass: the image unchanged
    maps[2, 0, 0] = np.nan  # NaN cells count as 0
    batch = overlay_maps(images, maps)
    assert batch.shape == images.shape and batch.dtype == np.uint8
    for i in range(5):
        np.testing.assert_array_equal(batch[i], np.asarray(overlay(images[i], maps[i], min_side=0)))
    np.testing.assert_array_equal(batch[1], images[1])
    # The heat is scaled by each map's own max: a map times 7 gives the same overlay.
    np.testing.assert_array_equal(overlay_maps(images[:1], 7 * maps[:1]), batch[:1])
