"""Compaction: a run's committed pieces rewritten into few large predictions files.

Pieces are small (one writer batch each) so that a kill loses little; readers (the
report, `pyarrow.dataset`, DuckDB, Spark) want few files. After its pieces commit, a run
rewrites every piece left under `predictions/` into `predictions/run=<run_id>/` files of
about `COMPACT_ROWS` rows (as few as that allows), sorted by id (so a file's id range is
narrow and planning skips it by its statistics), each with its counts in its footer
(`outputs.summarize`: the report reads them instead of the rows). A file is written a row
group at a time: the memory it takes does not grow with its size. The steps and what a
kill at each leaves are in `vitray.score.outputs`, whose `recover_compactions` finishes or
undoes a killed compaction.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
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
    merge_summaries,
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
        for compaction, ids in _groups(root, run_id, names, rows_per_file):
            apply(root, compaction, ids)
            done["pieces"] += len(compaction.sources)
            done["files"] += 1
            done["rows"] += sum(len(part) for part in ids)
    return done


def _groups(root: storage.Location, run_id: str, names: list[str],
            rows_per_file: int) -> Iterator[tuple[Compaction, list[pa.Array]]]:
    """A run's pieces in as few groups of consecutive pieces as `rows_per_file` allows, of even
    size (a group passes it by less than one piece), each with its pieces' `id` columns (all
    a group holds in memory before its file is written)."""
    counts = np.array(_row_counts(root, names), dtype=np.int64)
    files = max(1, -(-int(counts.sum()) // rows_per_file))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    group_of = np.minimum(starts * files // max(1, int(counts.sum())), files - 1)
    for group in np.unique(group_of):
        sources = [names[i] for i in np.flatnonzero(group_of == group)]
        ids = [t.column("id").combine_chunks() for t in _read_ahead(root, sources, columns=["id"])]
        yield Compaction(run_id, tuple(sources)), ids


def _row_counts(root: storage.Location, names: list[str]) -> list[int]:
    """Each piece's row count, from its Parquet footer, IO_THREADS at once (the footers are not kept)."""
    import pyarrow.parquet as pq

    folder = root.child(PREDICTIONS)
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        return list(pool.map(lambda name: pq.read_metadata(folder.child(name).path, filesystem=root.fs).num_rows,
                             names))


def _read_ahead(root: storage.Location, names: list[str], columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The pieces in order, up to IO_THREADS read at once: on S3 each is a few round trips."""
    import pyarrow.parquet as pq

    folder = root.child(PREDICTIONS)
    schema = PREDICTIONS_SCHEMA if columns is None else pa.schema([PREDICTIONS_SCHEMA.field(c) for c in columns])

    def read(name: str) -> pa.Table:
        return pq.read_table(folder.child(name).path, filesystem=root.fs, schema=schema, columns=columns)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        for start in range(0, len(names), IO_THREADS * 4):
            yield from pool.map(read, names[start:start + IO_THREADS * 4])


def apply(root: storage.Location, compaction: Compaction, ids: list[pa.Array]) -> None:
    """The four steps: marker, target written whole, pieces deleted, marker deleted."""
    import pyarrow.parquet as pq

    predictions = root.child(PREDICTIONS)
    marker = root.child(COMPACTING, compaction.marker)
    storage.put(marker, _json(compaction.record()))
    summary: dict = {"runs": {}, "histogram": {}}
    with storage.put_file(predictions.child(*compaction.target.split("/")), durable=True) as path:
        with pq.ParquetWriter(path, PREDICTIONS_SCHEMA, compression="zstd") as writer:
            for group in _sorted_row_groups(root, list(compaction.sources), ids):
                writer.write_table(group, row_group_size=ROW_GROUP_ROWS)
                merge_summaries(summary, summarize(group))
            writer.add_key_value_metadata({SUMMARY_KEY: json.dumps(summary)})
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        list(pool.map(storage.delete, [predictions.child(name) for name in compaction.sources]))
    storage.delete(marker)


def _sorted_row_groups(root: storage.Location, names: list[str], ids: list[pa.Array]) -> Iterator[pa.Table]:
    """The pieces' rows sorted by id, ROW_GROUP_ROWS at a time, holding only the pieces a row group
    draws from (and those a later one still needs).

    A piece holds consecutive images of the plan, whose ids are in listing order: each row
    group then draws from a few neighbouring pieces, and the memory it takes is about two row
    groups' whatever the file's size. Pieces whose ids interleave are still written sorted;
    they are held longer.
    """
    import pyarrow.compute as pc

    counts = np.array([len(part) for part in ids], dtype=np.int64)
    order = pc.sort_indices(pa.chunked_array(ids, type=pa.string())).to_numpy().astype(np.int64)  # joined rows
    piece_of = np.repeat(np.arange(len(names)), counts)[order]
    row_of = order - np.concatenate([[0], np.cumsum(counts)[:-1]])[piece_of]
    last_use = np.zeros(len(names), dtype=np.int64)
    np.maximum.at(last_use, piece_of, np.arange(len(order)))
    held: dict[int, pa.Table] = {}
    for start in range(0, len(order), ROW_GROUP_ROWS):
        pieces, rows = piece_of[start:start + ROW_GROUP_ROWS], row_of[start:start + ROW_GROUP_ROWS]
        drawn = [int(p) for p in np.unique(pieces)]
        wanted = [p for p in drawn if p not in held]
        held.update(zip(wanted, _read_ahead(root, [names[p] for p in wanted])))
        parts, at = [], np.empty(len(pieces), dtype=np.int64)
        done = 0
        for p in drawn:
            mine = np.flatnonzero(pieces == p)
            parts.append(held[p].take(pa.array(rows[mine])))
            at[mine] = np.arange(done, done + len(mine))
            done += len(mine)
        yield pa.concat_tables(parts).take(pa.array(at))
        end = start + len(pieces)
        for p in [p for p in held if last_use[p] < end]:
            del held[p]


def _json(record: dict) -> bytes:
    return json.dumps(record).encode()
