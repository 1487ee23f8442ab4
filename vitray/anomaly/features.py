"""Patch features of a ViT encoder for anomaly detection: chosen layers, neighbourhood-pooled.

Any transformers ViT serves as the encoder: a `vitray pretrain` encoder (a `ViTModel`), a trained
vitray classifier (its backbone; the head is left out) or a hub ViT in `save_pretrained` layout.
Each chosen layer's patch tokens are layer-normalised (no affine: the residual stream's scale
differs between layers), averaged over a k x k neighbourhood of patches (PatchCore's local
awareness) and concatenated.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vitray.errors import VitrayError


@dataclass(frozen=True)
class FeatureSpec:
    """Which encoder layers (`hidden_states` indices: 0 the patch embeddings, L the last layer) and how
    wide a neighbourhood."""

    layers: tuple[int, ...]
    neighbourhood: int = 3

    def check(self, num_layers: int, where: str) -> None:
        if not self.layers:
            raise VitrayError("--layers: name at least one encoder layer")
        bad = [layer for layer in self.layers if not 0 <= layer <= num_layers]
        if bad:
            raise VitrayError(f"--layers {','.join(map(str, self.layers))}: {where} has encoder layers "
                              f"1 to {num_layers}, and 0 for the patch embeddings (got {bad[0]})")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise VitrayError(f"--neighbourhood {self.neighbourhood}: use an odd number of patches, at least 1")


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The patch embeddings and the layer a quarter up: local detail first. A ViT's deeper layers
    mix every patch with the whole image (and a classifier's are specialised to its classes), so a
    small defect fades from its own patch's token there (docs/anomaly.md#choosing-the-layers)."""
    return (0, max(1, round(num_layers / 4))) if num_layers >= 1 else (0,)


FINE_GRID = 16  # patches a side from which a 3 x 3 neighbourhood is the default


def default_neighbourhood(grid: tuple[int, int]) -> int:
    """3 x 3 patches (PatchCore's local awareness) on a grid of at least 16 patches a side; on a
    coarser grid a patch already covers a large part of the image, and averaging its neighbours
    would dilute a small defect into the good context around it: 1."""
    return 3 if min(grid) >= FINE_GRID else 1


@dataclass
class Encoder:
    """A loaded ViT encoder, its preprocessing, patch grid and a fingerprint of its weights."""

    model: Any  # transformers ViTModel, eval mode
    prep: Any  # vitray.models.Preprocessing
    grid: tuple[int, int]
    num_layers: int
    fingerprint: str


def encoder_config(uri: str) -> dict:
    """config.json of `uri`, checked to be a ViT (one line otherwise), without loading weights."""
    from vitray.models.building import local_model_dir
    from vitray import storage

    local = local_model_dir(uri)
    try:
        config = storage.read_json(f"{local}/config.json")
    except (OSError, ValueError) as exc:
        raise VitrayError(f"{uri}: cannot read config.json ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "vit":
        raise VitrayError(f"{uri}: not a ViT encoder (model_type={model_type}); give a `vitray pretrain` "
                          "encoder, a vitray classifier or a transformers ViT folder")
    return config


def encoder_grid(config: dict, uri: str) -> tuple[int, int]:
    """The patch grid of an encoder's config.json, without loading its weights."""
    from vitray.models.building import patch_side
    from vitray.models.preprocessing import square_side

    side = square_side(config.get("image_size", 224), uri) // patch_side(config.get("patch_size", 16))
    return side, side


def load_encoder(uri: str) -> Encoder:
    """The ViT encoder at `uri` (folder or s3:// prefix), in eval mode with SDPA attention."""
    import dataclasses

    from transformers import ViTModel

    from vitray.models import Preprocessing
    from vitray.models.building import OFFLINE_LOAD, first_line, local_model_dir, patch_side
    from vitray.models.preprocessing import square_side

    config = encoder_config(uri)
    local = local_model_dir(uri)
    try:
        model, info = ViTModel.from_pretrained(local, add_pooling_layer=False, output_loading_info=True,
                                               attn_implementation="sdpa", **OFFLINE_LOAD)
    except (OSError, ValueError, RuntimeError) as exc:
        raise VitrayError(f"{uri}: cannot load the encoder: {first_line(exc)}") from None
    missing = [k for k in info.get("missing_keys") or [] if "pooler" not in k]
    if missing:
        raise VitrayError(f"{uri}: the weights do not hold a ViT encoder (missing {', '.join(sorted(missing)[:3])})")
    model.eval()
    size = square_side(model.config.image_size, uri)
    try:
        prep = Preprocessing.load(local, channels=model.config.num_channels)
    except (OSError, VitrayError):
        prep = Preprocessing.default(size, model.config.num_channels)
    prep = dataclasses.replace(prep, size=size)
    side = size // patch_side(model.config.patch_size)
    return Encoder(model, prep, (side, side), int(model.config.num_hidden_layers), weights_fingerprint(model))


def weights_fingerprint(model: Any) -> str:
    """sha256 over the encoder's tensors in name order: a bank is only valid for the encoder that made it."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "pooler" in name:
            continue
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().float().numpy().tobytes())
    return h.hexdigest()[:32]


def patch_features(encoder: Encoder, images: np.ndarray, spec: FeatureSpec, chunk: int = 64) -> Any:
    """uint8 (B, S, S, C) images → float32 torch tensor (B, rows*cols, D) of pooled patch features."""
    import torch

    from vitray.data.preprocess import normalize

    prep = encoder.prep
    device = next(encoder.model.parameters()).device
    outs = []
    with torch.inference_mode():
        for part in torch.from_numpy(np.ascontiguousarray(images)).split(chunk):
            x = normalize(part.to(device), prep.mean, prep.std)
            hidden = encoder.model(pixel_values=x, output_hidden_states=True).hidden_states
            outs.append(pool_hidden_states(hidden, spec, encoder.grid))
    if not outs:
        return torch.zeros((0, encoder.grid[0] * encoder.grid[1], 0))
    return torch.cat(outs)


def pool_hidden_states(hidden: Sequence[Any], spec: FeatureSpec, grid: tuple[int, int]) -> Any:
    """A ViT's `hidden_states` (embeddings, then one per layer; CLS first) → (B, rows*cols, D) features."""
    import torch
    import torch.nn.functional as F

    rows, cols = grid
    per_layer = []
    for layer in spec.layers:
        tokens = hidden[layer][:, -rows * cols:, :].float()  # the patch tokens (CLS dropped)
        tokens = F.layer_norm(tokens, tokens.shape[-1:])
        if spec.neighbourhood > 1:
            maps = tokens.transpose(1, 2).reshape(len(tokens), -1, rows, cols)
            maps = F.avg_pool2d(maps, spec.neighbourhood, stride=1, padding=spec.neighbourhood // 2,
                                count_include_pad=False)
            tokens = maps.reshape(len(tokens), -1, rows * cols).transpose(1, 2)
        per_layer.append(tokens)
    return torch.cat(per_layer, dim=-1)
