"""Classification metrics, confusion-matrix and training-curve plots, and a terminal report.

The metric dict is the one `metrics.json` and `evaluation.json` hold; plots are PNGs written
through `vitray.storage`, so OUT may be a local folder or an s3:// prefix.
"""
from __future__ import annotations

import io
import logging
import math
from typing import Any, Iterator, Sequence

import numpy as np

from vitray import storage
from vitray.errors import VitrayError
from vitray.runtime import IN_PROCESS_MAX, runs_in_process

log = logging.getLogger(__name__)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: list[str],
                           sample_weight: Sequence[float] | None = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (scikit-learn's).

    Ids index `labels`. Every label gets a per-class row, also one absent from the data (support 0);
    a ratio with a zero denominator counts as 0.0. Macro-F1 averages over the classes that occur
    in `y_true` (support > 0): a class the data does not contain says nothing about the model, and
    counting it as F1 0 would punish an evaluation set for leaving a class out. Predictions of such
    a class still cost the true classes their recall. `sample_weight` counts each pair that often.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    true = np.asarray(y_true, dtype=np.int64).ravel()
    pred = np.asarray(y_pred, dtype=np.int64).ravel()
    weight = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()
    n = len(labels)
    if true.shape != pred.shape:
        raise VitrayError(f"metrics: {true.size} true labels but {pred.size} predictions")
    total = true.size if weight is None else float(weight.sum())
    if total == 0:
        raise VitrayError("metrics: no samples to evaluate")
    for name, ids in (("true label", true), ("prediction", pred)):
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size:
            raise VitrayError(f"metrics: {name} id {int(bad[0])} is outside the {n} classes {labels}")
    ids = np.arange(n)
    confusion = np.rint(confusion_matrix(true, pred, labels=ids, sample_weight=weight)).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=ids, sample_weight=weight, zero_division=0.0)
    present = support > 0
    return {
        "accuracy": float(np.trace(confusion) / total),
        "macro_f1": float(f1[present].mean()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(round(support[i]))}
            for i, name in enumerate(labels)
        },
        "confusion_matrix": confusion.tolist(),
        "labels": list(labels),
    }


def metrics_from_confusion(counts: np.ndarray, labels: list[str]) -> dict:
    """`classification_metrics` of a (true, predicted) count matrix, such as workers add up."""
    counts = np.asarray(counts)
    true, pred = np.indices(counts.shape)
    return classification_metrics(true.ravel(), pred.ravel(), labels, sample_weight=counts.ravel())


def format_report(metrics: dict) -> str:
    """A terminal table: per-class precision/recall/F1/support, accuracy, macro-F1, confusion matrix."""
    labels = list(metrics["labels"])
    per_class = metrics["per_class"]
    support = sum(int(per_class[name]["support"]) for name in labels)
    width = max([len(name) for name in labels] + [len("accuracy"), len("macro-F1")])
    lines = [f"{'':<{width}}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}"]
    for name in labels:
        row = per_class[name]
        lines.append(f"{name:<{width}}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['f1']:>6.3f}"
                     f"  {int(row['support']):>7d}")
    lines += ["", f"{'accuracy':<{width}}  {'':>9}  {'':>6}  {metrics['accuracy']:>6.3f}  {support:>7d}",
              f"{'macro-F1':<{width}}  {'':>9}  {'':>6}  {metrics['macro_f1']:>6.3f}  "
              f"{'(classes with support > 0)'}", "",
              "confusion matrix (rows: true class, columns: predicted class)"]
    matrix = metrics["confusion_matrix"]
    cells = [max(len(name), *(len(str(int(row[j]))) for row in matrix)) for j, name in enumerate(labels)]
    lines.append(f"{'':<{width}}  " + "  ".join(f"{name:>{w}}" for name, w in zip(labels, cells)))
    for name, row in zip(labels, matrix):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{int(v):>{w}d}" for v, w in zip(row, cells)))
    return "\n".join(lines)


def plot_confusion(metrics: dict, uri: str, title: str = "") -> None:
    """PNG with the confusion matrix as counts and row-normalised (each row: where a true class went)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    labels = list(metrics["labels"])
    counts = np.asarray(metrics["confusion_matrix"], dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(labels)
    side = max(3.6, 0.62 * n + 1.6)  # inches per panel: about 0.6 in per class keeps names legible
    font = 10 if n <= 10 else 8 if n <= 20 else 6
    fig = Figure(figsize=(2 * side + 0.8, side + 0.9), layout="constrained")
    headline = f"accuracy {metrics['accuracy']:.3f}   macro-F1 {metrics['macro_f1']:.3f}"
    fig.suptitle(f"{title}\n{headline}" if title else headline, fontsize=11)
    panels = [(counts, "counts", lambda v, i: f"{int(v)}"),
              (normalised, "row-normalised (recall on the diagonal)", lambda v, i: f"{v:.0%}" if rows[i] else "-")]
    for ax, (values, name, text) in zip(fig.subplots(1, 2), panels):
        peak = values.max() if values.max() > 0 else 1.0
        ax.imshow(values, cmap="Blues", vmin=0, vmax=peak)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if n <= 50:
            ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=font)
            ax.set_yticks(range(n), labels, fontsize=font)
        if n <= 25:
            for i in range(n):
                for j in range(n):
                    # Dark text on light cells, light on dark: readable whatever the count.
                    colour = "white" if values[i, j] > 0.55 * peak else "black"
                    ax.text(j, i, text(values[i, j], i), ha="center", va="center", fontsize=font, color=colour)
    save_figure(fig, uri)


HISTORY_PANELS = [
    ("loss", [("train_loss", "train"), ("val_loss", "validation")]),
    ("validation", [("val_accuracy", "accuracy"), ("val_macro_f1", "macro-F1")]),
    ("learning rate", [("lr", "lr")]),
]


def plot_curves(history: list[dict], uri: str) -> None:
    """PNG of the training history by epoch: losses, validation accuracy/macro-F1, learning rate."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise VitrayError("plot_curves: the training history is empty")
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    for ax, (name, series) in zip(fig.subplots(1, 3, sharex=True), HISTORY_PANELS):
        for key, label in series:
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if name == "validation":
            ax.set_ylim(0, 1.02)
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if ax.lines and name != "learning rate":
            ax.legend(fontsize=9)
        if not ax.lines:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="grey")
    save_figure(fig, uri)


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one column; rows without the value (no validation set, CSV blanks) are skipped."""
    xs, ys = [], []
    for i, row in enumerate(history):
        value = _number(row.get(key))
        if value is not None:
            epoch = _number(row.get("epoch"))
            xs.append(epoch if epoch is not None else i + 1)
            ys.append(value)
    return xs, ys


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def save_figure(fig: Any, uri: str, dpi: int = 120) -> None:
    """A matplotlib figure as a PNG at a local path or s3:// URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    storage.write_bytes(uri, buf.getvalue())


