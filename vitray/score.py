"""Bulk scoring with Ray Data, committed exactly once in pieces, and attention maps for a few images.

`score` streams images (any folder or s3:// prefix of images, or a data set) through
decode → resize → `Predictor` actors → a writer stage that commits each piece of rows
to OUT; the driver only sees one summary row per piece, so memory stays flat.

Commit protocol (what makes a rerun score only what is missing, and a kill harmless):
  A piece is one batch of the writer stage, named `<run_id>-<hash of its ids>`, so a Ray
  retry of the same batch rewrites the same names instead of adding new ones. In order:
    1. `_pending/<piece>.json` lists the overlay PNGs the piece is about to write;
    2. the PNGs `attention/<key>.png`, then `errors/part-<piece>.parquet` (if any failed);
    3. the commit: `predictions/part-<piece>.parquet`, written as one whole object
       (S3: a single PUT, visible only once complete; local disk: a hidden temp file
       `.name.tmp-*` in the same folder, fsync'd, then os.replace);
    4. `_pending/<piece>.json` is deleted.
  A row is committed iff it is in a file under predictions/, and `pyarrow.dataset` (which
  skips names starting with `.` or `_`) shows exactly the committed rows, each id once.
  One run per OUT at a time: before anything else a run takes OUT's lease (`vitray.lease`,
  `_lease.json`); a second run is refused, a run whose lease went stale (killed) is taken
  over, and a run that finds its own lease taken over stops taking new pieces.
  Holding the lease, a run recovers from killed ones: a pending piece whose predictions
  file exists lost only its marker (dropped); one without it is deleted with its PNGs;
  stale local temp files are removed; an entry that cannot be cleaned is reported and
  left, never blocking the run. Then the ids under predictions/ are skipped, everything
  else is read. Images that fail to decode are not committed: each run tries them again
  and adds an errors/ row (path, run_id), since a file may have been half-copied when it
  was listed; so do files whose names are not UTF-8 (`bad-name`), which cannot be ids.
  A failed or interrupted run marks its manifest and keeps every committed piece.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from vitray import storage
from vitray.errors import VitrayError
from vitray.lease import STALE_S, Lease
from vitray.explain import HEAD_FUSIONS, METHODS  # both modules import torch only when used
from vitray.inference import ATTENTION_MODES

log = logging.getLogger(__name__)

SCORE_FORMATS = ("images", "imagefolder", "parquet", "csv")
PNG_THREADS = 8  # overlay writes in flight per piece

PREDICTIONS_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("label", pa.string()), ("score", pa.float32()),
    ("probs", pa.list_(pa.float32())), ("attention", pa.list_(pa.float32())),
    ("attention_shape", pa.list_(pa.int32())), ("attention_png", pa.string()),
    ("model", pa.string()), ("run_id", pa.string()),
])
ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string()), ("message", pa.string()),
                           ("run_id", pa.string())])


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring run; every default lives here (the CLI reads them) and goes into the manifest."""

    model: str  # trained model folder or s3:// prefix
    input: str  # folder/prefix of images (recursive), or image folder / parquet / digit CSV
    output: str  # folder or s3:// prefix: predictions/, errors/, attention/, runs/, report.html
    format: str | None = None  # detected when None
    attention: str = "defects"  # all | defects (not predicted `passed`) | none
    method: str = "rollout"  # rollout | grad-rollout
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    # Images per model call. Each call to the actor costs Ray ~5-10 ms besides the model:
    # 256 kept a CPU actor busy where 64 left it waiting a quarter of the time.
    batch_size: int = 256
    workers: int = 1  # inference actors, each loads the model once
    gpus_per_worker: float = 0.0
    piece_rows: int = 512  # rows per committed file; a kill loses at most the pieces in flight
    submission: str | None = None  # Kaggle ImageId,Label CSV (digit-recognizer CSV input only)
    max_error_rate: float = 1.0  # fail the run (exit 1) above this share of undecodable images
    lease_timeout: float = STALE_S  # seconds without a heartbeat after which OUT's lease is taken over
    shared_fs: bool = False  # a local --output that every Ray node mounts (else s3:// on a multi-node cluster)
    ray_address: str | None = None
    verbose: bool = False

    def check(self) -> None:
        """One-line errors for option values, before anything is read."""
        if self.attention not in ATTENTION_MODES:
            raise VitrayError(f"--attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        check_map_options(self.method, self.head_fusion, self.discard_ratio)
        if self.format is not None and self.format not in SCORE_FORMATS:
            raise VitrayError(f"--format must be one of {', '.join(SCORE_FORMATS)}, got {self.format!r}")
        for name in ("batch_size", "workers", "piece_rows"):
            if int(getattr(self, name)) < 1:
                raise VitrayError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_worker < 0:
            raise VitrayError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.lease_timeout <= 0:
            raise VitrayError(f"--lease-timeout must be positive, got {self.lease_timeout}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise VitrayError(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate}")


def check_map_options(method: str, head_fusion: str, discard_ratio: float) -> None:
    if method not in METHODS:
        raise VitrayError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if head_fusion not in HEAD_FUSIONS:
        raise VitrayError(f"--head-fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise VitrayError(f"--discard-ratio must be in [0, 1), got {discard_ratio}")


# --------------------------------------------------------------------------- layout of OUT


KEY_SEGMENT_BYTES = 64  # of each folder and of the file name's readable part
KEY_DEPTH = 8  # folders kept from the id; deeper ones are folded into the last


def attention_key(image_id: str) -> str:
    """OUT-relative key of an image's overlay: `attention/<readable id>-<hash>.png`.

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
    return "attention/" + "/".join(readable)


def _key_segment(part: str) -> str:
    if part in ("", ".", ".."):
        return "_"
    text = "".join(c if c.isprintable() else "_" for c in part.replace("#", "_row"))
    return text.encode("utf-8", "replace")[:KEY_SEGMENT_BYTES].decode("utf-8", "ignore") or "_"


def read_predictions(output: str) -> Any:
    """The committed predictions under OUT as a `pyarrow.dataset.Dataset` (empty when none)."""
    import pyarrow.dataset as pads

    loc = storage.resolve(storage.join(output, "predictions"))
    files = [f.path for f in _list(loc) if _visible(f.path) and f.path.endswith(".parquet")]
    return pads.dataset(files, schema=PREDICTIONS_SCHEMA, filesystem=loc.fs, format="parquet")


def read_errors(output: str) -> Any:
    """The errors/ rows under OUT as a `pyarrow.dataset.Dataset` (empty when none)."""
    import pyarrow.dataset as pads

    loc = storage.resolve(storage.join(output, "errors"))
    files = [f.path for f in _list(loc) if _visible(f.path) and f.path.endswith(".parquet")]
    return pads.dataset(files, schema=ERRORS_SCHEMA, filesystem=loc.fs, format="parquet")


def committed_ids(output: str) -> set[str]:
    """Ids already committed under OUT (read from the `id` column only)."""
    ids: set[str] = set()
    for batch in read_predictions(output).to_batches(columns=["id"]):
        ids.update(batch.column(0).to_pylist())
    return ids


def _visible(path: str) -> bool:
    # The same rule as pyarrow.dataset's discovery: hidden and `_` names are not data.
    return not posixpath.basename(path).startswith((".", "_"))


def _list(loc: storage.Location) -> list[pafs.FileInfo]:
    """Files directly under a folder/prefix, none when it does not exist."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise VitrayError(storage.describe_error(loc.uri, exc)) from None
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def _put(fs: pafs.FileSystem, path: str, data: bytes, durable: bool = False) -> None:
    """Write a whole object so that a reader sees all of it or nothing, even after a SIGKILL."""
    if isinstance(fs, pafs.LocalFileSystem):
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        # Hidden and in the same folder: invisible to dataset readers, and os.replace is atomic.
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    else:
        # S3 makes an object visible only when its upload completes; a piece is a few MB at
        # most, which pyarrow buffers and sends on close.
        with fs.open_output_stream(path) as f:
            f.write(data)


def _write_in_place(paths: Sequence[str], data: Sequence[bytes]) -> None:
    """Local files written in place (a pending marker covers them), each folder made once."""
    for folder in {os.path.dirname(p) for p in paths}:
        os.makedirs(folder, exist_ok=True)
    for path, blob in zip(paths, data):
        with open(path, "wb") as f:
            f.write(blob)


def _put_json(loc: storage.Location, obj: Any) -> None:
    _put(loc.fs, loc.path, (json.dumps(obj, indent=2) + "\n").encode())


def _delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


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
    if not root.is_s3:
        for folder in ("_pending", "predictions", "errors", "runs"):
            found["temp_files"] += _remove_temps(root.child(folder).path)
    return found


def _recover_piece(root: storage.Location, marker: str, piece: str) -> str:
    if root.fs.get_file_info(root.child("predictions", f"part-{piece}.parquet").path).type == pafs.FileType.File:
        _delete(root.fs, marker)
        return "pending_dropped"  # committed; only the marker's delete was lost
    with root.fs.open_input_stream(marker) as f:
        record = json.loads(f.read())
    for key in record.get("pngs", []):
        try:
            png = root.child(*key.split("/"))
            _delete(root.fs, png.path)
            if not root.is_s3:
                _remove_temps(posixpath.dirname(png.path), posixpath.basename(png.path))
        except OSError as exc:  # e.g. a name too long for this filesystem: it was never written
            log.warning("could not delete overlay %s of an unfinished piece: %s", key, exc)
    _delete(root.fs, marker)
    return "pending_undone"


def _remove_temps(folder: str, name: str = "") -> int:
    """Local temp files of `_put` (all, or those of one file name) that a kill left behind."""
    if not os.path.isdir(folder):
        return 0
    prefix = f".{name}.tmp-" if name else "."
    removed = 0
    for entry in os.listdir(folder):
        if entry.startswith(prefix) and ".tmp-" in entry:
            os.remove(os.path.join(folder, entry))
            removed += 1
    return removed


# --------------------------------------------------------------------------- Ray Data stages


def _prepare(batch: dict[str, np.ndarray], size: int, channels: int) -> dict[str, np.ndarray]:
    """Decode and resize; an image that fails keeps its row (a blank image and its error kind)."""
    from vitray.data.preprocess import resize_image
    from vitray.data.readers import decode_batch

    decoded = decode_batch(batch)
    n = len(decoded["id"])
    images = np.zeros((n, size, size, channels), dtype=np.uint8)
    kinds = np.array(["" if k is None else str(k) for k in decoded["error_kind"]], dtype=object)
    messages = np.array(["" if m is None else str(m) for m in decoded["error"]], dtype=object)
    for i, image in enumerate(decoded["image"]):
        if image is None:
            continue
        try:
            images[i] = resize_image(np.asarray(image), size, channels)
        except Exception as exc:  # one odd image must not fail the whole run
            kinds[i], messages[i] = "corrupt", f"cannot convert: {str(exc).splitlines()[0][:200]}"
    return {"id": decoded["id"], "image": images, "error_kind": kinds, "error": messages}


def _scorer_class() -> type:
    """`Predictor` that passes over the rows that failed to decode (imported lazily: torch)."""
    from vitray.inference import Predictor

    class Scorer(Predictor):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            ok = batch["error_kind"] == ""
            out = super().__call__(batch) if ok.all() else self._skip_failed(batch, ok)
            if self.options.attention == "none":
                del out["image"]  # only overlays need the pixels downstream
            return out

        def _skip_failed(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
            """The model sees only the rows that decoded; the others get NaN and pred -1."""
            n, cells = len(ok), self.grid[0] * self.grid[1]
            out = dict(batch)
            out["pred"] = np.full(n, -1, dtype=np.int64)
            out["score"] = np.full(n, np.nan, dtype=np.float32)
            out["probs"] = np.full((n, len(self.labels)), np.nan, dtype=np.float32)
            out["attention"] = np.full((n, cells), np.nan, dtype=np.float32)
            if ok.any():
                part = super().__call__({k: v[ok] for k, v in batch.items()})
                for key in ("pred", "score", "probs", "attention"):
                    out[key][ok] = part[key]
            return out

    return Scorer


@dataclass(frozen=True)
class PiecePlan:
    """What the writer stage needs to commit a piece (pickled to the Ray tasks)."""

    output: str
    run_id: str
    model: str
    labels: tuple[str, ...]
    grid: tuple[int, int]
    input_base: str  # input URI that ids are relative to

    def name(self, ids: Sequence[str]) -> str:
        # The ids, not a counter: a retried task writes the same names, never a second copy.
        digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]
        return f"{self.run_id}-{digest}"


def write_piece(batch: dict[str, np.ndarray], plan: PiecePlan) -> dict[str, np.ndarray]:
    """Ray Data UDF: commit one piece of scored rows (protocol in the module docstring) → one summary row."""
    import pyarrow.parquet as pq

    started = time.perf_counter()
    root = storage.resolve(plan.output)
    ids = [str(i) for i in batch["id"]]
    piece = plan.name(ids)
    ok = batch["error_kind"] == ""
    maps = np.asarray(batch["attention"], dtype=np.float32)
    has_map = ok & ~np.isnan(maps).any(axis=1)
    pngs = {i: attention_key(ids[i]) for i in np.flatnonzero(has_map)}
    labels = [plan.labels[p] if p >= 0 else "" for p in batch["pred"]]

    pending = root.child("_pending", f"{piece}.json")
    if pngs:
        _put(root.fs, pending.path, json.dumps({"run_id": plan.run_id, "pngs": list(pngs.values())}).encode())

        rows = np.fromiter(pngs, dtype=np.int64)
        encoded = _overlay_pngs(batch["image"][rows], maps[rows].reshape(len(rows), *plan.grid))

        paths = [root.child(*pngs[i].split("/")).path for i in rows]
        if root.is_s3:
            # Threads: on S3 each overlay is a round trip, and a piece has hundreds of them.
            with ThreadPoolExecutor(max_workers=PNG_THREADS) as pool:
                list(pool.map(lambda path, png: _put(root.fs, path, png), paths, encoded))
        else:  # local writes do not wait: threads would only contend for the GIL
            _write_in_place(paths, encoded)

    bad = np.flatnonzero(~ok)
    if len(bad):
        errors = pa.table({"path": [_input_uri(plan.input_base, ids[i]) for i in bad],
                           "error": [str(batch["error_kind"][i]) for i in bad],
                           "message": [str(batch["error"][i]) for i in bad],
                           "run_id": [plan.run_id] * len(bad)}, schema=ERRORS_SCHEMA)
        _put(root.fs, root.child("errors", f"part-{piece}.parquet").path, _parquet_bytes(errors, pq), durable=True)

    good = np.flatnonzero(ok)
    if len(good):
        rows, cols = plan.grid
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
        }, schema=PREDICTIONS_SCHEMA)
        # The commit: from here on these ids are done.
        _put(root.fs, root.child("predictions", f"part-{piece}.parquet").path, _parquet_bytes(table, pq),
             durable=True)
    if pngs:
        _delete(root.fs, pending.path)

    counts: dict[str, int] = {}
    for i in good:
        counts[labels[i]] = counts.get(labels[i], 0) + 1
    kinds: dict[str, int] = {}
    for i in bad:
        kinds[str(batch["error_kind"][i])] = kinds.get(str(batch["error_kind"][i]), 0) + 1
    return {"piece": np.array([piece], dtype=object), "scored": np.array([len(good)]),
            "errors": np.array([len(bad)]), "labels": np.array([json.dumps(counts)], dtype=object),
            "error_kinds": np.array([json.dumps(kinds)], dtype=object),
            "seconds": np.array([time.perf_counter() - started])}


