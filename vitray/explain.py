"""Where did the model look: attention rollout and gradient-weighted rollout for
Hugging Face ViTs, overlays of the maps on the image, and localisation metrics
(pointing game, energy in box) that measure a map against a labelled box.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

HEAD_FUSIONS = ("mean", "max", "min")
METHODS = ("rollout", "grad-rollout")
# The attn_implementation that returns attention weights (see `attention_with_weights`).
WEIGHTS_ATTENTION = "vitray_weights"
# Set on a rollout's last attention module while `attention_maps` runs (see attention_with_weights).
_CLS_ROW_ONLY = "_vitray_cls_row_only"


def register_weights_attention(head_fusion: str | None = None) -> str:
    """Register `attention_with_weights` with transformers (per process, idempotent) → its name.

    Pass the name as `attn_implementation` to a model whose attentions make maps. With
    `head_fusion`, the attention returns its heads already fused, (B, 1, N, N): fused while
    they are in cache and a quarter of the memory to keep, which `rollout` takes as they are
    (one head fuses to itself). grad-rollout needs the heads apart: no fusion for it.
    """
    from transformers import AttentionInterface

    if head_fusion is None:
        AttentionInterface.register(WEIGHTS_ATTENTION, attention_with_weights)
        return WEIGHTS_ATTENTION
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    name = f"{WEIGHTS_ATTENTION}_{head_fusion}"
    AttentionInterface.register(name, functools.partial(attention_with_weights, head_fusion=head_fusion))
    return name


def attention_with_weights(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    head_fusion: str | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention (same result, weights returned), made contiguous first.

    The projections hand over (B, H, N, d) views with strided heads; eager multiplies
    those views as they are, and on CPU its two matmuls then cost ~2.5x the SDPA call they
    replace. Scaling the query (d wide) instead of the scores (N wide) saves a pass too.
    With `head_fusion` the weights come back fused over the heads, (B, 1, N, N).

    A module marked by `attention_maps` as a rollout's last layer (`_CLS_ROW_ONLY`) returns
    only the CLS row of its weights, (B, H or 1, 1, N): that row is all rollout uses of
    the last layer, so the layer's output comes from SDPA and softmax runs over one row
    of N instead of N rows (on a CPU the exponentials are most of the weights' cost).
    """
    import torch

    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if attention_mask is None and getattr(module, _CLS_ROW_ONLY, False):
        output = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout if module.training else 0.0, scale=scaling)
        cls_scores = torch.matmul(query[:, :, :1] * scaling, key.transpose(2, 3))
        weights = torch.softmax(cls_scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if head_fusion is not None:
            weights = _fuse_heads(weights, head_fusion).unsqueeze(1)
        return output.transpose(1, 2).contiguous(), weights
    scores = torch.matmul((query * scaling).contiguous(), key.contiguous().transpose(2, 3))
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value.contiguous()).transpose(1, 2).contiguous()
    if head_fusion is not None:
        weights = _fuse_heads(weights, head_fusion).unsqueeze(1)
    return output, weights


