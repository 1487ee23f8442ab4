"""Where did the model look: attention rollout and gradient-weighted rollout for Hugging
Face ViTs, and the `vitray explain` command that draws them for a few images.

Overlays are drawn by `vitray.overlays`; maps are measured against boxes by `vitray.localisation`.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import posixpath
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

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
        logits, attentions = forward_with_attentions(model, pixel_values)
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
    rows, cols = patch_grid(model.config)
    parts = pixel_values.split(chunk) if chunk else (pixel_values,)
    was_training = model.training
    model.eval()
    try:
        if method == "rollout":
            done = []
            # The discard ranks the whole matrix of every layer, the last one's too.
            with torch.inference_mode(), _last_layer_cls_row(model, enabled=discard_ratio == 0):
                for part in parts:
                    logits, attentions = forward_with_attentions(model, part)
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


def forward_with_attentions(model: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The logits and every layer's attention weights of one forward pass (the model's dtype and device)."""
    pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)
    out = model(pixel_values=pixel_values, output_attentions=True)
    _check_attentions(out.attentions)
    return out.logits, tuple(out.attentions)


def patch_grid(config: Any) -> tuple[int, int]:
    """(rows, columns) of a ViT config's patches."""
    size, patch = config.image_size, config.patch_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return height // patch_h, width // patch_w


def check_map_options(method: str, head_fusion: str, discard_ratio: float) -> None:
    """One-line errors for the map options of `explain` and `score`."""
    from vitray.errors import VitrayError

    if method not in METHODS:
        raise VitrayError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if head_fusion not in HEAD_FUSIONS:
        raise VitrayError(f"--head-fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise VitrayError(f"--discard-ratio must be in [0, 1), got {discard_ratio}")


# --------------------------------------------------------------------------- the explain command


def explain_images(model: str, images: Sequence[str], out: str, method: str = "rollout",
                   head_fusion: str = "mean", discard_ratio: float = 0.0) -> list[dict]:
    """Attention maps for a few images, without Ray; returns one dict per image.

    Writes `OUT/<name>.png` (overlay on the image as the model saw it, with label and
    score), `OUT/<name>_input.png` (that image, enlarged for viewing) and `OUT/<name>.npy`
    (the map on the patch grid, max-normalised). `<name>` is the file's stem, made unique.
    """
    import torch

    from vitray.data.preprocess import normalize, resize_image
    from vitray.data.decode import ImageError, decode_image
    from vitray import storage
    from vitray.errors import VitrayError
    from vitray.models import load_trained
    from vitray.overlays import overlay
    from vitray.png import encode

    check_map_options(method, head_fusion, discard_ratio)
    if not images:
        raise VitrayError("explain: give at least one image")
    net, prep, labels = load_trained(model, attn_implementation=register_weights_attention())
    pixels = []
    for uri in images:  # every image is checked before anything is written
        try:
            pixels.append(resize_image(decode_image(storage.read_bytes(uri)), prep.size, prep.channels))
        except ImageError as exc:
            raise VitrayError(f"{uri}: {exc.kind}: {exc}") from None
    x = normalize(torch.from_numpy(np.stack(pixels)), prep.mean, prep.std)
    maps, logits = attention_maps(net, x, method=method, head_fusion=head_fusion, discard_ratio=discard_ratio)
    probs = torch.softmax(logits.float(), dim=-1)
    scores, preds = probs.max(dim=-1)
    results = []
    for uri, name, image, amap, pred, prob in zip(images, _unique_names(images), pixels, maps.numpy(),
                                                  preds.tolist(), scores.tolist()):
        label = labels[pred]
        shown = overlay(image, amap, label=label, score=prob)
        files = {"png": storage.join(out, f"{name}.png"), "input_png": storage.join(out, f"{name}_input.png"),
                 "npy": storage.join(out, f"{name}.npy")}
        storage.write_bytes(files["png"], encode(np.asarray(shown)))
        storage.write_bytes(files["input_png"], encode(np.asarray(_enlarged(image, shown.size))))
        buf = io.BytesIO()
        np.save(buf, amap.astype(np.float32))
        storage.write_bytes(files["npy"], buf.getvalue())
        results.append({"image": uri, "label": label, "score": round(float(prob), 4), **files})
    return results


def _unique_names(uris: Sequence[str]) -> list[str]:
    names, seen = [], {}
    for uri in uris:
        stem = os.path.splitext(posixpath.basename(uri.rstrip("/")))[0] or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def _enlarged(image: np.ndarray, size: tuple[int, int]) -> Any:
    from PIL import Image

    pil = Image.fromarray(image[:, :, 0], mode="L") if image.shape[2] == 1 else Image.fromarray(image, mode="RGB")
    return pil.resize(size, Image.Resampling.NEAREST)  # crisp pixels, the same size as the overlay
