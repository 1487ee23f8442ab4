"""Anomaly scores and maps of images against a bank: a Ray Data callable class, also called in process.

`AnomalyScorer` takes the batches the model stage already has (a uint8 `image` column of shape
(B, S, S, C) at the bank's input size, as `vitray.inference.prepare_images` makes them, and
`error_kind` where rows failed to decode) and adds:

- `anomaly_score` float32 per image: the largest distance of any of its patches to the nearest
  good patch in the bank (PatchCore's image score); above the bank's `threshold`, anomalous;
- `anomaly_map` float32 (B, rows*cols), row-major: each patch's raw distance to the nearest
  good patch (not normalised: comparable across images and runs of the same bank).

Rows that failed to decode get NaN. `score_hidden_states` does the same from the hidden states of
a forward pass already made (a classifier whose backbone is the bank's encoder), so that scoring
with the anomaly head then costs one forward pass, not two. `columns` turns maps into the
columns a scoring run commits: `anomaly_score` and `anomalous` (above the bank's threshold).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vitray.anomaly.bank import Bank, load_bank, nearest_distances
from vitray.anomaly.features import Encoder, FeatureSpec, load_encoder, patch_features, pool_hidden_states
from vitray.errors import VitrayError

FEATURE_CHUNK_CPU = 64  # images per encoder pass on a CPU


class AnomalyScorer:
    """Ray Data UDF: adds `anomaly_score` and `anomaly_map` to batches with a uint8 `image` column."""

    def __init__(self, bank: str | Bank, encoder: str | None = None, backbone: tuple[Any, Any] | None = None) -> None:
        """`backbone`: (a loaded ViTModel, its Preprocessing), used instead of loading the bank's
        encoder when it is that encoder (the same weights and preprocessing): `shared` is then True."""
        import torch

        self.bank = load_bank(bank) if isinstance(bank, str) else bank
        meta = self.bank.meta
        self.encoder: Encoder
        self.shared = backbone is not None and _is_encoder_of(backbone, meta)
        if self.shared:
            model, prep = backbone  # type: ignore[misc]
            self.encoder = Encoder(model, prep, tuple(meta.grid), int(model.config.num_hidden_layers),
                                   meta.fingerprint)
        else:
            self.encoder = load_encoder(encoder or meta.encoder)
            check_same_encoder(self.encoder, meta, encoder or meta.encoder)
        self.spec = FeatureSpec(tuple(meta.layers), meta.neighbourhood)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder.model.to(self.device)
        self.features = self.bank.features.to(self.device)
        self.features_sq = (self.features * self.features).sum(dim=1)
        self.chunk = FEATURE_CHUNK_CPU if self.device.type == "cpu" else 1024
        self.threshold = float(meta.threshold)

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.asarray(batch["image"])
        n, cells = len(images), self.grid[0] * self.grid[1]
        ok = (np.asarray(batch["error_kind"]) == "") if "error_kind" in batch else np.ones(n, dtype=bool)
        size = self.encoder.prep.size
        if n and images.shape[1:3] != (size, size):
            raise VitrayError(f"anomaly: images of {images.shape[1]}x{images.shape[2]} px, the bank's encoder takes "
                              f"{size}x{size} (prepare them at the bank's size)")
        maps = np.full((n, cells), np.nan, dtype=np.float32)
        if ok.any():
            feats = patch_features(self.encoder, images[ok], self.spec, chunk=self.chunk)
            maps[ok] = self.distances(feats)
        out = dict(batch)
        out["anomaly_map"] = maps
        out["anomaly_score"] = image_scores(maps)
        return out

    def distances(self, feats: Any) -> np.ndarray:
        """(B, P, D) patch features → (B, P) float32 distances to the nearest bank row."""
        import torch

        b, p, d = feats.shape
        # In float32 whatever the caller's autocast: a distance is a difference of large squares.
        with torch.autocast(self.device.type, enabled=False):
            dist = nearest_distances(feats.reshape(b * p, d).to(self.device).float(), self.features,
                                     self.features_sq)
        return dist.reshape(b, p).float().cpu().numpy()

    def columns(self, maps: np.ndarray) -> dict[str, np.ndarray]:
        """What a scoring run commits per image: `anomaly_score`, and `anomalous` (above the threshold)."""
        scores = image_scores(maps)
        return {"anomaly_score": scores, "anomalous": np.nan_to_num(scores, nan=-np.inf) > self.threshold}

    def score_hidden_states(self, hidden_states: Sequence[Any]) -> dict[str, np.ndarray]:
        """`anomaly_score` and `anomaly_map` from a forward pass's hidden states (the bank's encoder's)."""
        feats = pool_hidden_states(hidden_states, self.spec, self.grid)
        maps = self.distances(feats)
        return {"anomaly_score": image_scores(maps), "anomaly_map": maps}


def image_scores(maps: np.ndarray) -> np.ndarray:
    """Per image: its largest patch distance (NaN for a row without a map)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.size == 0:
        return np.zeros(len(maps), dtype=np.float32)
    out = np.full(len(maps), np.nan, dtype=np.float32)
    has = ~np.isnan(maps).all(axis=1)
    out[has] = np.nanmax(maps[has], axis=1)
    return out


def _is_encoder_of(backbone: tuple[Any, Any], meta: Any) -> bool:
    from vitray.anomaly.features import weights_fingerprint

    model, prep = backbone
    return (int(prep.size) == int(meta.size) and tuple(map(float, prep.mean)) == tuple(map(float, meta.mean))
            and tuple(map(float, prep.std)) == tuple(map(float, meta.std))
            and weights_fingerprint(model) == meta.fingerprint)


def check_same_encoder(encoder: Encoder, meta: Any, uri: str) -> None:
    """A bank is only valid for the encoder that made it: the same weights, the same grid."""
    if encoder.fingerprint != meta.fingerprint or tuple(encoder.grid) != tuple(meta.grid):
        raise VitrayError(f"the anomaly bank was made with another encoder than {uri} (weights differ); "
                          "fit a bank for this encoder with vitray anomaly")


def anomaly_overlay_png(image: np.ndarray, amap: np.ndarray, grid: tuple[int, int], score: float,
                        threshold: float) -> bytes:
    """PNG bytes: `image` (H, W, C uint8) with its anomaly map (patch grid, upsampled bilinearly, scaled
    to its own max as the attention overlays are), captioned with the score and whether it passes."""
    from vitray.overlays import overlay
    from vitray.png import encode

    heat = np.clip(np.nan_to_num(np.asarray(amap, dtype=np.float32)), 0, None).reshape(grid)
    verdict = "anomaly" if score > threshold else "normal"
    picture = overlay(np.asarray(image), heat, label=f"{verdict} {score:.2f}/{threshold:.2f}")
    return encode(np.asarray(picture))