def rollout(
    attentions: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """Attention rollout of per-layer attentions (B, H, N, N) → maps (B, N-1).

    Abnar & Zuidema 2020, computed per image (vectorised over the batch) as:
      1. per layer, fuse the heads into A (N, N) by their mean, max or min
         (N = 1 + patches, CLS first);
      2. if discard_ratio > 0: among the N·(N-1) entries of A outside column 0
         (the CLS column is never touched), set the k = floor(discard_ratio·N·(N-1))
         smallest to 0: one ranking over the whole flattened matrix, not per row;
      3. Â = 0.5·A + 0.5·I, each row then divided by its sum (the residual path);
      4. R = Â_L @ ... @ Â_1 (layer 1 applied first);
      5. map = R[0, 1:] / max(R[0, 1:]): how much the CLS token draws from each
         patch through all layers; a map with no mass stays all zero.
    Computed in float32 whatever the attentions' dtype. The last layer may come as its CLS
    row only, (B, H, 1, N) (what `attention_maps` asks of the weights attention), since
    step 4 uses no other row of it; without a discard the map is the same.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    _check_attentions(attentions)
    fused = [_fuse_heads(a.float(), head_fusion) for a in attentions]
    return _rollout_fused(fused, discard_ratio)


def grad_rollout(
    model: Any,
    pixel_values: torch.Tensor,
    target: torch.Tensor | None = None,
    discard_ratio: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient-weighted rollout (Chefer et al. 2021) → (maps (B, N-1), logits (B, C)).

    Each layer's heads are fused as mean_h((∂y_t/∂A_h ⊙ A_h).clamp(min=0)), where
    y_t is the logit of `target` (class ids, shape (B,)) or, by default, of the
    predicted class; steps 2-5 are those of `rollout`. The model must return attentions
    (attn_implementation="eager"). Parameter gradients are not touched.
    """
    import torch

    with torch.enable_grad():
        # Differentiate with respect to the input as well, so that a frozen model
        # (no parameter requires grad) still builds a graph through the attentions.
        pixel_values = pixel_values.detach().requires_grad_(True)
        logits, attentions = _forward(model, pixel_values)
        if target is None:
            target = logits.argmax(dim=-1)
        target = torch.as_tensor(target, device=logits.device).reshape(-1)
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f"target has {target.shape[0]} entries for a batch of {logits.shape[0]}")
        # Images in a batch do not interact in a ViT, so one backward pass of the
        # summed target logits gives every image its own gradients.
        chosen = logits.gather(1, target[:, None].long()).sum()
        grads = torch.autograd.grad(chosen, attentions)
    fused = [(g.float() * a.detach().float()).clamp(min=0).mean(dim=1) for g, a in zip(grads, attentions)]
    return _rollout_fused(fused, discard_ratio), logits.detach()


