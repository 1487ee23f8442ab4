"""A memory bank of good patch features: stored as safetensors + JSON, searched for nearest neighbours.

`BANK/bank.safetensors` holds the features (never a pickle); `BANK/bank.json` says what made
them (the encoder's fingerprint, layers, neighbourhood, grid, preprocessing) and the threshold.
bank.json is written last, so a folder without it is no bank (a killed fit left it). Nearest
neighbours are exact: squared distances as one matrix product per slice of the bank, so that
the memory a query takes is bounded by the slice, not the bank.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from vitray import storage
from vitray.errors import VitrayError

FEATURES_FILE = "bank.safetensors"
META_FILE = "bank.json"
SUMMARY_FILE = "fit.json"
FORMAT = "vitray-anomaly-bank/1"
BANK_SLICE = 8192  # bank rows per product
QUERY_BLOCK = 4096  # query rows per product: with BANK_SLICE, bounds the scratch memory of a search


@dataclass(frozen=True)
class BankMeta:
    """What a bank was made from and how its scores read."""

    encoder: str  # the encoder's URI at fit time
    fingerprint: str  # weights_fingerprint of the encoder
    layers: tuple[int, ...]
    neighbourhood: int
    grid: tuple[int, int]
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rows: int
    dim: int
    threshold: float  # image score above which an image is anomalous
    false_reject_rate: float  # share of held-out good images above the threshold, as asked
    good_patch_level: float  # mean patch distance on held-out good images
    format: str = FORMAT

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "BankMeta":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise VitrayError(f"{where}: not a vitray anomaly bank (format {d.get('format') if isinstance(d, dict) else None})")
        try:
            return cls(**{**d, "layers": tuple(d["layers"]), "grid": tuple(d["grid"]), "mean": tuple(d["mean"]),
                          "std": tuple(d["std"])})
        except (TypeError, KeyError) as exc:
            raise VitrayError(f"{where}: bank.json is incomplete ({exc})") from None


@dataclass
class Bank:
    features: Any  # torch float32 (rows, dim)
    meta: BankMeta


def save_bank(bank: Bank, uri: str) -> None:
    """Features first, bank.json last: a reader never takes a half-written folder for a bank."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="vitray-bank-") as tmp:
        path = os.path.join(tmp, FEATURES_FILE)
        save_file({"features": bank.features.contiguous()}, path, metadata={"format": FORMAT})
        with open(path, "rb") as f:
            storage.write_bytes(storage.join(uri, FEATURES_FILE), f.read(), durable=True)
    storage.write_json(storage.join(uri, META_FILE), asdict(bank.meta))


def read_meta(uri: str) -> BankMeta:
    """bank.json of a bank, checked; one line when there is none."""
    where = storage.join(uri, META_FILE)
    if not storage.exists(where):
        raise VitrayError(f"{uri}: not an anomaly bank (no {META_FILE}; make one with vitray anomaly)")
    try:
        d = storage.read_json(where)
    except (OSError, ValueError) as exc:
        raise VitrayError(f"{where}: cannot read ({exc})") from None
    return BankMeta.from_dict(d, where)


def load_bank(uri: str) -> Bank:
    from safetensors.torch import load

    meta = read_meta(uri)
    try:
        tensors = load(storage.read_bytes(storage.join(uri, FEATURES_FILE)))
    except (OSError, ValueError, RuntimeError) as exc:
        raise VitrayError(f"{uri}: cannot read {FEATURES_FILE} ({str(exc).splitlines()[0] if str(exc) else exc})") \
            from None
    features = tensors.get("features")
    if features is None or tuple(features.shape) != (meta.rows, meta.dim):
        raise VitrayError(f"{uri}: {FEATURES_FILE} does not match {META_FILE} "
                          f"(shape {None if features is None else tuple(features.shape)}, expected {(meta.rows, meta.dim)})")
    return Bank(features.float(), meta)


def nearest_distances(queries: Any, bank: Any, bank_sq: Any | None = None, slice_rows: int = BANK_SLICE,
                      query_rows: int = QUERY_BLOCK) -> Any:
    """Euclidean distance of each query row (M, D) to its nearest bank row (N, D) → (M,), exact.

    Scratch memory is one (query_rows, slice_rows) block, whatever M and N.
    """
    import torch

    b_sq = (bank * bank).sum(dim=1) if bank_sq is None else bank_sq
    out = torch.empty(len(queries), device=queries.device)
    for q_start in range(0, len(queries), query_rows):
        q = queries[q_start:q_start + query_rows].float()
        q_sq = (q * q).sum(dim=1, keepdim=True)
        best = torch.full((len(q),), float("inf"), device=q.device)
        for start in range(0, len(bank), slice_rows):
            part = bank[start:start + slice_rows]
            d = torch.addmm(b_sq[start:start + slice_rows].unsqueeze(0), q, part.T, alpha=-2.0).add_(q_sq)
            torch.minimum(best, d.min(dim=1).values, out=best)
        out[q_start:q_start + len(q)] = best
    return out.clamp_(min=0).sqrt_()


def write_summary(uri: str, summary: dict) -> None:
    storage.write_json(storage.join(uri, SUMMARY_FILE), json.loads(json.dumps(summary)))
