"""What is left to score: tonight's input ids against the ids committed under OUT, in Arrow.

The committed ids are never gathered on the driver: the `id` column of the committed files
is scanned a batch at a time, restricted to the input's id range (so compacted files, sorted
by id, whose range misses tonight's ids are skipped by their Parquet statistics), and only
the committed ids that are also in the input are kept. Memory follows tonight's input, not
the output's history; the figures are in docs/scale.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from vitray.data.ids import Ids
from vitray.score.outputs import read_predictions


@dataclass(frozen=True)
class Plan:
    """Tonight's work: the input's ids not committed yet (in input order, as one Arrow array), and
    how many were."""

    remaining: Ids
    skipped: int


def committed_among(output: str, ids: pa.Array) -> pa.Array:
    """The ids of `ids` that are committed under OUT (each once; order not kept)."""
    ids = ids.cast(pa.string())
    if not len(ids):
        return pa.array([], pa.string())
    low, high = pc.min_max(ids).values()
    wanted = (pc.field("id") >= low) & (pc.field("id") <= high) & pc.field("id").isin(ids)
    batches = read_predictions(output).to_batches(columns=["id"], filter=wanted, batch_size=64 * 1024,
                                                  batch_readahead=2, fragment_readahead=8)
    found = [batch.column(0) for batch in batches]
    return pa.chunked_array(found, pa.string()).combine_chunks() if found else pa.array([], pa.string())


def plan_run(output: str, ids: Sequence[str]) -> Plan:
    """The ids of the input that are left to score under OUT."""
    column = Ids(ids).array
    done = committed_among(output, column)
    if not len(done):
        return Plan(Ids(column), 0)
    remaining = column.filter(pc.invert(pc.is_in(column, value_set=done)))
    return Plan(Ids(remaining), len(column) - len(remaining))
