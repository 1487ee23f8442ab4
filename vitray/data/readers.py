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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from vitray import storage
from vitray.errors import VitrayError
from vitray.data.decode import ImageError, decode_image
from vitray.data.ids import Ids
from vitray.data.sources import KAGGLE_SIDE, NO_BOX, Source, parse_response

log = logging.getLogger(__name__)
READ_BLOCK = 64  # image files or table parts per block of a Ray Dataset


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


def read_file(reader: storage.FileReader, path: str) -> tuple[bytes | None, str | None]:
    """One listed image file's bytes, or None and what kept it from being read, in words."""
    try:
        return reader.read(path), None
    except OSError as exc:
        return None, unreadable(path, exc)  # recorded as an unreadable image by the decoder


def _read_files(batch: dict[str, np.ndarray], reader: storage.FileReader) -> dict[str, Any]:
    """Ray Data UDF: image files (id, path, label) in, their bytes out (not yet decoded)."""
    out = _empty_batch()
    for id_, path, label in zip(batch["id"], batch["path"], batch["label"]):
        data, unread = read_file(reader, path)
        out["id"].append(id_)
        out["path"].append(path)
        out["label"].append(int(label))
        out["bbox"].append(list(NO_BOX))
        out["data"].append(data)
        out["image"].append(None)
        out["read_error"].append(unread)
    return _as_columns(out)


def _read_part(task: dict[str, Any], fs: pafs.FileSystem, keep: np.ndarray | None,
               row_labels: np.ndarray) -> dict[str, list]:
    """Encoded bytes (or, for CSV, pixels) of the rows of one table part that `keep` marks (all when None).

    `keep` and `row_labels` are per row of the source, the part's rows from its `row_offset` on.
    """
    out = _empty_batch()

    def add(i: int, id_: str, path: str, bbox: tuple, data: bytes | None, image: np.ndarray | None) -> None:
        out["read_error"].append(None)
        out["id"].append(id_)
        out["path"].append(path)
        # Labels come from the driver's one pass over the label columns, so that a
        # class list fixed up front (a model's) maps every row the same way.
        out["label"].append(int(row_labels[task["row_offset"] + i]))
        out["bbox"].append(list(bbox))
        out["data"].append(data)
        out["image"].append(image)

    def kept(i: int) -> bool:
        return keep is None or bool(keep[task["row_offset"] + i])

    if task["kind"] == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(fs.open_input_file(task["path"]))
        cols = ["image"] + ([task["label_col"]] if task["label_col"] else [])
        table = pf.read_row_group(task["row_group"], columns=cols)
        images = table.column("image").to_pylist()
        labels_col = table.column(task["label_col"]).to_pylist() if task["label_col"] else [None] * len(images)
        for i, (img, lab) in enumerate(zip(images, labels_col)):
            if not kept(i):
                continue
            id_ = f"{task['rel']}#{task['first_row'] + i}"
            box = parse_response(lab, id_)[1] if task["label_col"] == "response" else NO_BOX
            data = img.get("bytes") if isinstance(img, dict) else img
            add(i, id_, f"{task['path']}#{task['first_row'] + i}", box, data or b"", None)
    elif task["kind"] == "csv":
        from pyarrow import csv as pacsv

        with fs.open_input_stream(task["path"]) as f:
            table = pacsv.read_csv(f)
        cols = [f"pixel{i}" for i in range(KAGGLE_SIDE * KAGGLE_SIDE)]
        pixels = np.stack([table.column(c).to_numpy() for c in cols], axis=1)
        pixels = np.clip(pixels, 0, 255).astype(np.uint8).reshape(-1, KAGGLE_SIDE, KAGGLE_SIDE, 1)
        for i in range(table.num_rows):
            if kept(i):
                add(i, f"{task['rel']}#{i}", f"{task['path']}#{i}", NO_BOX, None, pixels[i])
    return out


def first_image(source: Source, tries: int = 64) -> np.ndarray:
    """The first decodable image among the first `tries`, read on the driver (to size a model)."""
    if source.paths is not None:
        reader = storage.file_reader(source.uri)
        parts = ({"data": [read_file(reader, path)[0]], "image": [None]} for path in source.paths[:tries].to_pylist())
    else:
        fs = storage.resolve(source.uri).fs
        keep = np.zeros(len(source.ids), dtype=bool)
        keep[:tries] = True
        parts = (_read_part(task, fs, keep, source.row_labels) for task in source.tasks[:tries])
    for part in parts:
        for data, image in zip(part["data"], part["image"]):
            if image is not None:
                return image
            try:
                return decode_image(data)
            except ImageError:
                continue  # recorded when the data set is read; the next one will do
    raise VitrayError(f"{source.uri}: none of the first {tries} images could be decoded")


