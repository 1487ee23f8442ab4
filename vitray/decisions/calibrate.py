"""`vitray calibrate`: from a labelled held-out set, the calibration a model's decisions follow.

One pass of the model over the images (Ray Data actors, or this process for a small set) gives
each image's logits and embedding. The set is split in two halves, stratified and seeded: the
first fits what is learned (the temperature, the class Gaussians of the out-of-distribution
score, the drift reference), the second sets the thresholds and measures the rates, so that
their bounds hold for images the fit never saw.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from vitray import storage
from vitray.decisions import calibration as cal
from vitray.decisions.drift import ALPHA, Reference
from vitray.decisions.ood import METHODS, Gaussians, conformal_threshold, energy
from vitray.decisions.policy import CALIBRATION_FILE, TENSORS_FILE, Policy
from vitray.errors import VitrayError
from vitray.options import fraction, option, positive_int
from vitray.runtime import IN_PROCESS_MAX, runs_in_process

log = logging.getLogger(__name__)


@dataclass
class CalibrateConfig:
    """Every option of a calibration, with its one default."""

    model: str = option(help="trained model folder or s3:// prefix (the calibration is written into it)",
                        metavar="URI", required=True,
                        doc="a trained model folder or `s3://` prefix; `calibration.json` and "
                            "`calibration.safetensors` are written into it")
    data: str = option(help="labelled held-out images, not used in training (local, file:// or s3://)",
                       metavar="URI", required=True, doc="labelled images not used in training (any labelled format)")
    out: str = option(help="output folder or s3:// prefix: calibration.json, reliability.png", metavar="URI",
                      required=True,
                      doc="`calibration.json` (the same), `calibration.safetensors`, `reliability.png`")
    format: str | None = option(None, "data format", choices=("imagefolder", "parquet", "csv"),
                                default_text="detected")
    ok_class: str = option("passed", "the class a part ships as", metavar="NAME",
                           doc="the class a part ships as; the defect score is 1 − its calibrated probability")
    escape_rate: float = option(0.005, "at most this share of defective parts decided OK", parse=fraction,
                                metavar="F", doc="at most this share of defective parts decided OK, at `--confidence`")
    false_reject_rate: float = option(
        0.05, "at most this share of OK parts decided NG; between the two thresholds parts go to review",
        parse=fraction, metavar="F",
        doc="at most this share of OK parts decided NG, at `--confidence`; parts between the two thresholds go to "
            "REVIEW")
    confidence: float = option(0.95, "with this confidence over the draw of the calibration set", parse=fraction,
                               metavar="F", doc="the confidence of both bounds, over the draw of the calibration set")
    ood_method: str = option("mahalanobis", "the out-of-distribution score", choices=METHODS,
                             doc="the out-of-distribution score: Mahalanobis distance of the embedding to the "
                                 "nearest class, or energy of the logits")
    ood_rate: float = option(0.01, "share of in-distribution parts sent to review as unlike the calibration images",
                             parse=fraction, metavar="F",
                             doc="share of in-distribution parts the OOD threshold sends to REVIEW")
    drift_alpha: float = option(ALPHA, "chance that a stable night raises the drift alarm", parse=fraction,
                                metavar="F",
                                doc="chance that a night like the calibration set raises the drift alarm")
    batch_size: int = option(256, "images per model call", parse=positive_int, metavar="N")
    workers: int = option(1, "inference actors", parse=positive_int, metavar="N")
    gpus_per_worker: float = option(0.0, "GPUs per inference actor (0: CPU)", metavar="N")
    in_process_max: int = option(IN_PROCESS_MAX, "with no Ray cluster given, a set of at most N images is "
                                                 "calibrated in this process; 0: always Ray", metavar="N")
    seed: int = option(0, "the split into halves", metavar="S",
                       doc="the split of the set into the half that fits and the half that sets the thresholds")
    ray_address: str | None = None

    def check(self) -> None:
        from vitray.runtime import check_address

        for name in ("escape_rate", "false_reject_rate", "ood_rate", "drift_alpha"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise VitrayError(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(self, name)}")
        if not 0.5 <= self.confidence < 1.0:
            raise VitrayError(f"--confidence must be in [0.5, 1), got {self.confidence}")
        if self.ood_method not in METHODS:
            raise VitrayError(f"--ood-method must be one of {', '.join(METHODS)}, got {self.ood_method}")
        if self.batch_size < 1 or self.workers < 1 or self.in_process_max < 0:
            raise VitrayError("--batch-size and --workers must be at least 1, --in-process-max at least 0")
        check_address(self.ray_address)


def calibrate(config: CalibrateConfig) -> dict[str, Any]:
    """Calibrate `config.model` on `config.data`; write the calibration into the model and OUT. Its record."""
    from vitray.data.sources import inspect_source
    from vitray.inference import model_info
    from vitray.models.specs import portable

    config.check()
    config = CalibrateConfig(**{**asdict(config), "model": portable(config.model),
                                "data": storage.absolute(config.data), "out": storage.absolute(config.out)})
    storage.check_output(config.out, "--out")
    labels, prep = model_info(config.model)
    if config.ok_class not in labels:
        raise VitrayError(f"--ok-class {config.ok_class!r} is not one of the model's classes {labels}")
    source = inspect_source(config.data, config.format, labels=labels)
    if not source.labelled:
        raise VitrayError(f"{config.data}: calibration needs labelled data")
    seen = _features(source, config, prep)
    policy, record = fit_policy(seen["logits"], seen["embedding"], seen["image_stats"], seen["label"], labels, config)
    _write(policy, config)
    _plot(record, seen, policy, config)
    return record


def _features(source: Any, config: CalibrateConfig, prep: Any) -> dict[str, np.ndarray]:
    """Logits, embeddings and labels of every readable image (unreadable ones are logged and left out)."""
    from vitray.inference import PredictOptions

    options = PredictOptions(features=True)
    here = runs_in_process(len(source), config.in_process_max, config.ray_address, config.gpus_per_worker)
    parts: dict[str, list[np.ndarray]] = {"logits": [], "embedding": [], "image_stats": [], "label": []}
    for batch in (_here if here else _on_ray)(source, config, prep, options):
        ok = batch["error_kind"] == ""
        for i in np.flatnonzero(~ok):
            log.warning("skipping %s: %s (%s)", batch["path"][i], batch["error"][i], batch["error_kind"][i])
        for key in parts:
            parts[key].append(np.asarray(batch[key])[ok])
    seen = {k: np.concatenate(v) for k, v in parts.items()}
    if len(seen["label"]) == 0:
        raise VitrayError(f"{config.data}: no readable images to calibrate on")
    return seen


def _here(source: Any, config: CalibrateConfig, prep: Any, options: Any) -> Iterator[dict[str, np.ndarray]]:
    from vitray.inference import predict_in_process

    yield from predict_in_process(source, None, config.model, prep, options, config.batch_size, keep=("path", "label"))


def _on_ray(source: Any, config: CalibrateConfig, prep: Any, options: Any) -> Iterator[dict[str, np.ndarray]]:
    from vitray.data.readers import read_encoded
    from vitray.inference import predict
    from vitray.runtime import RayOptions, init_ray

    init_ray(RayOptions(address=config.ray_address, dashboard=False))
    ds = (predict(read_encoded(source), config.model, prep, options, config.batch_size, config.workers,
                  config.gpus_per_worker, keep=("path", "label"))
          .select_columns(["path", "error_kind", "error", "label", "logits", "embedding", "image_stats"]))
    yield from ds.iter_batches(batch_size=4096, batch_format="numpy")


def split_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the indices with each class split evenly (stratified), seeded."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        first.append(idx[: (len(idx) + 1) // 2])
        second.append(idx[(len(idx) + 1) // 2:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def fit_policy(logits: np.ndarray, embeddings: np.ndarray, stats: np.ndarray, labels: np.ndarray, names: list[str],
               config: CalibrateConfig) -> tuple[Policy, dict[str, Any]]:
    """The policy fitted on one half and set on the other, and its record (calibration.json)."""
    ok_index = names.index(config.ok_class)
    fit, held = split_halves(labels, config.seed)
    if (labels[held] == ok_index).sum() == 0 or (labels[held] != ok_index).sum() == 0:
        raise VitrayError(f"{config.data}: calibration needs both {config.ok_class!r} and defective images "
                          f"(each half of the set needs some of both)")
    temperature = cal.fit_temperature(logits[fit], labels[fit])
    gaussians = Gaussians.fit(embeddings[fit], labels[fit]) if config.ood_method == "mahalanobis" else None
    probs_before, probs_after = cal.softmax(logits[held]), cal.softmax(logits[held], temperature)
    defect = 1.0 - probs_after[:, ok_index]
    is_defect = labels[held] != ok_index
    thresholds = cal.choose_thresholds(defect, is_defect, config.escape_rate, config.false_reject_rate,
                                       config.confidence)
    ood_held = gaussians.score(embeddings[held]) if gaussians is not None else energy(logits[held], temperature)
    fit_probs = cal.softmax(logits[fit], temperature)
    reference = Reference.fit(embeddings[fit], stats[fit], fit_probs.argmax(axis=1), 1.0 - fit_probs[:, ok_index],
                              seed=config.seed)
    record = {
        "method": "temperature scaling", "temperature": round(temperature, 6), "labels": list(names),
        "ok_class": config.ok_class, "confidence": config.confidence,
        "targets": {"escape_rate": config.escape_rate, "false_reject_rate": config.false_reject_rate},
        "thresholds": asdict(thresholds),
        "ood": {"method": config.ood_method, "rate": config.ood_rate,
                "threshold": conformal_threshold(ood_held, config.ood_rate)},
        "drift": {"alpha": config.drift_alpha, "directions": int(reference.directions.shape[0]),
                  "image_statistics": int(reference.stats_mean.shape[0]),
                  "reference_images": int(len(reference.scores))},
        "ece": {"before": round(cal.expected_calibration_error(probs_before, labels[held]), 4),
                "after": round(cal.expected_calibration_error(probs_after, labels[held]), 4)},
        "measured": cal.rates(defect, is_defect, thresholds, confidence=0.95),
        "n": {"images": int(len(labels)), "fit": int(len(fit)), "held_out": int(len(held)),
              "held_out_ok": int((~is_defect).sum()), "held_out_defective": int(is_defect.sum())},
        "data": config.data,
    }
    record["notes"] = _notes(record)
    return Policy(record, gaussians, reference), record


def _notes(record: dict[str, Any]) -> list[str]:
    """What a quality engineer must know about thresholds that could not be set."""
    notes = []
    n = record["n"]
    if record["thresholds"]["ok"] is None:
        need = int(np.ceil(np.log(1 - record["confidence"]) / np.log(1 - record["targets"]["escape_rate"])))
        notes.append(f"no OK threshold: {n['held_out_defective']} held-out defective images cannot bound an escape "
                     f"rate of {record['targets']['escape_rate']} at {record['confidence']} (at least {need} are "
                     "needed, twice that in the whole set): no part is decided OK, all go to review or NG")
    if record["thresholds"]["ng"] is None:
        need = int(np.ceil(np.log(1 - record["confidence"]) / np.log(1 - record["targets"]["false_reject_rate"])))
        notes.append(f"no NG threshold: {n['held_out_ok']} held-out OK images cannot bound a false-reject rate of "
                     f"{record['targets']['false_reject_rate']} at {record['confidence']} (at least {need} are "
                     "needed): no part is decided NG, the defective go to review")
    return notes


def _write(policy: Policy, config: CalibrateConfig) -> None:
    """The calibration into the model's folder (it travels with the model) and into OUT."""
    with tempfile.TemporaryDirectory(prefix="vitray-calibration-") as tmp:
        policy.save(tmp)
        files = {}
        for name in (TENSORS_FILE, CALIBRATION_FILE):
            with open(os.path.join(tmp, name), "rb") as f:
                files[name] = f.read()
    for place in (config.out, config.model):
        for name, data in files.items():  # the JSON last: a reader never takes half a calibration for one
            storage.write_bytes(storage.join(place, name), data)


