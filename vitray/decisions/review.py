"""The review queue of a scoring run: the images a person should look at, as Parquet and CSV.

Built from the run's committed predictions (each image once, as the predictions are), after
the run's last piece: `OUT/review/run=<run_id>/review.parquet` and `review.csv`, the images
decided REVIEW first by reason, then by defect score, with the keys of their overlays (attention,
and anomaly when scored with an anomaly bank).
"""
from __future__ import annotations

import io
from typing import Any

from vitray import storage

COLUMNS = ("id", "path", "label", "decision", "reason", "defect_score", "ood_score", "anomaly_score", "attention_png",
           "anomaly_png", "run_id")


def review_rows(dataset: Any, run_id: str) -> Any:
    """This run's images decided REVIEW (a pyarrow Table), from a predictions dataset."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    table = dataset.to_table(columns=list(COLUMNS),
                             filter=(pads.field("run_id") == run_id) & (pads.field("decision") == "review"))
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("reason", "ascending"), ("defect_score", "descending"),
                                               ("id", "ascending")])
    return table.take(order)


def write_review(output: str, run_id: str, table: Any) -> dict[str, str]:
    """The review table as Parquet and CSV under OUT/review/run=<run_id>/; the two URIs."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder = storage.join(output, "review", f"run={run_id}")
    parquet, csv = storage.join(folder, "review.parquet"), storage.join(folder, "review.csv")
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(parquet, sink.getvalue())
    text = io.BytesIO()
    pacsv.write_csv(table, text)
    storage.write_bytes(csv, text.getvalue())
    return {"parquet": parquet, "csv": csv}
