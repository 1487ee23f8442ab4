"""`vitray evaluate`: a trained model's metrics on labelled data (`evaluation.json`, the confusion
matrix, map localisation where the data has boxes), and an anomaly bank's (`anomaly.json`).

The metrics are `vitray.metrics`'; the figures `vitray.figures`'.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from vitray import storage
from vitray.domain import OK_CLASS
from vitray.errors import VitrayError
from vitray.figures import plot_confusion
from vitray.metrics import anomaly_metrics, classification_metrics
from vitray.options import option, positive_int
from vitray.runs import mlflow_experiment_option, mlflow_option
from vitray.runtime import IN_PROCESS_MAX, runs_in_process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """`vitray evaluate`: each option once (`vitray.options`). `evaluate` reads `model`,
    `evaluate_anomaly` reads `anomaly`; the command runs either or both."""

    data: str = option(help="labelled data (local, file:// or s3://)", metavar="URI", required=True,
                       doc="labelled data; its classes must be among the model's")
    out: str = option(help="output folder or s3:// prefix", metavar="URI", required=True,
                      doc="output folder or `s3://` prefix: `evaluation.json`, `confusion_matrix.png`, "
                          "`anomaly.json`")
    model: str | None = option(None, "trained model folder or s3:// prefix (may be left out with --anomaly)",
                               metavar="URI",
                               doc="a trained model folder or `s3://` prefix; required unless `--anomaly` is given")
    anomaly: str | None = option(
        None, "also (or, without --model, only) measure an anomaly bank of `vitray anomaly` on the data: image "
              "AUROC of passed against the other classes, and the maps against the boxes", metavar="BANK",
        doc="also measure an anomaly bank of `vitray anomaly` (without `--model`, only the bank): "
            "`OUT/anomaly.json` (below)")
    format: str | None = option(None, "data format", choices=("imagefolder", "parquet", "csv"),
                                default_text="detected")
    batch_size: int = option(256, "images per model call", parse=positive_int, metavar="N")
    workers: int = option(1, "inference actors", parse=positive_int, metavar="N",
                          doc="inference actors; each loads the model once")
    gpus_per_worker: float = option(0.0, "GPUs per inference actor (0: CPU)", metavar="N")
    in_process_max: int = option(IN_PROCESS_MAX, "with no Ray cluster given, a set of at most N images is "
                                                 "evaluated in this process, without starting Ray; 0: always Ray",
                                 metavar="N")
    mlflow: str | None = mlflow_option("track the evaluation as one MLflow run ([tracking](tracking.md))")
    mlflow_experiment: str | None = mlflow_experiment_option()
    ray_address: str | None = None


def evaluate(config: EvaluateConfig) -> dict:
    """Metrics of `config.model` on labelled data: OUT/evaluation.json and OUT/confusion_matrix.png.

    When the data has boxes (FRAMEimages `response`), the default attention maps of
    the defect images (by their label, whatever the model predicted) are scored against them
    (pointing game, energy in box). A data set of at most `in_process_max` images, with no Ray
    cluster named, is scored in this process.
    """
    from vitray.data.sources import inspect_source
    from vitray.inference import PredictOptions, model_info
    from vitray.models.specs import portable

    if config.model is None:
        raise VitrayError("--model is required (on the command line or in --config)")
    model_uri, data_uri, out_uri, fmt = config.model, config.data, config.out, config.format
    batch_size, workers, gpus_per_worker = config.batch_size, config.workers, config.gpus_per_worker
    ray_address, in_process_max = config.ray_address, config.in_process_max
    mlflow, mlflow_experiment = config.mlflow, config.mlflow_experiment
    if batch_size < 1 or workers < 1 or in_process_max < 0:
        raise VitrayError("--batch-size and --workers must be at least 1, --in-process-max at least 0")
    # Ray's actors run in other folders than the driver: every local path they get is absolute.
    model_uri, data_uri, out_uri = portable(model_uri), storage.absolute(data_uri), storage.absolute(out_uri)
    storage.check_output(out_uri, "--out")
    labels, prep = model_info(model_uri)
    source = inspect_source(data_uri, fmt, labels=labels)
    if not source.labelled:
        raise VitrayError(f"{data_uri}: evaluation needs labelled data")
    # Maps for every image: a defect image the model calls passed counts in the localisation too.
    options = PredictOptions(attention="all" if source.has_boxes else "none")
    y_true, y_pred, pointing, energy = [], [], [], []
    here = runs_in_process(len(source), in_process_max, ray_address, gpus_per_worker)
    for batch in (_predicted_here if here else _predicted_on_ray)(source, model_uri, prep, options, batch_size,
                                                                   workers, gpus_per_worker, ray_address):
        ok = batch["error_kind"] == ""
        for i in np.flatnonzero(~ok):  # what scoring records as error rows, evaluation counts as skipped
            log.warning("skipping %s: %s (%s)", batch["path"][i], batch["error"][i], batch["error_kind"][i])
        y_true.append(batch["label"][ok])
        y_pred.append(batch["pred"][ok])
        pointing.append(batch["pointing"][ok])
        energy.append(batch["energy"][ok])
    true, pred = np.concatenate(y_true), np.concatenate(y_pred)
    metrics = classification_metrics(true.tolist(), pred.tolist(), labels)
    metrics["n"] = int(len(true))
    metrics["skipped"] = int(len(source) - len(true))
    if source.has_boxes:
        point, mass = np.concatenate(pointing), np.concatenate(energy)
        defect = ~np.isnan(point) & (true != (labels.index(OK_CLASS) if OK_CLASS in labels else -1))
        metrics["localization"] = {
            "method": options.method, "images": int(defect.sum()),
            "pointing_game": round(float(point[defect].mean()), 4) if defect.any() else None,
            "energy_in_box": round(float(mass[defect].mean()), 4) if defect.any() else None,
        }
    storage.write_json(storage.join(out_uri, "evaluation.json"), metrics)
    plot_confusion(metrics, storage.join(out_uri, "confusion_matrix.png"), title=f"{data_uri}")
    _track(metrics, mlflow, mlflow_experiment, {"model": model_uri, "data": data_uri, "out": out_uri,
                                                "batch_size": batch_size, "workers": workers})
    return metrics


def _predicted_on_ray(source: Any, model_uri: str, prep: Any, options: Any, batch_size: int, workers: int,
                      gpus_per_worker: float, ray_address: str | None) -> Iterator[dict[str, np.ndarray]]:
    """Predictions and map localisation of every image: Ray Data's `predict` on an actor pool."""
    from vitray.data.readers import read_encoded
    from vitray.inference import predict
    from vitray.runtime import RayOptions, init_ray

    init_ray(RayOptions(address=ray_address, dashboard=False))
    ds = (predict(read_encoded(source), model_uri, prep, options, batch_size, workers, gpus_per_worker,
                  keep=("path", "label", "bbox"))
          .map_batches(_localisation, fn_kwargs={"size": prep.size}, batch_format="numpy")
          .select_columns(["path", "error_kind", "error", "label", "pred", "pointing", "energy"]))
    return ds.iter_batches(batch_size=4096, batch_format="numpy")