def _plot(record: dict[str, Any], seen: dict[str, np.ndarray], policy: Policy, config: CalibrateConfig) -> None:
    """reliability.png: confidence against accuracy before and after, and the defect-score histograms."""
    from matplotlib.figure import Figure

    from vitray.figures import save_figure

    fit, held = split_halves(seen["label"], config.seed)
    logits, labels = seen["logits"][held], seen["label"][held]
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for probs, name in ((cal.softmax(logits), f"before (ECE {record['ece']['before']:.3f})"),
                        (cal.softmax(logits, policy.temperature), f"after (ECE {record['ece']['after']:.3f})")):
        rows = cal.reliability(probs, labels)
        left.plot(rows["confidence"], rows["accuracy"], marker="o", label=name)
    left.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    left.set(xlabel="confidence of the predicted class", ylabel="accuracy", title="reliability (held-out half)",
             xlim=(0, 1), ylim=(0, 1))
    left.legend(loc="upper left", fontsize=8)
    defect = 1.0 - cal.softmax(logits, policy.temperature)[:, policy.ok_index]
    bins = np.linspace(0, 1, 41)
    right.hist(defect[labels == policy.ok_index], bins=bins, alpha=0.6, label=f"{config.ok_class}", log=True)
    right.hist(defect[labels != policy.ok_index], bins=bins, alpha=0.6, label="defective", log=True)
    for value, name in ((policy.thresholds.ok, "OK at or below"), (policy.thresholds.ng, "NG at or above")):
        if value is not None:
            right.axvline(value, color="black", linestyle="--" if "OK" in name else "-", label=f"{name} {value:.4f}")
    right.set(xlabel="calibrated defect score", ylabel="images", title="defect score (held-out half)")
    right.legend(fontsize=8)
    save_figure(fig, storage.join(config.out, "reliability.png"))
