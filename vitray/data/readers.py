"""Streaming a `Source`'s images as Ray Datasets: read tasks, then decode, in Ray Data.

`read_encoded` streams the raw bytes (columns `id`, `path`, `label`, `bbox`, `data`);
`read_images` decodes them too (`image`, uint8 HxWxC), dropping what cannot be decoded;
`decode_batch` keeps such rows with their error kind (scoring records them).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow.fs as pafs

from vitray import storage
from vitray.errors import VitrayError
from vitray.data.decode import ImageError, decode_image
from vitray.data.sources import KAGGLE_SIDE, NO_BOX, Source, parse_response

log = logging.getLogger(__name__)
READ_BLOCK = 64  # read tasks (image files, table parts) per block of a Ray Dataset


def _empty_batch() -> dict[str, list]:
    # Encoded files fill `data`; CSV rows arrive as pixels in `image`. Only the
    # filled one becomes a column (an all-null column would turn into NaNs).
    return {"id": [], "path": [], "label": [], "bbox": [], "data": [], "image": [], "read_error": []}


def unreadable(path: str, exc: OSError) -> str:
    """What kept a listed file from being read, in words."""
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return "cannot read the file: a broken link (its target does not exist)"
        return "the file is gone (deleted or moved after the input was listed)"
    if isinstance(exc, PermissionError):
        return "cannot read the file: no permission"
    if isinstance(exc, IsADirectoryError):
        return "cannot read the file: it is a folder"
    return f"cannot read the file: {exc.strerror or str(exc).splitlines()[0][:200] or type(exc).__name__}"


def _read_task(task: dict[str, Any], fs: pafs.FileSystem, keep: frozenset[str] | None) -> dict[str, list]:
    """Encoded bytes (or, for CSV, pixels) of the images one task covers."""
    out = _empty_batch()

    def add(id_: str, path: str, label: int, bbox: tuple, data: bytes | None, image: np.ndarray | None,
            unread: str | None = None) -> None:
        out["read_error"].append(unread)
        out["id"].append(id_)
        out["path"].append(path)
        out["label"].append(label)
        out["bbox"].append(list(bbox))
        out["data"].append(data)
        out["image"].append(image)

    kind = task["kind"]
    if kind == "file":
        if keep is not None and task["id"] not in keep:
            return out
        try:
            with fs.open_input_stream(task["path"]) as f:
                data = f.read()
            unread = None
        except OSError as exc:
            data, unread = None, unreadable(task["path"], exc)  # recorded as an unreadable image by the decoder
        add(task["id"], task["path"], task["label"], NO_BOX, data, None, unread)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(fs.open_input_file(task["path"]))
        cols = ["image"] + ([task["label_col"]] if task["label_col"] else [])
        table = pf.read_row_group(task["row_group"], columns=cols)
        images = table.column("image").to_pylist()
        labels_col = table.column(task["label_col"]).to_pylist() if task["label_col"] else [None] * len(images)
        for i, (img, lab) in enumerate(zip(images, labels_col)):
            id_ = f"{task['rel']}#{task['first_row'] + i}"
            if keep is not None and id_ not in keep:
                continue
            box = parse_response(lab, id_)[1] if task["label_col"] == "response" else NO_BOX
            data = img.get("bytes") if isinstance(img, dict) else img
            add(id_, f"{task['path']}#{task['first_row'] + i}", -1, box, data or b"", None)
    elif kind == "csv":
        from pyarrow import csv as pacsv

        with fs.open_input_stream(task["path"]) as f:
            table = pacsv.read_csv(f)
        cols = [f"pixel{i}" for i in range(KAGGLE_SIDE * KAGGLE_SIDE)]
        pixels = np.stack([table.column(c).to_numpy() for c in cols], axis=1)
        pixels = np.clip(pixels, 0, 255).astype(np.uint8).reshape(-1, KAGGLE_SIDE, KAGGLE_SIDE, 1)
        for i in range(table.num_rows):
            id_ = f"{task['rel']}#{i}"
            if keep is not None and id_ not in keep:
                continue
            add(id_, f"{task['path']}#{i}", -1, NO_BOX, None, pixels[i])
    return out


def first_image(source: Source, tries: int = 64) -> np.ndarray:
    """The first decodable image among the first `tries`, read on the driver (to size a model)."""
    fs = storage.resolve(source.uri).fs
    keep = frozenset(source.ids[:tries])
    for task in source.tasks[:tries]:
        part = _read_task(task, fs, keep if task["kind"] != "file" else None)
        for data, image in zip(part["data"], part["image"]):
            if image is not None:
                return image
            try:
                return decode_image(data)
            except ImageError:
                continue  # recorded when the data set is read; the next one will do
    raise VitrayError(f"{source.uri}: none of the first {tries} images could be decoded")


def _read_tasks(batch: dict[str, np.ndarray], fs: pafs.FileSystem, keep: frozenset[str] | None,
                label_of: dict[str, int]) -> dict[str, Any]:
    """Ray Data UDF: task rows in, image rows (not yet decoded) out."""
    out = _empty_batch()
    for raw in batch["task"]:
        part = _read_task(json.loads(raw), fs, keep)
        for key in out:
            out[key].extend(part[key])
    # Labels come from the driver's one pass over the label columns, so that a
    # class list fixed up front (a model's) maps every row the same way.
    out["label"] = [label_of.get(i, -1) for i in out["id"]]
    return _as_columns(out)


def _objects(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def _as_columns(out: dict[str, list]) -> dict[str, Any]:
    n = len(out["id"])
    columns = {
        "id": np.array(out["id"], dtype=object),
        "path": np.array(out["path"], dtype=object),
        "label": np.array(out["label"], dtype=np.int64),
        "bbox": np.array(out["bbox"], dtype=np.float32).reshape(n, 4),
    }
    if any(v is not None for v in out["image"]):
        columns["image"] = _objects(out["image"])
    else:
        columns["data"] = _objects(out["data"])
        if any(v is not None for v in out["read_error"]):
            columns["read_error"] = _objects(out["read_error"])
    return columns


def read_encoded(source: Source, ids: Iterable[str] | None = None, parallelism: int | None = None) -> Any:
    """A Ray Dataset of the source's images, still encoded: id, path, label, bbox, data|image.

    `ids` restricts it to those images (a split, or what is left to score),
    filtered before any image bytes are read; image files are read in the order of `ids`.
    """
    import ray.data

    items, args, batch = _encoded_tasks(source, ids)
    # A block per READ_BLOCK tasks, not one per free CPU: each Ray Data task process costs
    # more to start (~1.5 s of CPU) than a small input takes to read, and a large input
    # still gets blocks enough to spread over a cluster.
    blocks = parallelism or max(1, -(-len(items) // READ_BLOCK))
    ds = ray.data.from_items(items, override_num_blocks=min(blocks, max(1, len(items))))
    return ds.map_batches(_read_tasks, fn_args=args, batch_size=batch, batch_format="numpy")


def iter_encoded(source: Source, ids: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """What `read_encoded` reads, in this process: batches of the same columns, in the same order."""
    items, args, batch = _encoded_tasks(source, ids)
    for start in range(0, len(items), batch):
        yield _read_tasks({"task": np.array([i["task"] for i in items[start:start + batch]], dtype=object)}, *args)


def _encoded_tasks(source: Source, ids: Iterable[str] | None) -> tuple[list[dict[str, str]], tuple, int]:
    """The read tasks of `ids` (all when None), `_read_tasks`' other arguments, and tasks per batch."""
    ids = list(ids) if ids is not None else None
    keep = frozenset(ids) if ids is not None else None
    tasks = source.tasks
    if ids is not None and all(t["kind"] == "file" for t in tasks):
        by_id = {t["id"]: t for t in tasks}
        tasks = [by_id[i] for i in dict.fromkeys(ids) if i in by_id]  # in the order of `ids`
        keep = None
    label_of = {i: int(l) for i, l in zip(source.ids, source.row_labels) if l >= 0}
    fs = storage.resolve(source.uri).fs
    # Files are small units of work: group them so a task reads many.
    batch = 64 if tasks and tasks[0]["kind"] == "file" else 1
    return [{"task": json.dumps(t)} for t in tasks], (fs, keep, label_of), batch


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decode the `data` column into `image`; images that fail get `error_kind`/`error`."""
    n = len(batch["id"])
    kinds = np.full(n, None, dtype=object)
    messages = np.full(n, None, dtype=object)
    if "image" in batch:  # already pixels (CSV)
        images = _objects(list(batch["image"]))
    else:
        images = np.full(n, None, dtype=object)
        reasons = batch.get("read_error")
        for i, data in enumerate(batch["data"]):
            if not isinstance(data, (bytes, bytearray, memoryview)):  # None (Arrow may hand it over as NaN)
                reason = reasons[i] if reasons is not None else None
                kinds[i] = "unreadable"
                messages[i] = reason if isinstance(reason, str) else "cannot read the file"
                continue
            try:
                images[i] = decode_image(data)
            except ImageError as exc:
                kinds[i], messages[i] = exc.kind, str(exc)
    out = {k: v for k, v in batch.items() if k not in ("data", "image", "read_error")}
    out.update(image=images, error_kind=kinds, error=messages)
    return out


def read_images(source: Source, ids: Iterable[str] | None = None) -> Any:
    """Decoded images as a Ray Dataset; undecodable ones are logged and skipped."""
    return read_encoded(source, ids).map_batches(_decode_and_drop, batch_format="numpy")


def iter_images(source: Source, ids: Iterable[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """What `read_images` reads, in this process: batches of decoded images, undecodable ones logged and skipped."""
    for batch in iter_encoded(source, ids):
        yield _decode_and_drop(batch)


def _decode_and_drop(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = decode_batch(batch)
    bad = np.array([k is not None for k in out["error_kind"]], dtype=bool)
    for i in np.flatnonzero(bad):
        log.warning("skipping %s: %s (%s)", out["path"][i], out["error"][i], out["error_kind"][i])
    keep = ~bad
    return {k: v[keep] for k, v in out.items() if k not in ("error_kind", "error")}