def _predicted_here(source: Any, model_uri: str, prep: Any, options: Any, batch_size: int, *_: Any
                    ) -> Iterator[dict[str, np.ndarray]]:
    """The same rows as `_predicted_on_ray`, in this process (a data set too small to start Ray for)."""
    from vitray.inference import predict_in_process

    for batch in predict_in_process(source, None, model_uri, prep, options, batch_size,
                                    keep=("path", "label", "bbox")):
        yield _localisation(batch, prep.size)


def _track(metrics: dict, uri: str | None, experiment: str | None, params: dict) -> None:
    """An evaluation as one MLflow run: its arguments, metrics and outputs."""
    from vitray import tracking

    tracked = tracking.start(tracking.resolve(uri, experiment), name=f"evaluate {params['data']}", params=params)
    loc = metrics.get("localization") or {}
    tracking.log_metrics(tracked, {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                                   "skipped": metrics["skipped"],
                                   **{f"recall_{k}": v["recall"] for k, v in metrics["per_class"].items()},
                                   **{k: v for k, v in loc.items() if k in ("pointing_game", "energy_in_box")}})
    tracking.log_outputs(tracked, [storage.join(params["out"], n) for n in ("evaluation.json", "confusion_matrix.png")])
    tracking.end(tracked)


def _localisation(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Per image: pointing game (1/0) and energy in box of its map, NaN without a map or box."""
    from vitray.localisation import energy_in_box, pointing_game

    n = len(batch["pred"])
    pointing = np.full(n, np.nan, dtype=np.float32)
    energy = np.full(n, np.nan, dtype=np.float32)
    for i in range(n):
        amap, box = batch["attention"][i], batch["bbox"][i]
        if np.isnan(amap).any() or np.isnan(box).any():
            continue
        side = int(round(np.sqrt(len(amap))))
        grid = amap.reshape(side, side)
        pointing[i] = float(pointing_game(grid, box, (size, size)))
        energy[i] = energy_in_box(grid, box, (size, size))
    out = dict(batch)
    out.update(pointing=pointing, energy=energy)
    return out


ANOMALY_FILE = "anomaly.json"


def evaluate_anomaly(config: EvaluateConfig) -> dict:
    """How well the anomaly bank `config.anomaly` tells good images from defective ones: OUT/anomaly.json.

    `data_uri` is labelled: `passed` images are good, every other class a defect. Reports the
    image AUROC (all defects, and each kind against the good images), the rates at the bank's
    threshold, and, where the data has boxes, the pointing game and energy in box of the defect
    images' anomaly maps (energy over the map's excess above the good images' mean patch distance,
    so that the floor every patch has does not count as mass).
    """
    from vitray.anomaly.bank import read_meta
    from vitray.data.sources import inspect_source

    if config.anomaly is None:
        raise VitrayError("--anomaly BANK is required to measure a bank")
    bank_uri, data_uri, out_uri, fmt = config.anomaly, config.data, config.out, config.format
    batch_size, workers, gpus_per_worker = config.batch_size, config.workers, config.gpus_per_worker
    ray_address, in_process_max = config.ray_address, config.in_process_max
    if batch_size < 1 or workers < 1 or in_process_max < 0:
        raise VitrayError("--batch-size and --workers must be at least 1, --in-process-max at least 0")
    bank_uri, data_uri, out_uri = storage.absolute(bank_uri), storage.absolute(data_uri), storage.absolute(out_uri)
    storage.check_output(out_uri, "--out")
    meta = read_meta(bank_uri)
    source = inspect_source(data_uri, fmt)
    if not source.labelled or OK_CLASS not in source.labels:
        raise VitrayError(f"{data_uri}: anomaly evaluation needs labelled data with a {OK_CLASS} class "
                          "(the good images) and defect classes")
    good = source.labels.index(OK_CLASS)
    here = runs_in_process(len(source), in_process_max, ray_address, gpus_per_worker)
    rows: dict[str, list] = {"label": [], "score": [], "pointing": [], "energy": []}
    batches = (_anomaly_here if here else _anomaly_on_ray)(source, bank_uri, meta, batch_size, workers,
                                                          gpus_per_worker, ray_address)
    for batch in batches:
        ok = ~np.isnan(batch["anomaly_score"])
        rows["label"].append(batch["label"][ok])
        rows["score"].append(batch["anomaly_score"][ok])
        rows["pointing"].append(batch["pointing"][ok])
        rows["energy"].append(batch["energy"][ok])
    label, score, point, mass = (np.concatenate(rows[k]) for k in ("label", "score", "pointing", "energy"))
    result = anomaly_metrics(label, score, point, mass, source.labels, good, meta.threshold)
    result.update(bank=bank_uri, data=data_uri, skipped=int(len(source) - len(label)))
    storage.write_json(storage.join(out_uri, ANOMALY_FILE), result)
    return result


def _anomaly_here(source: Any, bank_uri: str, meta: Any, batch_size: int, *_: Any) -> Iterator[dict[str, np.ndarray]]:
    from vitray.anomaly.scorer import AnomalyScorer
    from vitray.data.readers import iter_encoded
    from vitray.inference import prepare_images

    scorer = AnomalyScorer(bank_uri)
    for encoded in iter_encoded(source):
        prepared = prepare_images(encoded, meta.size, meta.channels, ("label", "bbox"))
        for start in range(0, len(prepared["id"]), batch_size):
            part = scorer({k: v[start:start + batch_size] for k, v in prepared.items()})
            yield anomaly_localisation(part, meta.size, meta.good_patch_level)


def _anomaly_on_ray(source: Any, bank_uri: str, meta: Any, batch_size: int, workers: int, gpus_per_worker: float,
                    ray_address: str | None) -> Iterator[dict[str, np.ndarray]]:
    import ray.data

    from vitray.anomaly.scorer import AnomalyScorer
    from vitray.data.readers import read_encoded
    from vitray.inference import prepare_images
    from vitray.runtime import RayOptions, init_ray

    init_ray(RayOptions(address=ray_address, dashboard=False))
    ds = (read_encoded(source)
          .map_batches(prepare_images, fn_kwargs={"size": meta.size, "channels": meta.channels,
                                                  "keep": ("label", "bbox")},
                       batch_size=64, batch_format="numpy", num_cpus=0.5)
          .map_batches(AnomalyScorer, fn_constructor_args=(bank_uri,), batch_size=batch_size, batch_format="numpy",
                       compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=gpus_per_worker or None)
          .map_batches(anomaly_localisation, fn_kwargs={"size": meta.size, "good_level": meta.good_patch_level},
                       batch_format="numpy")
          .select_columns(["label", "anomaly_score", "pointing", "energy"]))
    return ds.iter_batches(batch_size=4096, batch_format="numpy")


def anomaly_localisation(batch: dict[str, np.ndarray], size: int, good_level: float) -> dict[str, np.ndarray]:
    """Per image: pointing game (1/0) and energy in box of its anomaly map, NaN without a map or box."""
    from vitray.localisation import energy_in_box, pointing_game

    n = len(batch["anomaly_score"])
    pointing = np.full(n, np.nan, dtype=np.float32)
    energy = np.full(n, np.nan, dtype=np.float32)
    for i in range(n):
        amap, box = batch["anomaly_map"][i], batch["bbox"][i]
        if np.isnan(amap).any() or np.isnan(box).any():
            continue
        side = int(round(np.sqrt(len(amap))))
        grid = amap.reshape(side, side)
        pointing[i] = float(pointing_game(grid, box, (size, size)))
        energy[i] = energy_in_box(np.clip(grid - good_level, 0.0, None), box, (size, size))
    return {"label": batch["label"], "anomaly_score": batch["anomaly_score"], "pointing": pointing, "energy": energy}