def _float_lists(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """(rows, k) float32 → list<float32> rows without a Python list per row; null where not `valid`."""
    rows, k = values.shape
    offsets = pa.array(np.arange(0, (rows + 1) * k, k, dtype=np.int32))
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).ravel()), mask=mask)


def _parquet_bytes(table: pa.Table, pq: Any) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _overlay_pngs(images: np.ndarray, maps: np.ndarray, chunk: int = 64) -> list[bytes]:
    """The bulk overlays: each map on the image the model saw, at that size, without a caption.

    Label and score are in the row (and the report's captions). Drawn a chunk of images at
    a time (small enough to stay in cache), each then a PNG of its own: drawing and encoding
    one overlay at a time through PIL cost as much as the tiny model's forward pass.
    """
    from vitray.explain import overlay_maps
    from vitray.png import encode_rgb

    images = np.asarray(images, dtype=np.uint8)
    pngs = []
    for start in range(0, len(images), chunk):
        pngs += [encode_rgb(o) for o in overlay_maps(images[start:start + chunk], maps[start:start + chunk])]
    return pngs


def _input_uri(base: str, image_id: str) -> str:
    return storage.join(base, image_id)


# --------------------------------------------------------------------------- the run


@dataclass
class _Totals:
    scored: int = 0
    errors: int = 0
    pieces: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)

    def add(self, summary: dict[str, Any]) -> None:
        self.scored += int(summary["scored"])
        self.errors += int(summary["errors"])
        self.pieces += 1
        for target, text in ((self.labels, summary["labels"]), (self.error_kinds, summary["error_kinds"])):
            for key, value in json.loads(text).items():
                target[key] = target.get(key, 0) + int(value)


