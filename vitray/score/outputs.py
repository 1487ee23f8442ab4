"""The one place that knows a scoring output's layout and how pieces are committed to it.

OUT holds `predictions/` (Parquet, one row per scored image), `errors/` (Parquet rows of
images that could not be used), `attention/<key>.png` overlays, `runs/<run_id>.json`
manifests, `_lease.json` (`vitray.lease`) and, while work is on its way, `_pending/` and
`_compacting/`.

Commit protocol (what makes a rerun score only what is missing, and a kill harmless):
  A piece is one batch of the writer stage, named `<run_id>-<hash of its ids>`, so a Ray
  retry of the same batch rewrites the same names instead of adding new ones. In order:
    1. `_pending/<piece>.json` lists the overlay PNGs the piece is about to write;
    2. the PNGs `attention/<key>.png`, then `errors/part-<piece>.parquet` (if any failed);
    3. the commit: `predictions/part-<piece>.parquet`, written as one whole object
       (`storage.put_object`: a single PUT on S3; a hidden temp file, fsync'd, renamed locally);
    4. `_pending/<piece>.json` is deleted.
  A row is committed iff it is in a committed predictions file (`prediction_files`), each
  id once. Only the run holding OUT's lease commits, compacts or recovers. Recovery after a
  killed run: a pending piece whose predictions file exists lost only its marker (dropped);
  one without it is deleted with its PNGs; stale local temp files are removed; an entry
  that cannot be cleaned is reported and left, never blocking the run.

Compaction (`vitray.score.compaction`) then rewrites a run's pieces into files of about
`COMPACT_ROWS` rows, `predictions/run=<run_id>/part-<hash of its pieces>.parquet`, sorted
by id: `_compacting/<target>.json` names the target and its pieces, the target is written
whole, the pieces are deleted, the marker is deleted. While a marker is there, the
committed files are the target once it exists (its pieces are not counted), else the
pieces; recovery finishes the deletes or deletes the target. Outputs whose pieces were
never compacted read the same way.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from vitray import storage
from vitray.decisions import nightly
from vitray.score import anomalies

log = logging.getLogger(__name__)

PNG_THREADS = 8  # overlay writes in flight per piece

PREDICTIONS_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("label", pa.string()), ("score", pa.float32()),
    ("probs", pa.list_(pa.float32())), ("attention", pa.list_(pa.float32())),
    ("attention_shape", pa.list_(pa.int32())), ("attention_png", pa.string()),
    ("model", pa.string()), ("run_id", pa.string()),
    # A calibrated model's decision (vitray.decisions): null for a model without a calibration.
    *nightly.schema_fields(),
    # With --anomaly BANK (vitray.score.anomalies): null otherwise.
    *anomalies.schema_fields(),
])
ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string()), ("message", pa.string()),
                           ("run_id", pa.string())])


KEY_SEGMENT_BYTES = 64  # of each folder and of the file name's readable part
KEY_DEPTH = 8  # folders kept from the id; deeper ones are folded into the last


def attention_key(image_id: str, folder: str = "attention") -> str:
    """OUT-relative key of an image's overlay: `attention/<readable id>-<hash>.png` (or `folder`'s).

    One key per id whatever the id holds, and always a legal name: the readable part keeps
    the id's subfolders (at most 8, each cut to 64 bytes; empty, `.` and `..` segments
    become `_`, `#<row>` of table ids `_row<row>`, unprintable characters `_`), and 16 hex
    digits of the id's SHA-1 tell apart ids that read alike (`x#1.png`, `x_row1.png`) or
    were cut short. A key stays under 700 bytes (S3 allows 1,024) and each name under 100
    (filesystems allow 255).
    """
    digest = hashlib.sha1(image_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    parts = image_id.replace("\\", "/").split("/")
    if len(parts) > KEY_DEPTH:
        parts = parts[: KEY_DEPTH - 1] + ["_".join(parts[KEY_DEPTH - 1:])]
    readable = [_key_segment(p) for p in parts]
    readable[-1] = f"{readable[-1]}-{digest}.png"
    return f"{folder}/" + "/".join(readable)


def _key_segment(part: str) -> str:
    if part in ("", ".", ".."):
        return "_"
    text = "".join(c if c.isprintable() else "_" for c in part.replace("#", "_row"))
    return text.encode("utf-8", "replace")[:KEY_SEGMENT_BYTES].decode("utf-8", "ignore") or "_"


PREDICTIONS = "predictions"
COMPACTING = "_compacting"
RUN_FOLDER = "run="
COMPACT_ROWS = 50_000  # rows per compacted predictions file: tens of MB with maps
HIST_BINS = 20  # of the score histograms in the report and in compacted files' summaries
SUMMARY_KEY = b"vitray.summary"  # a compacted file's counts, in its Parquet footer


def summarize(table: pa.Table) -> dict[str, Any]:
    """A file's rows in counts: images per run and label, and per label a score histogram."""
    import pyarrow.compute as pc

    summary: dict[str, Any] = {"runs": {}, "histogram": {}}
    for label in pc.unique(table.column("label")).to_pylist():
        rows = table.filter(pc.equal(table.column("label"), label))
        scores = rows.column("score").to_numpy().astype(np.float64)
        bins = np.clip(np.floor(scores * HIST_BINS), 0, HIST_BINS - 1).astype(np.int64)
        summary["histogram"][label] = np.bincount(bins, minlength=HIST_BINS).tolist()
        for run_id, count in zip(*np.unique(np.asarray(rows.column("run_id").to_pylist(), dtype=object),
                                            return_counts=True)):
            summary["runs"].setdefault(str(run_id), {})[label] = int(count)
    return summary