def evaluate(model_uri: str, data_uri: str, out_uri: str, fmt: str | None = None, batch_size: int = 256,
             workers: int = 1, gpus_per_worker: float = 0.0, ray_address: str | None = None,
             mlflow: str | None = None, mlflow_experiment: str | None = None,
             in_process_max: int = IN_PROCESS_MAX) -> dict:
    """Metrics of a trained model on labelled data: OUT/evaluation.json and OUT/confusion_matrix.png.

    When the data has boxes (FRAMEimages `response`), the default attention maps of
    the defect images (by their label, whatever the model predicted) are scored against them
    (pointing game, energy in box). A data set of at most `in_process_max` images, with no Ray
    cluster named, is scored in this process.
    """
    from vitray.data.sources import inspect_source
    from vitray.inference import NEGATIVE_LABEL, PredictOptions, model_info
    from vitray.models.specs import portable

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
        defect = ~np.isnan(point) & (true != (labels.index(NEGATIVE_LABEL) if NEGATIVE_LABEL in labels else -1))
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


def evaluate_anomaly(bank_uri: str, data_uri: str, out_uri: str, fmt: str | None = None, batch_size: int = 256,
                     workers: int = 1, gpus_per_worker: float = 0.0, ray_address: str | None = None,
                     in_process_max: int = IN_PROCESS_MAX) -> dict:
    """How well an anomaly bank tells good images from defective ones: OUT/anomaly.json.

    `data_uri` is labelled: `passed` images are good, every other class a defect. Reports the
    image AUROC (all defects, and each kind against the good images), the rates at the bank's
    threshold, and, where the data has boxes, the pointing game and energy in box of the defect
    images' anomaly maps (energy over the map's excess above the good images' mean patch distance,
    so that the floor every patch has does not count as mass).
    """
    from vitray.anomaly.bank import read_meta
    from vitray.data.sources import inspect_source
    from vitray.inference import NEGATIVE_LABEL

    if batch_size < 1 or workers < 1 or in_process_max < 0:
        raise VitrayError("--batch-size and --workers must be at least 1, --in-process-max at least 0")
    bank_uri, data_uri, out_uri = storage.absolute(bank_uri), storage.absolute(data_uri), storage.absolute(out_uri)
    storage.check_output(out_uri, "--out")
    meta = read_meta(bank_uri)
    source = inspect_source(data_uri, fmt)
    if not source.labelled or NEGATIVE_LABEL not in source.labels:
        raise VitrayError(f"{data_uri}: anomaly evaluation needs labelled data with a {NEGATIVE_LABEL} class "
                          "(the good images) and defect classes")
    good = source.labels.index(NEGATIVE_LABEL)
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


def anomaly_metrics(label: np.ndarray, score: np.ndarray, pointing: np.ndarray, energy: np.ndarray,
                    labels: list[str], good: int, threshold: float) -> dict:
    """Image AUROC (all defects; each kind), rates at the threshold, map localisation on the defects."""
    from sklearn.metrics import roc_auc_score

    defect = label != good
    if defect.all() or not defect.any():
        raise VitrayError("anomaly evaluation needs both good images and defect images")
    kinds = {}
    for i, name in enumerate(labels):
        mine = label == i
        if i == good or not mine.any():
            continue
        pick = mine | ~defect
        kinds[name] = {"images": int(mine.sum()), "auroc": round(float(roc_auc_score(defect[pick], score[pick])), 4),
                       "detected": round(float((score[mine] > threshold).mean()), 4)}
    boxed = defect & ~np.isnan(pointing)
    return {
        "images": int(len(label)), "good": int((~defect).sum()), "defects": int(defect.sum()),
        "auroc": round(float(roc_auc_score(defect, score)), 4),
        "threshold": float(threshold),
        "false_reject_rate": round(float((score[~defect] > threshold).mean()), 4),
        "detection_rate": round(float((score[defect] > threshold).mean()), 4),
        "per_kind": kinds,
        "localization": {
            "images": int(boxed.sum()),
            "pointing_game": round(float(pointing[boxed].mean()), 4) if boxed.any() else None,
            "energy_in_box": round(float(energy[boxed].mean()), 4) if boxed.any() else None,
        },
    }


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