def new_run_id() -> str:
    """Sortable by start time (UTC), unique across machines."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _check_model(model: str) -> tuple[list[str], Any, tuple[int, int]]:
    """Labels, preprocessing and patch grid of a trained ViT classifier; one-line error otherwise."""
    from vitray.models import describe_trained

    labels, prep, patch = describe_trained(model)
    return labels, prep, (prep.size // patch, prep.size // patch)


def _check_gpus(config: ScoreConfig) -> None:
    """An embedded Ray has only this machine's GPUs: asking for absent ones would wait forever."""
    if config.gpus_per_worker <= 0 or config.ray_address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster may have (or autoscale to) GPU nodes the driver cannot see
    import torch

    if torch.cuda.device_count() < config.gpus_per_worker:
        raise VitrayError(f"--gpus-per-worker {config.gpus_per_worker}: this machine has "
                          f"{torch.cuda.device_count()} GPUs (join a GPU cluster with --ray-address)")


def _check_input(config: ScoreConfig) -> Any:
    from vitray.data.readers import detect_format, inspect_source

    fmt = config.format or detect_format(config.input)
    # An image folder is scored like any tree of images: its class folders are only part of the ids.
    fmt = "images" if fmt == "imagefolder" else fmt
    source = inspect_source(config.input, fmt)
    if config.submission and source.format != "csv":
        raise VitrayError("--submission needs digit-recognizer CSV input (pixel0..pixel783); "
                          f"{config.input} is {source.format}")
    inp, out = storage.resolve(config.input), storage.resolve(config.output)
    if type(inp.fs) is type(out.fs) and (out.path + "/").startswith(inp.path.rstrip("/") + "/"):
        raise VitrayError(f"--output {config.output} is inside --input {config.input}: "
                          "its overlays would be scored by the next run")
    storage.check_output(config.output, "--output")
    return source


