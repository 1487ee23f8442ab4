"""The decisions in a scoring run: the predictions' decision columns, each piece's summary, the night's end.

The model stage (`vitray.inference`) decides each image of a calibrated model. A committed piece
stores the decision columns with its predictions, and sends the driver a summary: its counts per
decision and its drift sample (the images with the smallest id-hash keys, so that the pieces'
samples merge into the night's own, whatever their number). At the end of the run the driver
tests the night for drift, writes the review table, and records both in the manifest.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from vitray.decisions.drift import SAMPLE, NightSample, compare, sample_keys

# The predictions' decision columns (null for a model without a calibration).
COLUMNS = ("decision", "reason", "defect_score", "ood_score", "probs_calibrated")


def schema_fields() -> list[tuple[str, Any]]:
    import pyarrow as pa

    return [("decision", pa.string()), ("reason", pa.string()), ("defect_score", pa.float32()),
            ("ood_score", pa.float32()), ("probs_calibrated", pa.list_(pa.float32()))]


def prediction_columns(batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, Any]:
    """The decision columns of the committed `rows` of a model-stage batch; nulls where it has none."""
    import pyarrow as pa

    n = len(rows)
    if "decision" not in batch:
        return {name: pa.nulls(n, type_) for name, type_ in schema_fields()}
    probs = np.asarray(batch["probs_calibrated"], np.float32)[rows]
    return {
        "decision": pa.array([batch["decision"][i] for i in rows], pa.string()),
        "reason": pa.array([batch["reason"][i] for i in rows], pa.string()),
        "defect_score": pa.array(np.asarray(batch["defect_score"], np.float32)[rows], pa.float32()),
        "ood_score": pa.array(np.asarray(batch["ood_score"], np.float32)[rows], pa.float32()),
        "probs_calibrated": pa.array(list(probs), pa.list_(pa.float32())),
    }


def piece_summary(batch: dict[str, np.ndarray], ids: list[str], rows: np.ndarray) -> str:
    """A committed piece's decisions for the driver, as JSON: counts, and its drift sample."""
    if "decision" not in batch:
        return ""
    counts: dict[str, int] = {}
    for i in rows:
        counts[str(batch["decision"][i])] = counts.get(str(batch["decision"][i]), 0) + 1
    sample = NightSample(size=SAMPLE)
    if len(rows):
        sample.add_keyed(sample_keys([ids[i] for i in rows]), np.asarray(batch["drift_projection"])[rows],
                         np.asarray(batch["defect_score"])[rows])
    return json.dumps({"counts": counts, "drift": sample.summary()})


class NightDecisions:
    """What the driver keeps of a night's decisions: counts and a bounded drift sample."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.sample = NightSample(size=SAMPLE)
        self.pieces = 0

    def add(self, summary: str) -> None:
        if not summary:
            return
        found = json.loads(summary)
        self.pieces += 1
        for key, value in found["counts"].items():
            self.counts[key] = self.counts.get(key, 0) + int(value)
        self.sample.merge(found["drift"])

    def finish(self, policy: Any, output: str, run_id: str, predictions: Any) -> dict[str, Any]:
        """The night's drift test and review table (of this run's images), for the manifest."""
        from vitray.decisions.review import review_rows, write_review

        drift = compare(policy.reference, self.sample, float(policy.record["drift"]["alpha"]))
        table = review_rows(predictions, run_id)
        review = write_review(output, run_id, table) if table.num_rows else {}
        return {"counts": dict(sorted(self.counts.items())), "drift": drift,
                "review": {"images": table.num_rows, **review}}
