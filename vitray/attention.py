"""An attention function for transformers' ViT that returns its weights: `attention_with_weights`,
registered under a name (`register_weights_attention`) that a model takes as `attn_implementation`.

Eager attention's result, cheaper on a CPU; with a head fusion or the CLS row only (`cls_row_only`),
what a rollout needs of every layer and no more. The maps themselves are `vitray.rollout`'s.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

HEAD_FUSIONS = ("mean", "max", "min")
# The attn_implementation that returns attention weights (see `attention_with_weights`).
WEIGHTS_ATTENTION = "vitray_weights"
# Set on a rollout's last attention module while `cls_row_only` is in force.
CLS_ROW_ONLY = "_vitray_cls_row_only"


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

    A module marked by `cls_row_only` as a rollout's last layer (`CLS_ROW_ONLY`) returns
    only the CLS row of its weights, (B, H or 1, 1, N): that row is all rollout uses of
    the last layer, so the layer's output comes from SDPA and softmax runs over one row
    of N instead of N rows (on a CPU the exponentials are most of the weights' cost).
    """
    import torch

    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if attention_mask is None and getattr(module, CLS_ROW_ONLY, False):
        output = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout if module.training else 0.0, scale=scaling)
        cls_scores = torch.matmul(query[:, :, :1] * scaling, key.transpose(2, 3))
        weights = torch.softmax(cls_scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if head_fusion is not None:
            weights = fuse_heads(weights, head_fusion).unsqueeze(1)
        return output.transpose(1, 2).contiguous(), weights
    scores = torch.matmul((query * scaling).contiguous(), key.contiguous().transpose(2, 3))
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value.contiguous()).transpose(1, 2).contiguous()
    if head_fusion is not None:
        weights = fuse_heads(weights, head_fusion).unsqueeze(1)
    return output, weights


def fuse_heads(attention: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """(B, H, N, N) attentions → (B, N, N): the heads' mean, max or min."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    return attention.amin(dim=1)


@contextlib.contextmanager
def cls_row_only(model: Any, enabled: bool) -> Iterator[None]:
    """Mark the last encoder layer's attention for `attention_with_weights`' CLS-row mode."""
    # The module that hands its q, k, v to the attention function: ViTAttention (q_proj)
    # in transformers 5, ViTSelfAttention (query) before; modules() lists the last layer last.
    found = [m for m in model.modules() if hasattr(m, "q_proj") or hasattr(m, "query")] if enabled else []
    module = found[-1] if found else None
    if module is None:
        yield
        return
    setattr(module, CLS_ROW_ONLY, True)
    try:
        yield
    finally:
        setattr(module, CLS_ROW_ONLY, False)