def _check_cluster(config: ScoreConfig) -> None:
    """On a cluster, a local --output must be a folder every node mounts (pieces commit on any node)."""
    if storage.is_s3(config.output) or config.shared_fs or not (config.ray_address or os.environ.get("RAY_ADDRESS")):
        return  # an embedded Ray is this machine alone
    from vitray.cluster import check_shared_output
    from vitray.runtime import RayOptions, init_ray

    init_ray(RayOptions(address=config.ray_address, quiet=not config.verbose))
    check_shared_output(config.output, config.shared_fs, "--output")


def score(config: ScoreConfig, progress: Callable[[dict[str, int]], None] | None = None) -> dict:
    """Score every image of `config.input` not yet committed under `config.output`; return the manifest.

    Raises VitrayError (exit 2) for a bad model, input or option, or an output another
    run holds, before any work; VitrayError with exit code 1 when the run fails (a full
    disk, an unreachable S3, the share of undecodable images above `max_error_rate`:
    what was committed stays) and with exit code 130 when interrupted (Ctrl-C).
    """
    wall_start = time.perf_counter()
    config.check()
    labels, prep, grid = _check_model(config.model)
    source = _check_input(config)
    _check_gpus(config)
    _check_cluster(config)

    run_id = new_run_id()
    out = storage.resolve(config.output).uri
    with Lease(out, run_id, stale_s=config.lease_timeout) as lease:
        manifest: dict[str, Any] = {
            "run_id": run_id, "status": "running", "started": _now(), "finished": None,
            "model": storage.resolve(config.model).uri, "input": storage.resolve(config.input).uri, "output": out,
            "format": source.format, "labels_of_model": labels, "arguments": dataclasses.asdict(config),
        }
        if lease.took_over:
            manifest["took_over_lease_of"] = lease.took_over
        runs = storage.resolve(storage.join(out, "runs", f"{run_id}.json"))
        _put_json(runs, manifest)  # a run that never finishes stays visible as "running"
        manifest["recovered"] = recover(out, run_id)
        totals, skipped, scoring_s = _Totals(), 0, 0.0
        try:
            _record_bad_names(out, run_id, source)
            done = committed_ids(out)
            remaining = [i for i in source.ids if i not in done]
            skipped = len(source) - len(remaining)
            log.info("%s images in %s, %s already scored in %s: %s to score", f"{len(source):,}", config.input,
                     f"{skipped:,}", out, f"{len(remaining):,}")
            if remaining:
                started = time.perf_counter()
                _run(config, source, remaining, prep, PiecePlan(out, run_id, manifest["model"], tuple(labels), grid,
                                                                _ids_base(config.input)),
                     totals, lease, progress, skipped)
                scoring_s = time.perf_counter() - started
        except BaseException as exc:
            failure = _failure(exc, out, totals)
            manifest.update(status="interrupted" if failure.exit_code == 130 else "failed", finished=_now(),
                            failure=str(failure), counts={"scored": totals.scored, "errors": totals.errors})
            try:
                _put_json(runs, manifest)
            except Exception:  # noqa: BLE001 - the storage that failed may refuse this too
                pass
            raise failure from exc

    manifest.update({
        "status": "complete", "finished": _now(),
        "counts": {"scored": totals.scored, "skipped": skipped, "errors": totals.errors + len(source.bad_names),
                   "total": len(source) + len(source.bad_names)},
        "labels": totals.labels, "error_kinds": totals.error_kinds, "pieces": totals.pieces,
        "wall_s": round(time.perf_counter() - wall_start, 3), "scoring_s": round(scoring_s, 3),
        "images_per_s": round(totals.scored / scoring_s, 2) if scoring_s > 0 else None,
    })
    if source.bad_names:
        manifest["error_kinds"]["bad-name"] = len(source.bad_names)
    attempted = totals.scored + totals.errors
    rate = totals.errors / attempted if attempted else 0.0
    failure = None
    if rate > config.max_error_rate:
        failure = VitrayError(f"{totals.errors} of {attempted} images could not be read "
                              f"(error rate {rate:.1%} > --max-error-rate {config.max_error_rate}); "
                              f"see {storage.join(out, 'errors')}", exit_code=1)
    elif config.submission:
        try:
            manifest["submission"] = write_submission(out, source.ids, config.submission)
        except VitrayError as exc:
            failure = exc
    if failure:
        manifest.update(status="failed", failure=str(failure))
    _put_json(runs, manifest)

    from vitray.report import write_report

    # What was scored is committed either way: the report and the manifest show it.
    manifest["report"] = write_report(out)
    if failure:
        raise failure
    return manifest