def merge_summaries(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """`total` with `part`'s counts added (a file's summary from its row groups')."""
    for run_id, labels in part["runs"].items():
        mine = total["runs"].setdefault(run_id, {})
        for label, count in labels.items():
            mine[label] = mine.get(label, 0) + count
    for label, counts in part["histogram"].items():
        mine = total["histogram"].setdefault(label, [0] * len(counts))
        total["histogram"][label] = [a + b for a, b in zip(mine, counts)]
    return total


def read_summary(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The summary in a predictions file's footer; None for a piece (or a file without one)."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path, filesystem=fs).metadata or {}
    return json.loads(meta[SUMMARY_KEY]) if SUMMARY_KEY in meta else None


def prediction_files(output: str) -> tuple[storage.Location, list[str]]:
    """`predictions/` of OUT and the paths of its committed files (see the module docstring).

    One listing of `predictions/` and one of `_compacting/` (empty but while a compaction
    runs or after one was killed), whatever the output's history.
    """
    root = storage.resolve(output)
    loc = root.child(PREDICTIONS)
    files = [f.path for f in storage.list_files(loc.uri, recursive=True)
             if f.path.endswith(".parquet") and _visible_under(loc.path, f.path)]
    hidden: set[str] = set()
    present = {storage.relative(loc, f) for f in files}
    for marker in compaction_markers(root).values():
        targets, sources = marker.get("targets", []), marker.get("sources", [])
        hidden.update(sources if all(t in present for t in targets) else targets)
    return loc, [f for f in files if storage.relative(loc, f) not in hidden]


def compaction_markers(root: storage.Location) -> dict[str, dict]:
    """The `_compacting/*.json` markers of OUT by path (each written whole; a file that does not parse is skipped)."""
    markers = {}
    for info in _list(root.child(COMPACTING)):
        if info.path.endswith(".json") and _visible(info.path):
            with root.fs.open_input_stream(info.path) as f:
                try:
                    markers[info.path] = json.loads(f.read())
                except ValueError:  # not vitray's (a marker is written whole): left alone
                    log.warning("skipping %s: not a compaction marker", info.path)
    return markers


def read_predictions(output: str) -> Any:
    """The committed predictions under OUT as a `pyarrow.dataset.Dataset` (empty when none)."""
    import pyarrow.dataset as pads

    loc, files = prediction_files(output)
    return pads.dataset(files, schema=PREDICTIONS_SCHEMA, filesystem=loc.fs, format="parquet")


def read_errors(output: str) -> Any:
    """The errors/ rows under OUT as a `pyarrow.dataset.Dataset` (empty when none)."""
    import pyarrow.dataset as pads

    loc = storage.resolve(storage.join(output, "errors"))
    files = [f.path for f in _list(loc) if _visible(f.path) and f.path.endswith(".parquet")]
    return pads.dataset(files, schema=ERRORS_SCHEMA, filesystem=loc.fs, format="parquet")


def committed_ids(output: str) -> set[str]:
    """Ids committed under OUT, as a Python set: for small outputs and tests.

    Planning a run uses `vitray.score.planning.committed_among`, which never holds them all.
    """
    return set(read_predictions(output).to_table(columns=["id"]).column(0).to_pylist())


def _visible(path: str) -> bool:
    # The same rule as pyarrow.dataset's discovery: hidden and `_` names are not data.
    return not posixpath.basename(path).startswith((".", "_"))


def _visible_under(folder: str, path: str) -> bool:
    """No part of the path below `folder` is hidden (temp files, markers)."""
    return not any(part.startswith((".", "_")) for part in posixpath.relpath(path, folder).split("/"))


def _list(loc: storage.Location) -> list[pafs.FileInfo]:
    """Files directly under a folder/prefix, none when it does not exist."""
    return storage.list_files(loc.uri, recursive=False)


def _write_in_place(paths: Sequence[str], data: Sequence[bytes]) -> None:
    """Local overlays written in place, each folder made once: their piece's pending marker
    covers them, so a temp file and rename each (`storage.put`) would buy nothing."""
    for folder in {os.path.dirname(p) for p in paths}:
        os.makedirs(folder, exist_ok=True)
    for path, blob in zip(paths, data):
        with open(path, "wb") as f:
            f.write(blob)


def recover(output: str, run_id: str | None = None) -> dict[str, int]:
    """Clean up what killed runs left under OUT (see the module docstring); safe to repeat.

    Called by the run holding OUT's lease, so every pending piece found belongs to a run
    that is gone (`run_id`, the caller's own, is left alone). One entry that cannot be
    cleaned (a name the filesystem refuses, a damaged marker) is reported and skipped:
    it must never keep a run from scoring.
    """
    root = storage.resolve(output)
    pending = root.child("_pending")
    found = {"pending_dropped": 0, "pending_undone": 0, "temp_files": 0, "unrecoverable": 0}
    for info in _list(pending):
        piece = posixpath.basename(info.path)
        if not piece.endswith(".json") or (run_id and piece.startswith(f"{run_id}-")):
            continue
        try:
            found[_recover_piece(root, info.path, piece[: -len(".json")])] += 1
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            found["unrecoverable"] += 1
            log.warning("could not clean up %s: %s", info.path, str(exc).splitlines()[0] if str(exc) else exc)
    found.update(recover_compactions(root))
    if not root.is_s3:
        for folder in ("_pending", "errors", "runs"):
            found["temp_files"] += storage.remove_temps(root.child(folder).path)
        found["temp_files"] += _remove_temps_below(root.child(PREDICTIONS).path)
    return found


def _remove_temps_below(folder: str) -> int:
    """`storage.put`'s temp files left by a kill in `predictions/` and its run folders."""
    removed = storage.remove_temps(folder)
    if os.path.isdir(folder):
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                removed += storage.remove_temps(entry.path)
    return removed


def _recover_piece(root: storage.Location, marker: str, piece: str) -> str:
    if _piece_committed(root, piece):
        storage.delete(storage.Location(root.fs, marker, marker))
        return "pending_dropped"  # committed; only the marker's delete was lost
    with root.fs.open_input_stream(marker) as f:
        record = json.loads(f.read())
    for key in record.get("pngs", []):
        try:
            png = root.child(*key.split("/"))
            storage.delete(png)
            if not root.is_s3:
                storage.remove_temps(posixpath.dirname(png.path), posixpath.basename(png.path))
        except OSError as exc:  # e.g. a name too long for this filesystem: it was never written
            log.warning("could not delete overlay %s of an unfinished piece: %s", key, exc)
    storage.delete(storage.Location(root.fs, marker, marker))
    return "pending_undone"


def recover_compactions(root: storage.Location) -> dict[str, int]:
    """Finish (target whole: delete its pieces) or undo (no target: delete it) killed compactions.

    A marker that cannot be settled (storage refusing a delete) is reported and left: the next
    run tries again, and readers keep counting its ids once meanwhile.
    """
    found = {"compactions_finished": 0, "compactions_undone": 0}
    for path, record in compaction_markers(root).items():
        try:
            whole = _settle(root, path, record)
        except OSError as exc:
            log.warning("could not settle the compaction %s: %s", path, exc)
            continue
        found["compactions_finished" if whole else "compactions_undone"] += 1
        log.info("%s a killed compaction of %s", "finished" if whole else "undid", record.get("run_id"))
    return found


def _settle(root: storage.Location, marker: str, record: dict) -> bool:
    """One killed compaction finished or undone; whether its target was whole."""
    predictions = root.child(PREDICTIONS)
    targets = [predictions.child(*t.split("/")) for t in record.get("targets", [])]
    whole = all(root.fs.get_file_info(t.path).type == pafs.FileType.File for t in targets)
    for loc in [predictions.child(s) for s in record.get("sources", [])] if whole else targets:
        storage.delete(loc)
        if not root.is_s3:
            storage.remove_temps(posixpath.dirname(loc.path), posixpath.basename(loc.path))
    storage.delete(storage.Location(root.fs, marker, marker))
    return whole


@dataclass(frozen=True)
class PiecePlan:
    """What the writer stage needs to commit a piece (pickled to the Ray tasks)."""

    output: str
    run_id: str
    model: str
    labels: tuple[str, ...]
    grid: tuple[int, int]
    input_base: str  # input URI that ids are relative to
    anomaly: anomalies.AnomalyPlan | None = None  # scoring with an anomaly bank

    def name(self, ids: Sequence[str]) -> str:
        # The ids, not a counter: a retried task writes the same names, never a second copy.
        digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]
        return f"{self.run_id}-{digest}"


def write_piece(batch: dict[str, np.ndarray], plan: PiecePlan) -> dict[str, np.ndarray]:
    """Ray Data UDF: commit one piece of scored rows (protocol in the module docstring) → one summary row."""
    started = time.perf_counter()
    root = storage.resolve(plan.output)
    ids = [str(i) for i in batch["id"]]
    piece = plan.name(ids)
    ok = batch["error_kind"] == ""
    maps = np.asarray(batch["attention"], dtype=np.float32)
    has_map = ok & ~np.isnan(maps).any(axis=1)
    pngs = {i: attention_key(ids[i]) for i in np.flatnonzero(has_map)}
    labels = [plan.labels[p] if p >= 0 else "" for p in batch["pred"]]
    anomaly_pngs = anomalies.overlay_rows(batch, plan.anomaly, ok, attention_key)

    put = _putter(root)
    pending = root.child("_pending", f"{piece}.json")
    if pngs or anomaly_pngs:
        put(pending, json.dumps({"run_id": plan.run_id,
                                 "pngs": list(pngs.values()) + list(anomaly_pngs.values())}).encode())
    if pngs:
        rows = np.fromiter(pngs, dtype=np.int64)
        _write_overlays(root, _overlay_pngs(batch["image"][rows], maps[rows].reshape(len(rows), *plan.grid)),
                        [pngs[i] for i in rows], put)
    if anomaly_pngs:
        rows = np.fromiter(anomaly_pngs, dtype=np.int64)
        _write_overlays(root, anomalies.overlay_pngs(batch["image"][rows], batch["anomaly_map"][rows], plan.anomaly),
                        [anomaly_pngs[i] for i in rows], put)
    bad, good = np.flatnonzero(~ok), np.flatnonzero(ok)
    if len(bad):
        _write_errors(root, piece, plan, ids, batch, bad, put)
    if len(good):
        _check_lease(root, plan.run_id)
        _commit_predictions(root, piece, plan, ids, labels, batch, maps, has_map, (pngs, anomaly_pngs), good, put)
    if pngs or anomaly_pngs:
        storage.delete(pending)

    counts: dict[str, int] = {}
    for i in good:
        counts[labels[i]] = counts.get(labels[i], 0) + 1
    kinds: dict[str, int] = {}
    for i in bad:
        kinds[str(batch["error_kind"][i])] = kinds.get(str(batch["error_kind"][i]), 0) + 1
    return {"piece": np.array([piece], dtype=object), "scored": np.array([len(good)]),
            "errors": np.array([len(bad)]), "labels": np.array([json.dumps(counts)], dtype=object),
            "error_kinds": np.array([json.dumps(kinds)], dtype=object),
            "decisions": np.array([nightly.piece_summary(batch, ids, good)], dtype=object),
            "anomalous": np.array([anomalies.anomalous_count(batch, good)]),
            "seconds": np.array([time.perf_counter() - started])}


def _putter(root: storage.Location) -> Callable[..., None]:
    """How a piece writes its objects: on S3 one request per object (`storage.put_object`)."""
    s3 = storage.s3_put_filesystem() if root.is_s3 else None
    return functools.partial(storage.put_object, s3=s3)


def _write_overlays(root: storage.Location, encoded: list[bytes], keys: list[str], put: Callable[..., None]) -> None:
    """Overlay PNGs under their OUT-relative keys, before the piece commits."""
    places = [root.child(*key.split("/")) for key in keys]
    if root.is_s3:
        # Threads: on S3 each overlay is a round trip, and a piece has hundreds of them.
        with ThreadPoolExecutor(max_workers=PNG_THREADS) as pool:
            list(pool.map(put, places, encoded))
    else:  # local writes do not wait: threads would only contend for the GIL
        _write_in_place([p.path for p in places], encoded)


def _write_errors(root: storage.Location, piece: str, plan: PiecePlan, ids: list[str], batch: dict[str, np.ndarray],
                  bad: np.ndarray, put: Callable[..., None]) -> None:
    errors = pa.table({"path": [_input_uri(plan.input_base, ids[i]) for i in bad],
                       "error": [str(batch["error_kind"][i]) for i in bad],
                       "message": [str(batch["error"][i]) for i in bad],
                       "run_id": [plan.run_id] * len(bad)}, schema=ERRORS_SCHEMA)
    put(root.child("errors", f"part-{piece}.parquet"), parquet_bytes(errors), durable=True)


def _commit_predictions(root: storage.Location, piece: str, plan: PiecePlan, ids: list[str], labels: list[str],
                        batch: dict[str, np.ndarray], maps: np.ndarray, has_map: np.ndarray,
                        overlays: tuple[dict[int, str], dict[int, str]], good: np.ndarray,
                        put: Callable[..., None]) -> None:
    """The commit: once this file is in place, these ids are done. `overlays`: row → key of the
    attention and the anomaly overlays."""
    rows, cols = plan.grid
    pngs, anomaly_pngs = overlays
    table = pa.table({
        "id": [ids[i] for i in good],
        "path": [_input_uri(plan.input_base, ids[i]) for i in good],
        "label": [labels[i] for i in good],
        "score": np.asarray(batch["score"], dtype=np.float32)[good],
        "probs": _float_lists(np.asarray(batch["probs"], dtype=np.float32)[good]),
        "attention": _float_lists(maps[good], valid=has_map[good]),
        "attention_shape": [[rows, cols] if has_map[i] else None for i in good],
        "attention_png": [pngs.get(i) for i in good],
        "model": [plan.model] * len(good),
        "run_id": [plan.run_id] * len(good),
        **nightly.prediction_columns(batch, good),
        **anomalies.prediction_columns(batch, good, anomaly_pngs, plan.anomaly),
    }, schema=PREDICTIONS_SCHEMA)
    put(root.child(PREDICTIONS, f"part-{piece}.parquet"), parquet_bytes(table), durable=True)


def _check_lease(root: storage.Location, run_id: str) -> None:
    """Commit only while this run holds OUT's lease: a run that stalled past the lease's stale
    time and was taken over must not commit the ids the new holder is scoring too."""
    from vitray.lease import LEASE_NAME, LeaseLost

    try:
        with root.fs.open_input_stream(root.child(LEASE_NAME).path) as f:
            holder = json.loads(f.read()).get("run_id")
    except (FileNotFoundError, ValueError):  # gone, or half-written by the run taking it over
        holder = None
    # Any other OSError (the storage unreachable) is the run's failure, not a lost lease.
    if holder != run_id:
        raise LeaseLost(f"{root.uri}: run {run_id} no longer holds the output's lease (held by {holder}); "
                        "this piece was not committed", exit_code=1)


def _float_lists(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """(rows, k) float32 → list<float32> rows without a Python list per row; null where not `valid`."""
    rows, k = values.shape
    offsets = pa.array(np.arange(0, (rows + 1) * k, k, dtype=np.int32))
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).ravel()), mask=mask)


