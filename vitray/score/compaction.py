"""Compaction: a run's committed pieces rewritten into few large predictions files.

Pieces are small (one writer batch each) so that a kill loses little; readers (the
report, `pyarrow.dataset`, DuckDB, Spark) want few files. After its pieces commit, a run
rewrites every piece left under `predictions/` into `predictions/run=<run_id>/` files of
up to `COMPACT_ROWS` rows, sorted by id (so a file's id range is narrow and planning skips
it by its statistics), each with its counts in its footer (`outputs.summarize`: the report
reads them instead of the rows). The steps and what a kill at each leaves are in
`vitray.score.outputs`, whose `recover_compactions` finishes or undoes a killed compaction.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from vitray import storage
from vitray.score.outputs import (
    COMPACT_ROWS,
    COMPACTING,
    PREDICTIONS,
    PREDICTIONS_SCHEMA,
    RUN_FOLDER,
    SUMMARY_KEY,
    compaction_markers,
    parquet_bytes,
    piece_run_id,
    summarize,
)

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 10_000  # a compacted file's row groups: the unit planning skips by id range
IO_THREADS = 16  # pieces read or deleted at once (round trips on S3)


@dataclass(frozen=True)
class Compaction:
    """One target file and the pieces it replaces (names relative to `predictions/`)."""

    run_id: str
    sources: tuple[str, ...]

    @property
    def target(self) -> str:
        # Named from its pieces: a compaction redone after a kill rewrites the same name.
        digest = hashlib.sha1("\n".join(sorted(self.sources)).encode()).hexdigest()[:16]
        return f"{RUN_FOLDER}{self.run_id}/part-{digest}.parquet"

    @property
    def marker(self) -> str:
        return f"{posixpath.basename(self.target)[:-len('.parquet')]}.json"

    def record(self) -> dict:
        return {"run_id": self.run_id, "sources": list(self.sources), "targets": [self.target]}


def flat_pieces(root: storage.Location) -> dict[str, list[str]]:
    """Committed pieces directly under `predictions/`, by run, sorted by name.

    Pieces whose `_pending/` marker is still there are left where recovery expects them.
    """
    pending = {posixpath.basename(i.path)[:-len(".json")]
               for i in storage.list_files(root.child("_pending").uri, recursive=False)}
    runs: dict[str, list[str]] = {}
    for info in storage.list_files(root.child(PREDICTIONS).uri, recursive=False):
        name = posixpath.basename(info.path)
        run_id = piece_run_id(name)
        if run_id and name[len("part-"):-len(".parquet")] not in pending:
            runs.setdefault(run_id, []).append(name)
    return {run: sorted(names) for run, names in sorted(runs.items())}


def compact(output: str, rows_per_file: int = COMPACT_ROWS) -> dict[str, int]:
    """Rewrite every piece under OUT's `predictions/` into its run's large files; what was done.

    Called by the run holding OUT's lease, after its own pieces have committed (and after
    `recover`, so other runs' pieces are settled too).
    """
    root = storage.resolve(output)
    done = {"pieces": 0, "files": 0, "rows": 0}
    for run_id, names in flat_pieces(root).items():
        for compaction, table in _groups(root, run_id, names, rows_per_file):
            apply(root, compaction, table)
            done["pieces"] += len(compaction.sources)
            done["files"] += 1
            done["rows"] += table.num_rows
    return done


def _groups(root: storage.Location, run_id: str, names: list[str],
            rows_per_file: int) -> Iterator[tuple[Compaction, pa.Table]]:
    """Consecutive pieces of one run read into tables of about `rows_per_file` rows (never more,
    unless one piece alone is larger)."""
    held: list[pa.Table] = []
    sources: list[str] = []
    rows = 0
    for name, table in zip(names, _read_ahead(root, names)):
        if held and rows + table.num_rows > rows_per_file:
            yield Compaction(run_id, tuple(sources)), pa.concat_tables(held)
            held, sources, rows = [], [], 0
        held.append(table)
        sources.append(name)
        rows += table.num_rows
    if held:
        yield Compaction(run_id, tuple(sources)), pa.concat_tables(held)


def _read_ahead(root: storage.Location, names: list[str]) -> Iterator[pa.Table]:
    """The pieces in order, up to IO_THREADS read at once: on S3 each is a few round trips."""
    import pyarrow.parquet as pq

    folder = root.child(PREDICTIONS)

    def read(name: str) -> pa.Table:
        return pq.read_table(folder.child(name).path, filesystem=root.fs, schema=PREDICTIONS_SCHEMA)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        for start in range(0, len(names), IO_THREADS * 4):
            yield from pool.map(read, names[start:start + IO_THREADS * 4])


def apply(root: storage.Location, compaction: Compaction, table: pa.Table) -> None:
    """The four steps: marker, target written whole, pieces deleted, marker deleted."""
    predictions = root.child(PREDICTIONS)
    marker = root.child(COMPACTING, compaction.marker)
    storage.put(marker, _json(compaction.record()))
    table = table.sort_by("id").replace_schema_metadata({SUMMARY_KEY: json.dumps(summarize(table))})
    storage.put(predictions.child(*compaction.target.split("/")), parquet_bytes(table, ROW_GROUP_ROWS), durable=True)
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        list(pool.map(storage.delete, [predictions.child(name) for name in compaction.sources]))
    storage.delete(marker)


def _json(record: dict) -> bytes:
    return json.dumps(record).encode()