def _ids_base(input_uri: str) -> str:
    """Ids are relative to the input folder, or (one file given) to the folder holding it."""
    root = storage.resolve(input_uri).uri
    return posixpath.dirname(root) if storage.info(root).type == pafs.FileType.File else root


def _run(config: ScoreConfig, source: Any, remaining: list[str], prep: Any, plan: PiecePlan, totals: _Totals,
         lease: Lease, progress: Callable[[dict[str, int]], None] | None, skipped: int) -> None:
    from vitray.runtime import RayOptions, init_ray

    init_ray(RayOptions(address=config.ray_address, quiet=not config.verbose))
    for batch in _pipeline(config, source, remaining, prep, plan).iter_batches(batch_size=None,
                                                                              batch_format="numpy"):
        for row in range(len(batch["piece"])):
            totals.add({k: v[row] for k, v in batch.items()})
        lease.check()  # taken over: stop taking new pieces (the pieces in flight are this run's own)
        if progress:
            progress({"scored": totals.scored, "errors": totals.errors, "total": len(remaining), "skipped": skipped})


def _record_bad_names(out: str, run_id: str, source: Any) -> None:
    """Files whose names cannot be ids (not valid UTF-8) become error rows of their own kind, each run."""
    if not source.bad_names:
        return
    import pyarrow.parquet as pq

    n = len(source.bad_names)
    table = pa.table({"path": source.bad_names, "error": ["bad-name"] * n,
                      "message": ["the file name is not valid UTF-8; rename the file to score it"] * n,
                      "run_id": [run_id] * n}, schema=ERRORS_SCHEMA)
    root = storage.resolve(out)
    _put(root.fs, root.child("errors", f"part-{run_id}-names.parquet").path, _parquet_bytes(table, pq), durable=True)
    log.warning("%d file(s) with names that are not valid UTF-8 recorded in %s", n, storage.join(out, "errors"))