def _read_parts(batch: dict[str, np.ndarray], fs: pafs.FileSystem, keep: np.ndarray | None,
                row_labels: np.ndarray) -> dict[str, Any]:
    """Ray Data UDF: table parts (JSON) in, image rows (not yet decoded) out."""
    out = _empty_batch()
    for raw in batch["task"]:
        part = _read_part(json.loads(raw), fs, keep, row_labels)
        for key in out:
            out[key].extend(part[key])
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

    if source.paths is not None:
        files = _file_rows(source, ids)
        # A block per READ_BLOCK files, not one per free CPU: each Ray Data task process costs
        # more to start (~1.5 s of CPU) than a small input takes to read, and a large input
        # still gets blocks enough to spread over a cluster. The rows go to Ray as Arrow
        # blocks: no Python object per image on the driver.
        rows = -(-files.num_rows // parallelism) if parallelism else READ_BLOCK
        ds = _from_arrow_blocks([files.slice(at, rows) for at in range(0, files.num_rows, rows)])
        return ds.map_batches(_read_files, fn_args=(storage.file_reader(source.uri),), batch_size=FILES_PER_BATCH,
                              batch_format="numpy")
    items, args = _part_items(source, ids)
    blocks = parallelism or max(1, -(-len(items) // READ_BLOCK))
    ds = ray.data.from_items(items, override_num_blocks=min(blocks, max(1, len(items))))
    return ds.map_batches(_read_parts, fn_args=args, batch_size=1, batch_format="numpy")


def iter_encoded(source: Source, ids: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """What `read_encoded` reads, in this process: batches of the same columns, in the same order."""
    if source.paths is not None:
        files = _file_rows(source, ids)
        reader = storage.file_reader(source.uri)
        for start in range(0, files.num_rows, FILES_PER_BATCH):
            part = files.slice(start, FILES_PER_BATCH)
            yield _read_files({name: np.array(part.column(name).to_pylist(), dtype=object if name != "label"
                                              else np.int64) for name in part.column_names}, reader)
        return
    items, args = _part_items(source, ids)
    for item in items:
        yield _read_parts({"task": np.array([item["task"]], dtype=object)}, *args)


FILES_PER_BATCH = 64  # image files are small units of work: a task reads many


def _from_arrow_blocks(blocks: list[pa.Table]) -> Any:
    """A Ray Dataset of exactly these Arrow blocks.

    `ray.data.from_blocks` (a developer API) takes each block's metadata on the driver;
    `ray.data.from_arrow` starts a Ray task per block for it, 5x the time for the 3,125
    blocks of 200,000 files (docs/scale.md), and is what a Ray without `from_blocks` gets.
    """
    import ray.data

    from_blocks = getattr(ray.data, "from_blocks", None)
    if from_blocks is not None:
        return from_blocks(blocks)
    return ray.data.from_arrow(blocks) if blocks else ray.data.from_items([])


def _file_rows(source: Source, ids: Iterable[str] | None) -> pa.Table:
    """The image files of `ids` (all when None; each once, in the order of `ids`): id, path, label."""
    rows = pa.table({"id": source.ids.array, "path": source.paths, "label": pa.array(source.row_labels, pa.int64())})
    if ids is None:
        return rows
    wanted = pc.unique(Ids(ids).array)  # in order of first appearance
    return rows.take(pc.index_in(wanted, value_set=rows.column("id")).drop_null())


def _part_items(source: Source, ids: Iterable[str] | None) -> tuple[list[dict[str, str]], tuple]:
    """The table parts to read (JSON, for `from_items`) and `_read_parts`' other arguments."""
    keep = None if ids is None else pc.is_in(source.ids.array, value_set=Ids(ids).array).to_numpy(zero_copy_only=False)
    fs = storage.resolve(source.uri).fs
    return [{"task": json.dumps(t)} for t in source.tasks], (fs, keep, source.row_labels)


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
