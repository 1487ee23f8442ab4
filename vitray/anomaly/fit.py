"""Fitting a bank from good images: features on Ray Data actors (or in this process), coresets, a threshold.

The good images are split (seeded) into those that fill the bank and a held-out share that
sets the threshold at the asked false-reject rate. Each feature call takes a chunk of images
and returns the greedy coreset of their patches, so the reduction runs on the workers; the
driver merges the parts into a `CappedBank`. A run holds the output's lease; its bank.json is
removed first and written last, so a killed fit leaves no bank and the same command restarts it.
"""
from __future__ import annotations

import resource
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from vitray import storage
from vitray.anomaly.bank import META_FILE, Bank, BankMeta, save_bank, write_summary
from vitray.anomaly.config import AnomalyConfig
from vitray.anomaly.coreset import CappedBank, coreset_size, greedy_coreset
from vitray.anomaly.features import (FeatureSpec, default_layers, default_neighbourhood, encoder_config, encoder_grid,
                                     load_encoder, patch_features)
from vitray.domain import OK_CLASS as GOOD_LABEL
from vitray.errors import VitrayError

PREPARE_BATCH = 64


@dataclass
class FitResult:
    out: str
    meta: BankMeta
    summary: dict


class FeatureCoreset:
    """Ray Data UDF: a chunk of uint8 images → the greedy coreset of their patch features (`feature` rows)."""

    def __init__(self, model: str, spec: FeatureSpec, fraction: float, seed: int) -> None:
        import torch

        self.encoder = load_encoder(model)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder.model.to(self.device)
        self.spec, self.fraction, self.seed = spec, fraction, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["error_kind"]) == ""
        if not ok.any():
            return {"feature": np.zeros((0, 1), dtype=np.float32)}
        feats = patch_features(self.encoder, np.asarray(batch["image"])[ok], self.spec).cpu()
        flat = feats.reshape(-1, feats.shape[-1])
        # Seeded by the chunk's first image: the same chunk keeps the same patches on any worker.
        seed = self.seed + zlib.crc32(str(batch["id"][0]).encode())
        keep = greedy_coreset(flat, coreset_size(len(flat), self.fraction), seed=seed)
        return {"feature": flat[keep].numpy()}


def good_ids(source: Any) -> list[str]:
    """The images to fit on: all of them, or those labelled `passed` where the data has labels."""
    if source.labels and GOOD_LABEL in source.labels:
        good = source.labels.index(GOOD_LABEL)
        ids = [i for i, label in zip(source.ids, source.row_labels) if label == good]
        if not ids:
            raise VitrayError(f"{source.uri}: no good images (no image labelled {GOOD_LABEL})")
        return ids
    if source.labels and len(source.labels) > 1:
        raise VitrayError(f"{source.uri}: labelled {', '.join(source.labels)} but none {GOOD_LABEL}: give the good "
                          "images only (a folder, or a data set with a passed class)")
    return list(source.ids)


