"""Attention rollout and gradient-weighted rollout for Hugging Face ViTs: where did the model look.

`attention_maps` runs a model and returns its maps on the patch grid with its logits; the model
is loaded with `vitray.attention`'s weights attention. Overlays are drawn by `vitray.overlays`;
maps are measured against boxes by `vitray.localisation`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vitray.attention import HEAD_FUSIONS, cls_row_only, fuse_heads

if TYPE_CHECKING:
    import torch

METHODS = ("rollout", "grad-rollout")


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
    fused = [fuse_heads(a.float(), head_fusion) for a in attentions]
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
            with torch.inference_mode(), cls_row_only(model, enabled=discard_ratio == 0):
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


def method_option() -> Any:
    """The `--method` option of the commands that draw maps (`vitray.options`)."""
    from vitray.options import option

    return option("rollout", "how maps are made", choices=METHODS,
                  doc="`rollout` or `grad-rollout` (see [attention maps](attention-maps.md))")


def head_fusion_option() -> Any:
    from vitray.options import option

    return option("mean", "how a layer's heads are combined (rollout)", choices=HEAD_FUSIONS,
                  doc="how rollout combines a layer's heads: `mean`, `max`, `min`")


def discard_ratio_option() -> Any:
    from vitray.options import option

    return option(0.0, "share of the weakest attention links dropped per layer, in [0, 1)", metavar="F")


def check_map_options(method: str, head_fusion: str, discard_ratio: float) -> None:
    """One-line errors for the map options of `explain` and `score`."""
    from vitray.errors import VitrayError

    if method not in METHODS:
        raise VitrayError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if head_fusion not in HEAD_FUSIONS:
        raise VitrayError(f"--head-fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise VitrayError(f"--discard-ratio must be in [0, 1), got {discard_ratio}")


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