def _piece_committed(root: storage.Location, piece: str) -> bool:
    # A piece with a pending marker is never compacted (`compaction.flat_pieces`): its file is where it was.
    return root.fs.get_file_info(root.child(PREDICTIONS, f"part-{piece}.parquet").path).type == pafs.FileType.File


def piece_run_id(name: str) -> str | None:
    """The run that committed a piece file `part-<run_id>-<16 hex>.parquet`; None for other names."""
    stem = name[len("part-"):-len(".parquet")] if name.startswith("part-") and name.endswith(".parquet") else ""
    run_id, _, digest = stem.rpartition("-")
    if not run_id or len(digest) != 16 or any(c not in "0123456789abcdef" for c in digest):
        return None
    return run_id


def parquet_bytes(table: pa.Table, row_group_rows: int | None = None) -> bytes:
    """A table as the bytes of one zstd Parquet file (written whole with `storage.put`)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_rows)
    return sink.getvalue().to_pybytes()


def _overlay_pngs(images: np.ndarray, maps: np.ndarray, chunk: int = 64) -> list[bytes]:
    """The bulk overlays: each map on the image the model saw, at that size, without a caption.

    Label and score are in the row (and the report's captions). Drawn a chunk of images at
    a time (small enough to stay in cache), each then a PNG of its own: drawing and encoding
    one overlay at a time through PIL cost as much as the tiny model's forward pass.
    """
    from vitray.overlays import overlay_maps
    from vitray.png import encode

    images = np.asarray(images, dtype=np.uint8)
    pngs = []
    for start in range(0, len(images), chunk):
        pngs += [encode(o) for o in overlay_maps(images[start:start + chunk], maps[start:start + chunk])]
    return pngs


def _input_uri(base: str, image_id: str) -> str:
    return storage.join(base, image_id)


def record_bad_names(out: str, run_id: str, source: Any) -> None:
    """Files whose names cannot be ids (not valid UTF-8) become error rows of their own kind, each run."""
    if not source.bad_names:
        return
    n = len(source.bad_names)
    table = pa.table({"path": source.bad_names, "error": ["bad-name"] * n,
                      "message": ["the file name is not valid UTF-8; rename the file to score it"] * n,
                      "run_id": [run_id] * n}, schema=ERRORS_SCHEMA)
    root = storage.resolve(out)
    storage.put(root.child("errors", f"part-{run_id}-names.parquet"), parquet_bytes(table), durable=True)
    log.warning("%d file(s) with names that are not valid UTF-8 recorded in %s", n, storage.join(out, "errors"))