def fit_bank(config: AnomalyConfig) -> FitResult:
    """Fit OUT/bank.safetensors, OUT/bank.json and OUT/fit.json from the good images of `config.data`."""
    from vitray.data.sources import inspect_source
    from vitray.models.specs import portable
    from vitray.runs import held
    from vitray.runtime import runs_in_process

    config.check()
    model, data, out = portable(config.model), storage.absolute(config.data), storage.absolute(config.out)
    storage.check_output(out, "--out")
    if storage.same_or_inside(out, data):
        raise VitrayError(f"--out {config.out} lies inside --data {config.data}")
    model_config = encoder_config(model)
    layers = config.layers or default_layers(int(model_config.get("num_hidden_layers", 0)))
    neighbourhood = config.neighbourhood or default_neighbourhood(encoder_grid(model_config, model))
    spec = FeatureSpec(tuple(layers), neighbourhood)
    spec.check(int(model_config.get("num_hidden_layers", 0)), model)
    source = inspect_source(data, config.format)
    ids = good_ids(source)
    if len(ids) < 2:
        raise VitrayError(f"{config.data}: {len(ids)} good image; the fit needs at least 2 (the bank and a held-out "
                          "one for the threshold)")
    rng = np.random.default_rng(config.seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n_held = min(len(ids) - 1, max(1, round(config.holdout * len(ids))))
    held_out, fit_ids = order[:n_held], order[n_held:]
    here = runs_in_process(len(ids), config.in_process_max, config.ray_address, config.gpus_per_worker)
    with held(out):
        storage.delete(storage.resolve(storage.join(out, META_FILE)))  # no bank until this run's is whole
        started = time.monotonic()
        encoder = load_encoder(model)
        if not here:
            from vitray.runtime import RayOptions, init_ray

            init_ray(RayOptions(address=config.ray_address, dashboard=False))
        capped = CappedBank(config.max_bank, seed=config.seed)
        chunk_images = max(1, config.chunk_patches // (encoder.grid[0] * encoder.grid[1]))
        parts = (_features_here if here else _features_on_ray)(source, fit_ids, model, encoder.prep, spec, config,
                                                               chunk_images)
        from vitray.progress import Progress

        with Progress("anomaly fit", len(fit_ids), unit="img") as bar:
            for rows, images in parts:
                capped.add(rows)
                bar.update(images)
        features = capped.finish()
        if len(features) == 0:
            raise VitrayError(f"{config.data}: none of the good images could be read")
        extracted = time.monotonic() - started
        meta = BankMeta(encoder=model, fingerprint=encoder.fingerprint, layers=spec.layers,
                        neighbourhood=spec.neighbourhood, grid=encoder.grid, size=encoder.prep.size,
                        channels=encoder.prep.channels, mean=tuple(encoder.prep.mean), std=tuple(encoder.prep.std),
                        rows=int(len(features)), dim=int(features.shape[1]), threshold=float("nan"),
                        false_reject_rate=config.false_reject_rate, good_patch_level=float("nan"))
        scores, level = _held_out_scores(source, held_out, Bank(features, meta), model, config, here, chunk_images)
        threshold = float(np.quantile(scores, 1 - config.false_reject_rate, method="higher"))
        meta = BankMeta(**{**asdict(meta), "threshold": threshold, "good_patch_level": level})
        seconds = time.monotonic() - started
        summary = {
            "images": len(ids), "fit_images": len(fit_ids), "held_out_images": len(held_out),
            "patches": len(fit_ids) * encoder.grid[0] * encoder.grid[1], "coreset_rows": capped.seen,
            "bank_rows": meta.rows, "feature_dim": meta.dim, "merges": capped.merges,
            "threshold": threshold, "false_reject_rate": config.false_reject_rate,
            "held_out_scores": {q: float(np.quantile(scores, float(q))) for q in ("0.5", "0.9", "0.99", "1.0")},
            "seconds": round(seconds, 2), "feature_seconds": round(extracted, 2),
            "images_per_s": round(len(ids) / seconds, 1) if seconds > 0 else None,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "in_process": here, "config": {**asdict(config), "layers": list(spec.layers)},
        }
        save_bank(Bank(features, meta), out)  # bank.json last: the bank is whole
        write_summary(out, summary)
    return FitResult(out, meta, summary)


def _features_here(source: Any, ids: list[str], model: str, prep: Any, spec: FeatureSpec,
                   config: AnomalyConfig, chunk_images: int) -> Iterator[tuple[Any, int]]:
    """(coreset rows, images) per chunk, in this process."""
    import torch

    from vitray.data.readers import iter_encoded
    from vitray.inference import prepare_images

    stage = FeatureCoreset(model, spec, config.coreset, config.seed)
    columns = ("id", "image", "error_kind")
    pending = {k: [] for k in columns}
    for encoded in iter_encoded(source, ids):
        prepared = prepare_images(encoded, prep.size, prep.channels)
        for k in columns:
            pending[k].append(prepared[k])
        waiting = {k: np.concatenate(v) for k, v in pending.items()}
        while len(waiting["id"]) >= chunk_images:
            chunk = {k: v[:chunk_images] for k, v in waiting.items()}
            waiting = {k: v[chunk_images:] for k, v in waiting.items()}
            yield torch.from_numpy(stage(chunk)["feature"]), chunk_images
        pending = {k: [v] for k, v in waiting.items()}
    rest = {k: np.concatenate(v) for k, v in pending.items()}
    if len(rest["id"]):
        yield torch.from_numpy(stage(rest)["feature"]), len(rest["id"])


def _features_on_ray(source: Any, ids: list[str], model: str, prep: Any, spec: FeatureSpec,
                     config: AnomalyConfig, chunk_images: int) -> Iterator[tuple[Any, int]]:
    """(coreset rows, images) per chunk, from Ray Data: decode in tasks, features and coresets on actors."""
    import ray.data
    import torch

    from vitray.data.readers import read_encoded
    from vitray.inference import prepare_images

    ds = (read_encoded(source, ids)
          .map_batches(prepare_images, fn_kwargs={"size": prep.size, "channels": prep.channels},
                       batch_size=PREPARE_BATCH, batch_format="numpy", num_cpus=0.5)
          .map_batches(_counted(FeatureCoreset), fn_constructor_args=(model, spec, config.coreset, config.seed),
                       batch_size=chunk_images, batch_format="numpy",
                       compute=ray.data.ActorPoolStrategy(size=config.workers),
                       num_gpus=config.gpus_per_worker or None))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        images = int(batch["images"].sum())
        rows = batch["feature"][batch["row"] >= 0] if len(batch["feature"]) else batch["feature"]
        yield torch.from_numpy(np.ascontiguousarray(rows)), images


def _counted(stage: type) -> type:
    """`stage` whose output also says how many images each call took (the driver's progress)."""

    class Counted(stage):  # type: ignore[misc, valid-type]
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = super().__call__(batch)
            n = len(out["feature"])
            if n == 0:  # no feature kept: a marker row (row -1) still carries the count
                return {"feature": np.zeros((1, 1), np.float32), "row": np.array([-1]),
                        "images": np.array([len(batch["id"])])}
            images = np.zeros(n, dtype=np.int64)
            images[0] = len(batch["id"])
            return {"feature": out["feature"], "row": np.arange(n), "images": images}

    Counted.__name__ = f"Counted{stage.__name__}"
    return Counted


def _held_out_scores(source: Any, ids: list[str], bank: Bank, model: str, config: AnomalyConfig,
                     here: bool, chunk_images: int) -> tuple[np.ndarray, float]:
    """Image scores of the held-out good images, and their mean patch distance."""
    from vitray.anomaly.scorer import AnomalyScorer
    from vitray.inference import prepare_images

    scores, levels = [], []
    prep_kwargs = {"size": bank.meta.size, "channels": bank.meta.channels}
    if here:
        from vitray.data.readers import iter_encoded

        scorer = AnomalyScorer(bank, encoder=model)
        batches: Any = (scorer(prepare_images(b, **prep_kwargs)) for b in iter_encoded(source, ids))
    else:
        import ray.data

        from vitray.data.readers import read_encoded

        ds = (read_encoded(source, ids)
              .map_batches(prepare_images, fn_kwargs=prep_kwargs, batch_size=PREPARE_BATCH, batch_format="numpy",
                           num_cpus=0.5)
              .map_batches(AnomalyScorer, fn_constructor_args=(bank, model), batch_size=chunk_images,
                           batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=config.workers),
                           num_gpus=config.gpus_per_worker or None)
              .select_columns(["anomaly_score", "anomaly_map"]))
        batches = ds.iter_batches(batch_size=1024, batch_format="numpy")
    for batch in batches:
        ok = ~np.isnan(batch["anomaly_score"])
        scores.append(batch["anomaly_score"][ok])
        levels.append(batch["anomaly_map"][ok].mean(axis=1))
    values = np.concatenate(scores) if scores else np.zeros(0)
    if len(values) == 0:
        raise VitrayError(f"{config.data}: none of the held-out good images could be read")
    return values.astype(np.float64), float(np.concatenate(levels).mean())
