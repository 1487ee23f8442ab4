"""What travels with a calibrated model, and one image's decision from it.

`vitray calibrate` writes `calibration.json` (the method, temperature, thresholds, the rates
measured with their intervals) and `calibration.safetensors` (the class means and precision of
the out-of-distribution score, the drift reference) into the model's folder, beside its
weights, so that every copy of the model decides the same way. A model without them scores as
before: a label and its probability, no decision.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitray.decisions.calibration import Thresholds, softmax
from vitray.decisions.drift import Reference
from vitray.decisions.ood import Gaussians, energy

CALIBRATION_FILE = "calibration.json"
TENSORS_FILE = "calibration.safetensors"
DECISIONS = ("ok", "ng", "review")
REASONS = {
    "ok": "defect score at or below the OK threshold",
    "ng": "defect score at or above the NG threshold",
    "between": "defect score between the OK and NG thresholds",
    "unlike": "unlike the calibration images (out-of-distribution score above its threshold)",
    "anomaly": "unlike the anomaly bank's good images (anomaly score above its threshold)",
}


@dataclass(frozen=True)
class Policy:
    """A model's calibration: how its outputs become a decision per image."""

    record: dict[str, Any]
    gaussians: Gaussians | None
    reference: Reference

    @property
    def temperature(self) -> float:
        return float(self.record["temperature"])

    @property
    def ok_index(self) -> int:
        return int(self.record["labels"].index(self.record["ok_class"]))

    @property
    def thresholds(self) -> Thresholds:
        t = self.record["thresholds"]
        return Thresholds(t.get("ok"), t.get("ng"))

    def apply(self, logits: np.ndarray, embeddings: np.ndarray, stats: np.ndarray,
              anomalous: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Calibrated probabilities, defect and OOD scores, drift projections, decision and reason.

        `stats`: the images' `vitray.decisions.drift.image_statistics`. `anomalous`: per image,
        above an anomaly bank's threshold (`vitray score --anomaly`): an image the classifier
        would pass goes to REVIEW, since a defect nobody labelled looks like no known class.
        """
        probs = softmax(logits, self.temperature)
        defect = (1.0 - probs[:, self.ok_index]).astype(np.float32)
        ood = self.ood_score(logits, embeddings)
        decision = np.full(len(defect), "review", dtype=object)
        reason = np.full(len(defect), REASONS["between"], dtype=object)
        t = self.thresholds
        if t.ng is not None:
            ng = defect >= t.ng
            decision[ng], reason[ng] = "ng", REASONS["ng"]
        if t.ok is not None:
            ok = defect <= t.ok
            decision[ok], reason[ok] = "ok", REASONS["ok"]
        unlike = ood > float(self.record["ood"]["threshold"])
        decision[unlike], reason[unlike] = "review", REASONS["unlike"]
        if anomalous is not None:
            novel = np.asarray(anomalous, dtype=bool) & (decision == "ok")
            decision[novel], reason[novel] = "review", REASONS["anomaly"]
        return {"probs_calibrated": probs, "defect_score": defect, "ood_score": ood, "decision": decision,
                "reason": reason, "drift_projection": self.reference.project(embeddings, stats, probs.argmax(axis=1))}

    def ood_score(self, logits: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        if self.record["ood"]["method"] == "energy" or self.gaussians is None:
            return energy(logits, self.temperature)
        return self.gaussians.score(embeddings)

    def save(self, folder: str) -> None:
        """Write both files into a local folder (the model's, or one copied to it)."""
        from safetensors.numpy import save_file

        r = self.reference
        tensors = {"drift_mean": r.mean, "drift_directions": r.directions, "drift_stats_mean": r.stats_mean,
                   "drift_stats_scale": r.stats_scale, "drift_projections": r.projections, "drift_scores": r.scores}
        if self.gaussians is not None:
            tensors.update(ood_means=self.gaussians.means, ood_precision=self.gaussians.precision)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(folder, TENSORS_FILE))
        with open(os.path.join(folder, CALIBRATION_FILE), "w") as f:
            json.dump(self.record, f, indent=2)


def load_policy(folder: str, labels: list[str]) -> Policy | None:
    """The calibration in a local model folder; None where it has none. Checked against the model's labels."""
    from safetensors.numpy import load_file

    from vitray.errors import VitrayError

    path = os.path.join(folder, CALIBRATION_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        tensors = load_file(os.path.join(folder, TENSORS_FILE))
    except (OSError, ValueError) as exc:
        raise VitrayError(f"{folder}: cannot read its calibration ({exc}); calibrate the model again") from None
    if record.get("labels") != labels:
        raise VitrayError(f"{folder}: its calibration was made for the labels {record.get('labels')}, the model has "
                          f"{labels}; calibrate the model again")
    gaussians = Gaussians(tensors["ood_means"], tensors["ood_precision"]) if "ood_means" in tensors else None
    reference = Reference(*(tensors[f"drift_{name}"] for name in ("mean", "directions", "stats_mean", "stats_scale",
                                                                  "projections", "scores")))
    return Policy(record, gaussians, reference)