def _failure(exc: BaseException, out: str, totals: _Totals) -> VitrayError:
    """What a failed or interrupted run tells the user: one line, what failed and what to do."""
    from vitray.faults import describe

    kept = f"the {totals.scored} images committed by this run are kept" if totals.scored else \
        "the images committed before are kept"
    if isinstance(exc, KeyboardInterrupt):
        return VitrayError(f"interrupted; {kept}; the same command scores the rest", exit_code=130)
    if isinstance(exc, VitrayError):
        return exc
    return VitrayError(f"{describe(exc, out)}; {kept}; rerun the same command to score the rest", exit_code=1)


def _pipeline(config: ScoreConfig, source: Any, remaining: list[str], prep: Any, plan: PiecePlan) -> Any:
    """read → decode/resize (tasks) → model (actor pool) → commit pieces (tasks) → one row per piece."""
    import ray.data

    from vitray.data.readers import read_encoded
    from vitray.inference import PredictOptions

    options = PredictOptions(attention=config.attention, method=config.method, head_fusion=config.head_fusion,
                             discard_ratio=config.discard_ratio)
    return (read_encoded(source, ids=remaining)
            # Half a CPU slot: reading waits on storage much of the time, and resources that
            # differ from the actors' keep Ray Data from fusing decode into them (an actor
            # holding a GPU would then decode one batch at a time while the GPU waits).
            .map_batches(_prepare, fn_kwargs={"size": prep.size, "channels": prep.channels},
                         batch_size=64, batch_format="numpy", num_cpus=0.5)
            .map_batches(_scorer_class(), fn_constructor_args=(config.model, options),
                         batch_size=config.batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=config.workers),
                         num_gpus=config.gpus_per_worker or None)
            .map_batches(write_piece, fn_kwargs={"plan": plan}, batch_size=config.piece_rows,
                         batch_format="numpy"))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_submission(output: str, ids: Sequence[str], uri: str) -> dict:
    """Kaggle `ImageId,Label` (ImageId 1..N in the input's row order) from the committed predictions."""
    wanted = {image_id: n for n, image_id in enumerate(ids)}
    labels: list[str | None] = [None] * len(ids)
    for batch in read_predictions(output).to_batches(columns=["id", "label"]):
        for image_id, label in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if image_id in wanted:
                labels[wanted[image_id]] = label
    missing = sum(label is None for label in labels)
    if missing:
        raise VitrayError(f"--submission: {missing} of {len(ids)} rows have no prediction under {output}",
                          exit_code=1)
    text = "ImageId,Label\n" + "".join(f"{n},{label}\n" for n, label in enumerate(labels, start=1))
    storage.write_bytes(uri, text.encode())
    return {"uri": uri, "rows": len(ids)}