def attention_maps(
    model: Any,
    pixel_values: torch.Tensor,
    method: str = "rollout",
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model` on `pixel_values` (B, C, H, W) → (maps (B, rows, cols) float32, logits).

    rows, cols = config.image_size // config.patch_size. The model is run in eval
    mode (dropout would make the maps random) and left in the mode it had.
    `head_fusion` applies to "rollout" only; "grad-rollout" always takes the
    mean of the gradient-weighted heads. `chunk` runs the batch that many images at
    a time (the same maps): every layer's weights of a whole batch outgrow a CPU's caches.
    """
    import torch

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rows, cols = _patch_grid(model.config)
    parts = pixel_values.split(chunk) if chunk else (pixel_values,)
    was_training = model.training
    model.eval()
    try:
        if method == "rollout":
            done = []
            # The discard ranks the whole matrix of every layer, the last one's too.
            with torch.inference_mode(), _last_layer_cls_row(model, enabled=discard_ratio == 0):
                for part in parts:
                    logits, attentions = _forward(model, part)
                    done.append((rollout(attentions, head_fusion, discard_ratio), logits))
        else:
            done = [grad_rollout(model, part, discard_ratio=discard_ratio) for part in parts]
    finally:
        model.train(was_training)
    maps, logits = (torch.cat(t) for t in zip(*done))
    if maps.shape[1] != rows * cols:
        raise ValueError(
            f"the model attends over {maps.shape[1]} patches but config.image_size and "
            f"patch_size give a {rows}x{cols} grid; pass images of size {model.config.image_size}"
        )
    return maps.reshape(-1, rows, cols), logits


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    label: str | None = None,
    score: float | None = None,
    min_side: int = 224,
    alpha: float = 0.6,
) -> Image.Image:
    """Blend a colour-mapped attention map onto `image` → RGB PIL image.

    `image` is H×W or H×W×C uint8 (C = 1 grey, 3 RGB, 4 RGBA; other channel
    counts show their first channel). Images whose short side is below
    `min_side` are first enlarged by a whole factor (nearest, so pixels stay
    crisp). The blend is `overlay_maps`'. `label` and `score` go in the top-left
    corner on a dark box.
    """
    from PIL import Image

    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        factor = math.ceil(min_side / min(h, w))
        rgb = np.asarray(Image.fromarray(rgb).resize((w * factor, h * factor), Image.Resampling.NEAREST))
    heat = np.asarray(amap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"attention map must be 2-D (rows, cols), got shape {heat.shape}")
    out = Image.fromarray(overlay_maps(rgb[None], heat[None], alpha)[0])
    text = " ".join(
        part for part in (label, None if score is None else f"{score:.2f}") if part is not None
    )
    if text:
        _draw_caption(out, text)
    return out


def overlay_maps(images: np.ndarray, maps: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Maps (B, rows, cols) blended onto images (B, H, W, C) uint8 → RGB (B, H, W, 3) uint8.

    C = 3 or 4 shows the image's colours, any other channel count its first channel.

    Each map, scaled to [0, 1] by its max (negative and NaN cells count as 0), is
    upsampled bilinearly to H×W (pixel centres, edges clamped) and coloured with
    matplotlib's "jet"; the colour c is blended per pixel as (1 - a)·image + a·c with
    a = alpha·heat, in 8 bits as PIL's composite rounds it: where the model did not look,
    the part stays visible. Vectorised over the batch: the bulk overlays of `vitray score`
    are drawn a piece at a time.
    """
    images = np.asarray(images)
    heat = np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float32)), 0.0, None)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"overlay_maps needs (B, H, W, C) uint8 images, got {images.dtype} {images.shape}")
    images = _channels_as_rgb(images)
    if heat.ndim != 3 or heat.shape[0] != images.shape[0]:
        raise ValueError(f"overlay_maps needs one (rows, cols) map per image, got {heat.shape}")
    _, h, w, _ = images.shape
    peak = heat.max(axis=(1, 2), keepdims=True)
    heat = np.divide(heat, peak, out=np.zeros_like(heat), where=peak > 0)
    up = np.clip(_linear_weights(heat.shape[1], h) @ heat @ _linear_weights(heat.shape[2], w).T, 0.0, 1.0).ravel()
    # Indexed as matplotlib quantises [0, 1] into its table.
    level = np.minimum(up * _JET_LEVELS, _JET_LEVELS - 1).astype(np.uint8)
    a = np.rint(alpha * 255.0 * up).astype(np.uint16)
    keep = 255 - a
    # One channel at a time over flat pixel rows: numpy's loops over a trailing axis of 3 with
    # a broadcast weight ran 3x slower than these (0.11 → 0.04 ms per 64 px overlay).
    pixels = images.reshape(-1, 3)
    out = np.empty_like(pixels)
    for c, table in enumerate(_jet_channels()):
        t = pixels[:, c] * keep
        t += table.take(level) * a
        t += 128
        t += t >> 8  # t / 255, rounded, without a division
        t >>= 8
        out[:, c] = t
    return out.reshape(images.shape)


@functools.lru_cache(maxsize=32)
def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation between pixel centres, clamped at the edges."""
    centre = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    lower = np.floor(centre).astype(np.int64)
    upper = np.minimum(lower + 1, n_in - 1)
    frac = (centre - lower).astype(np.float32)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, lower), 1.0 - frac)
    np.add.at(weights, (rows, upper), frac)
    return weights


def pointing_game(amap: np.ndarray, bbox: Sequence[float], image_hw: tuple[int, int]) -> bool:
    """True if the centre of the map's highest cell lies in `bbox` (x1, y1, x2, y2).

    The map's grid is taken to cover the whole image of size `image_hw` = (H, W)
    (the model input was a resize, not a crop), so cell (r, c) has its centre at
    ((c + 0.5)·W/cols, (r + 0.5)·H/rows). The box edges count as inside; on ties
    the first cell in row-major order is the highest.
    """
    heat = _as_map(amap)
    x1, y1, x2, y2 = _as_box(bbox)
    rows, cols = heat.shape
    height, width = image_hw
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    x = (c + 0.5) * width / cols
    y = (r + 0.5) * height / rows
    return bool(x1 <= x <= x2 and y1 <= y <= y2)


def energy_in_box(amap: np.ndarray, bbox: Sequence[float], image_hw: tuple[int, int]) -> float:
    """Share of the map's mass inside `bbox` (x1, y1, x2, y2), in [0, 1].

    Each cell of the map is a rectangle of the image (grid over the whole image,
    as in `pointing_game`) and counts with the fraction of its area that the box
    covers: energy = Σ map·overlap / Σ map. This is exact for the map held
    constant over each cell (nearest upsampling), with no resampling. Negative
    values count as 0; a map with no mass has energy 0.
    """
    heat = np.clip(_as_map(amap), 0.0, None)
    x1, y1, x2, y2 = _as_box(bbox)
    rows, cols = heat.shape
    height, width = image_hw
    total = heat.sum()
    if total <= 0:
        return 0.0
    # Overlap is separable: (share of each column's width) × (share of each row's height).
    overlap_x = _interval_overlap(np.arange(cols + 1) * width / cols, x1, x2)
    overlap_y = _interval_overlap(np.arange(rows + 1) * height / rows, y1, y2)
    return float((heat * np.outer(overlap_y, overlap_x)).sum() / total)


# --- helpers -------------------------------------------------------------------


def _check_attentions(attentions: Sequence[torch.Tensor] | None) -> None:
    # SDPA and flash attention return an empty tuple (or Nones) instead of weights.
    if not attentions or any(a is None for a in attentions):
        raise ValueError(
            "the model returned no attention weights; load it with "
            'attn_implementation="eager" (SDPA and flash attention do not return them)'
        )
    last = len(attentions) - 1
    for i, a in enumerate(attentions):
        square = a.dim() == 4 and a.shape[-2] == a.shape[-1]
        cls_row = a.dim() == 4 and i == last and a.shape[-2] == 1  # see rollout
        if not (square or cls_row):
            raise ValueError(f"attentions must be (B, H, N, N) per layer, got {tuple(a.shape)}")


def _fuse_heads(attention: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    return attention.amin(dim=1)


def _rollout_fused(fused: Sequence[torch.Tensor], discard_ratio: float) -> torch.Tensor:
    """Steps 2-5 of `rollout` on head-fused layers (B, N, N)."""
    import torch

    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    n = fused[0].shape[-1]
    if discard_ratio > 0 and fused[-1].shape[-2] != n:
        raise ValueError("a discard ranks every row of the last layer: pass its whole attention matrix")
    # Only row 0 of R = Â_L ··· Â_1 is needed: e_0ᵀ Â_L, then times Â_(L-1) ... Â_1,
    # a vector through the layers (N² each) instead of the whole product (N³ each).
    # Â = D⁻¹(0.5·A + 0.5·I) with D the row sums, so row·Â = 0.5·(u·A) + 0.5·u where
    # u = row / diag(D): Â itself is never built (on a CPU its passes cost as much as
    # the products). The 0.5·I term keeps every row sum >= 0.5: no division by zero.
    row = None
    for a in reversed(fused):
        a = a.float()
        if discard_ratio > 0:
            a = _discard_lowest(a, discard_ratio)
        sums = a.sum(dim=-1).mul_(0.5).add_(0.5)  # (B, rows of a)
        if row is None:  # the last layer: its CLS row is the start (all of a may be that row)
            row = (0.5 * a[:, :1, :]).div_(sums[:, :1, None])
            row[:, 0, 0] += 0.5 / sums[:, 0]
        else:
            u = row / sums[:, None, :]
            row = torch.baddbmm(u, u, a, beta=0.5, alpha=0.5)
    cls_to_patches = row[:, 0, 1:]
    peak = cls_to_patches.amax(dim=-1, keepdim=True)
    return cls_to_patches / peak.clamp(min=torch.finfo(torch.float32).tiny)


def _discard_lowest(a: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    import torch

    # One ranking per image over all entries outside the CLS column: the CLS
    # column carries what flows back into the CLS token and must survive.
    batch, n, _ = a.shape
    body = a[:, :, 1:].reshape(batch, -1)
    k = int(discard_ratio * body.shape[1])
    if k == 0:
        return a
    lowest = body.topk(k, dim=-1, largest=False).indices
    body = body.scatter(1, lowest, 0.0)
    return torch.cat([a[:, :, :1], body.reshape(batch, n, n - 1)], dim=-1)


@contextlib.contextmanager
def _last_layer_cls_row(model: Any, enabled: bool) -> Iterator[None]:
    """Mark the last encoder layer's attention for `attention_with_weights`' CLS-row mode."""
    # The module that hands its q, k, v to the attention function: ViTAttention (q_proj)
    # in transformers 5, ViTSelfAttention (query) before; modules() lists the last layer last.
    found = [m for m in model.modules() if hasattr(m, "q_proj") or hasattr(m, "query")] if enabled else []
    module = found[-1] if found else None
    if module is None:
        yield
        return
    setattr(module, _CLS_ROW_ONLY, True)
    try:
        yield
    finally:
        setattr(module, _CLS_ROW_ONLY, False)


def _forward(model: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)
    out = model(pixel_values=pixel_values, output_attentions=True)
    _check_attentions(out.attentions)
    return out.logits, tuple(out.attentions)


def _patch_grid(config: Any) -> tuple[int, int]:
    size, patch = config.image_size, config.patch_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return height // patch_h, width // patch_w


_JET_LEVELS = 256  # entries of matplotlib's "jet" lookup table


@functools.lru_cache(maxsize=1)
def _jet_channels() -> np.ndarray:
    """matplotlib's "jet" table as (3, 256) uint16, one contiguous row per channel (integers index its table)."""
    from matplotlib import colormaps

    return np.ascontiguousarray(np.rint(colormaps["jet"](np.arange(_JET_LEVELS))[:, :3] * 255.0).astype(np.uint16).T)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"overlay needs a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"overlay needs an HxW or HxWxC image, got shape {image.shape}")
    return _channels_as_rgb(image)


def _channels_as_rgb(images: np.ndarray) -> np.ndarray:
    """Channels-last uint8 (..., C) → (..., 3): RGB(A) keeps its colours, other counts show channel 0."""
    if images.shape[-1] in (3, 4):
        return np.ascontiguousarray(images[..., :3])
    return np.repeat(images[..., :1], 3, axis=-1)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    """PIL's default font at `size` px (loading it is most of a caption's cost)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _draw_caption(image: Image.Image, text: str) -> None:
    from PIL import ImageDraw

    size = max(12, min(image.size) // 14)
    font = _font(size)
    draw = ImageDraw.Draw(image)
    pad = max(2, size // 4)
    left, top, right, bottom = draw.textbbox((pad, pad), text, font=font)
    draw.rectangle((0, 0, right + pad, bottom + pad), fill=(0, 0, 0))
    draw.text((pad, pad), text, fill=(255, 255, 255), font=font)


def _as_map(amap: np.ndarray) -> np.ndarray:
    heat = np.asarray(amap, dtype=np.float64)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"attention map must be a non-empty 2-D (rows, cols) array, got shape {heat.shape}")
    return heat


def _as_box(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    if len(bbox) != 4:
        raise ValueError(f"bbox must be x1, y1, x2, y2, got {list(bbox)}")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return x1, y1, x2, y2


def _interval_overlap(edges: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fraction of each interval [edges[i], edges[i+1]] covered by [lo, hi]."""
    covered = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)
    return covered / np.diff(edges)