# --------------------------------------------------------------------------- explain a few images


def explain_images(model: str, images: Sequence[str], out: str, method: str = "rollout",
                   head_fusion: str = "mean", discard_ratio: float = 0.0) -> list[dict]:
    """Attention maps for a few images, without Ray; returns one dict per image.

    Writes `OUT/<name>.png` (overlay on the image as the model saw it, with label and
    score), `OUT/<name>_input.png` (that image, enlarged for viewing) and `OUT/<name>.npy`
    (the map on the patch grid, max-normalised). `<name>` is the file's stem, made unique.
    """
    import torch

    from vitray.data.preprocess import normalize, resize_image
    from vitray.data.readers import ImageError, decode_image
    from vitray.explain import attention_maps, overlay, register_weights_attention
    from vitray.models import load_trained

    check_map_options(method, head_fusion, discard_ratio)
    if not images:
        raise VitrayError("explain: give at least one image")
    net, prep, labels = load_trained(model, attn_implementation=register_weights_attention())
    pixels = []
    for uri in images:  # every image is checked before anything is written
        try:
            pixels.append(resize_image(decode_image(storage.read_bytes(uri)), prep.size, prep.channels))
        except ImageError as exc:
            raise VitrayError(f"{uri}: {exc.kind}: {exc}") from None
    x = normalize(torch.from_numpy(np.stack(pixels)), prep.mean, prep.std)
    maps, logits = attention_maps(net, x, method=method, head_fusion=head_fusion, discard_ratio=discard_ratio)
    probs = torch.softmax(logits.float(), dim=-1)
    scores, preds = probs.max(dim=-1)
    results = []
    for uri, name, image, amap, pred, prob in zip(images, _unique_names(images), pixels, maps.numpy(),
                                                  preds.tolist(), scores.tolist()):
        label = labels[pred]
        shown = overlay(image, amap, label=label, score=prob)
        files = {"png": storage.join(out, f"{name}.png"), "input_png": storage.join(out, f"{name}_input.png"),
                 "npy": storage.join(out, f"{name}.npy")}
        storage.write_bytes(files["png"], _png_bytes(shown))
        storage.write_bytes(files["input_png"], _png_bytes(_enlarged(image, shown.size)))
        buf = io.BytesIO()
        np.save(buf, amap.astype(np.float32))
        storage.write_bytes(files["npy"], buf.getvalue())
        results.append({"image": uri, "label": label, "score": round(float(prob), 4), **files})
    return results


def _unique_names(uris: Sequence[str]) -> list[str]:
    names, seen = [], {}
    for uri in uris:
        stem = os.path.splitext(posixpath.basename(uri.rstrip("/")))[0] or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def _enlarged(image: np.ndarray, size: tuple[int, int]) -> Any:
    from PIL import Image

    pil = Image.fromarray(image[:, :, 0], mode="L") if image.shape[2] == 1 else Image.fromarray(image, mode="RGB")
    return pil.resize(size, Image.Resampling.NEAREST)  # crisp pixels, the same size as the overlay


def _png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
