"""What a data URI holds: image folders, Hugging Face-layout Parquet, Kaggle digit CSV, plain image trees.

`inspect_source` looks at a URI on the driver (listing, metadata, label columns only:
never the image bytes) and fails early with one line when something is wrong; the
`Source` it returns is what `vitray.data.readers` streams. Its ids and paths are Arrow
arrays: a night's input of millions of files is no Python object per image on the driver.
"""
from __future__ import annotations

import ast
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from vitray import storage
from vitray.data.ids import Ids
from vitray.errors import VitrayError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FORMATS = ("imagefolder", "parquet", "csv", "images")
NO_BOX = (np.nan, np.nan, np.nan, np.nan)
KAGGLE_SIDE = 28


@dataclass
class Source:
    """What a data URI holds, found on the driver before any Ray work starts.

    `ids` and `row_labels` list every image in a stable order, so that splits and
    resumption can be decided up front. Image files (formats imagefolder, images) are
    read by `paths`, one per id; tables by `tasks`, the units the Ray read tasks take:
    one per Parquet row group / CSV file, each at `row_offset` in `ids`.
    """

    uri: str
    format: str
    labels: list[str]
    ids: Ids
    row_labels: np.ndarray  # label id per image, -1 when unlabelled
    tasks: list[dict[str, Any]] = field(repr=False)  # table parts; none for image files
    has_boxes: bool = False
    bad_names: list[str] = field(default_factory=list)  # files whose names cannot be ids (storage.walk)
    paths: pa.Array | None = field(default=None, repr=False)  # image files: the file of each id

    @property
    def labelled(self) -> bool:
        return bool(self.labels) and bool((self.row_labels >= 0).all())

    def __len__(self) -> int:
        return len(self.ids)


def detect_format(uri: str) -> str:
    """Name the format of a data URI from what is there."""
    found = storage.require(uri, "data")
    name = uri.rstrip("/").lower()
    if found.type == pafs.FileType.File:
        if name.endswith(".csv"):
            return "csv"
        if name.endswith(".parquet"):
            return "parquet"
        if name.endswith(IMAGE_SUFFIXES):
            return "images"
        raise VitrayError(f"{uri}: not a data set (expected a folder, a .parquet or a .csv file)")
    paths = storage.list_paths(uri).paths
    lowered = pc.ascii_lower(paths)
    if _any(_extension_in(lowered, (".parquet",))):
        return "parquet"
    if _any(_extension_in(lowered, (".csv",))) and not _any(_extension_in(lowered, IMAGE_SUFFIXES)):
        return "csv"
    images = _where(paths, _ends_with(lowered, IMAGE_SUFFIXES))
    del lowered
    if not len(images):
        raise VitrayError(f"{uri}: no images, .parquet or .csv files found")
    depths = pc.count_substring(storage.relative_paths(storage.resolve(uri), images), "/")
    return "imagefolder" if pc.all(pc.equal(depths, 1)).as_py() else "images"


# Paths are matched lowered by `pc.ascii_lower`: the suffixes are ASCII and no other letter
# lowers to one of theirs, so it matches Python's `str.lower()` here, without a string per file.
def _ends_with(lowered: pa.Array, suffixes: Sequence[str]) -> pa.Array:
    """Whether each (lowered) path ends with one of the suffixes (`str.lower().endswith`)."""
    found = pa.array(np.zeros(len(lowered), dtype=bool))
    for suffix in suffixes:
        found = pc.or_(found, pc.ends_with(lowered, suffix))
    return found


def _extension_in(lowered: pa.Array, extensions: Sequence[str]) -> pa.Array:
    """Whether each (lowered) path's extension is one of these (`posixpath.splitext`: the last
    dot of the file name, not a leading one)."""
    names = "|".join(re.escape(e.lstrip(".")) for e in extensions)
    return pc.match_substring_regex(lowered, rf"(^|/)[^/]*[^/.][^/]*\.({names})$")


def _any(mask: pa.Array) -> bool:
    return bool(pc.any(mask).as_py())


def _where(values: pa.Array, mask: pa.Array) -> pa.Array:
    """`values.filter(mask)`, without the copy when every value is kept (the usual input)."""
    return values if pc.all(mask).as_py() is not False else values.filter(mask)


def inspect_source(uri: str, fmt: str | None = None, labels: list[str] | None = None) -> Source:
    """Look at a data URI and return its Source; one-line VitrayError when it is unusable.

    `labels` fixes the class list (e.g. a trained model's); otherwise it is
    derived from the data: sorted class names.
    """
    fmt = fmt or detect_format(uri)
    if fmt not in FORMATS:
        raise VitrayError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    reader = {"imagefolder": _inspect_imagefolder, "images": _inspect_images,
              "parquet": _inspect_parquet, "csv": _inspect_csv}[fmt]
    source = reader(uri, labels)
    if not source.ids and not source.bad_names:
        raise VitrayError(f"{uri}: no images found ({fmt})")
    return source


def _class_index(names: Iterable[str], labels: list[str] | None, uri: str) -> list[str]:
    found = sorted(set(names))
    if labels is None:
        return found
    unknown = [n for n in found if n not in labels]
    if unknown:
        raise VitrayError(f"{uri}: classes {unknown} are not among the model's labels {labels}")
    return list(labels)


def _inspect_imagefolder(uri: str, labels: list[str] | None) -> Source:
    root = storage.resolve(uri)
    rel = storage.relative_paths(root, storage.list_paths(uri).paths)
    images = _where(rel, pc.and_(_ends_with(pc.ascii_lower(rel), IMAGE_SUFFIXES),
                                 pc.equal(pc.count_substring(rel, "/"), 1)))
    if not len(images):
        raise VitrayError(f"{uri}: an image folder needs ROOT/<class>/<image> files; none found")
    names = pc.list_element(pc.split_pattern(images, "/", max_splits=1), 0)
    classes = _class_index(pc.unique(names).to_pylist(), labels, uri)
    row_labels = pc.index_in(names, value_set=pa.array(classes, pa.string())).to_numpy().astype(np.int64)
    prefix = root.path if root.path.endswith("/") else root.path + "/"  # posixpath.join(root, id)
    paths = pc.binary_join_element_wise(prefix, images, "")
    return Source(uri, "imagefolder", classes, Ids(images), row_labels, [], paths=paths)


def _inspect_images(uri: str, labels: list[str] | None) -> Source:
    found = storage.require(uri, "input")
    root = storage.resolve(uri)
    if found.type == pafs.FileType.File:
        ids = pa.array([posixpath.basename(root.path)], pa.string())
        paths = pa.array([root.path], pa.string())
        bad: list[str] = []
    else:
        listing = storage.walk_paths(uri)
        paths = _where(listing.paths, _ends_with(pc.ascii_lower(listing.paths), IMAGE_SUFFIXES))
        ids = storage.relative_paths(root, paths)
        bad = [n for n in listing.bad_names if n.lower().endswith(IMAGE_SUFFIXES)]
    if not len(ids) and not bad:
        raise VitrayError(f"{uri}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return Source(uri, "images", list(labels or []), Ids(ids), np.full(len(ids), -1, np.int64), [],
                  bad_names=bad, paths=paths)


def _parquet_files(uri: str) -> tuple[storage.Location, list[str]]:
    root = storage.resolve(uri)
    if storage.info(uri).type == pafs.FileType.File:
        return root, [root.path]
    files = [f.path for f in storage.list_files(uri) if f.path.endswith(".parquet")]
    if not files:
        raise VitrayError(f"{uri}: no .parquet files found")
    return root, files


def parse_response(text: str, where: str) -> tuple[str, tuple[float, float, float, float]]:
    """Label and first box of a FRAMEimages `response` dict string."""
    try:
        value = ast.literal_eval(text)
        label = str(value["labels"][0])
        boxes = value.get("bboxes") or []
        box = tuple(float(v) for v in boxes[0]) if boxes else NO_BOX
        if len(box) != 4:
            raise ValueError("a box needs 4 numbers")
    except (ValueError, SyntaxError, KeyError, IndexError, TypeError) as exc:
        snippet = str(text)[:60]
        raise VitrayError(f"{where}: cannot parse response {snippet!r} ({exc})") from None
    return label, box  # type: ignore[return-value]


def _hf_class_names(schema: pa.Schema) -> list[str] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        features = json.loads(meta)["info"]["features"]
        label = features.get("label", {})
        return list(label["names"]) if label.get("_type") == "ClassLabel" else None
    except (KeyError, ValueError, TypeError):
        return None


def _inspect_parquet(uri: str, labels: list[str] | None) -> Source:
    import pyarrow.parquet as pq

    root, files = _parquet_files(uri)
    ids: list[pa.Array] = []
    names: list[pa.Array] = []
    tasks: list[dict[str, Any]] = []
    rows = 0
    has_boxes = False
    for path in files:
        rel = posixpath.basename(path) if path == root.path else storage.relative(root, path)
        where = f"{storage.join(uri, rel) if path != root.path else uri}"
        try:
            pf = pq.ParquetFile(root.fs.open_input_file(path))
        except (OSError, pa.ArrowInvalid) as exc:
            raise VitrayError(f"{where}: not a readable Parquet file ({storage.describe_error(where, exc)})") from None
        schema = pf.schema_arrow
        if "image" not in schema.names:
            raise VitrayError(f"{where}: no 'image' column (columns: {', '.join(schema.names)})")
        label_col = "response" if "response" in schema.names else ("label" if "label" in schema.names else None)
        if label_col:
            column = pf.read(columns=[label_col]).column(0).to_pylist()
        else:
            column = [None] * pf.metadata.num_rows
        if label_col == "response":
            has_boxes = True
            file_names = [parse_response(v, f"{where} row {i}")[0] for i, v in enumerate(column)]
        elif label_col == "label":
            hf_names = _hf_class_names(schema)
            if hf_names is not None or pa.types.is_integer(schema.field("label").type):
                file_names = [None if v is None else (hf_names[v] if hf_names else str(v)) for v in column]
            else:
                file_names = [None if v is None else str(v) for v in column]
        else:
            file_names = [None] * len(column)
        start = rows
        rows += len(column)
        ids.append(_row_ids(rel, len(column)))
        names.append(pa.array(file_names, pa.string()))
        first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            tasks.append({"kind": "parquet", "path": path, "rel": rel, "row_group": g,
                          "first_row": first, "label_col": label_col, "row_offset": start + first})
            first += n
    classes, row_labels = _labels_of(names, labels, uri)
    return Source(uri, "parquet", classes, _joined(ids), row_labels, tasks, has_boxes)


def _row_ids(rel: str, rows: int) -> pa.Array:
    """The ids of a table's rows: `<file>#<row>`."""
    return pc.binary_join_element_wise(rel + "#", pa.array(np.arange(rows)).cast(pa.string()), "")


def _joined(parts: list[pa.Array]) -> Ids:
    return Ids(pa.chunked_array(parts, pa.string()))


def _labels_of(names: list[pa.Array], labels: list[str] | None, uri: str) -> tuple[list[str], np.ndarray]:
    """The class list (the given one, or the names found, sorted) and each row's label id (-1: none)."""
    column = pa.chunked_array(names, pa.string()).combine_chunks()
    found = pc.unique(column.drop_null()).to_pylist()
    classes = _class_index(found, labels, uri) if found else list(labels or [])
    index = pc.index_in(column, value_set=pa.array(classes, pa.string()))
    return classes, pc.fill_null(index, -1).to_numpy().astype(np.int64)


def _inspect_csv(uri: str, labels: list[str] | None) -> Source:
    from pyarrow import csv as pacsv

    root = storage.resolve(uri)
    if storage.info(uri).type == pafs.FileType.File:
        files = [root.path]
    else:
        files = [f.path for f in storage.list_files(uri) if f.path.endswith(".csv")]
    ids: list[pa.Array] = []
    names: list[pa.Array] = []
    tasks: list[dict[str, Any]] = []
    rows = 0
    pixels = [f"pixel{i}" for i in range(KAGGLE_SIDE * KAGGLE_SIDE)]
    for path in files:
        rel = posixpath.basename(path) if path == root.path else storage.relative(root, path)
        where = storage.join(uri, rel) if path != root.path else uri
        try:
            with root.fs.open_input_stream(path) as f:
                table = pacsv.read_csv(f)
        except (OSError, pa.ArrowInvalid) as exc:
            raise VitrayError(f"{where}: not a readable CSV ({str(exc).splitlines()[0]})") from None
        missing = [c for c in pixels if c not in table.column_names]
        if missing:
            raise VitrayError(
                f"{where}: not the digit-recognizer layout: expected columns [label,] pixel0..pixel783, "
                f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        _check_pixels(table, pixels, where)
        start = rows
        rows += table.num_rows
        ids.append(_row_ids(rel, table.num_rows))
        if "label" in table.column_names:
            names.append(pa.array([str(v) for v in table.column("label").to_pylist()], pa.string()))
        else:
            names.append(pa.nulls(table.num_rows, pa.string()))
        tasks.append({"kind": "csv", "path": path, "rel": rel, "row_offset": start, "rows": table.num_rows})
    # Digits sort as strings, which is also their numeric order ("0".."9").
    classes, row_labels = _labels_of(names, labels, uri)
    return Source(uri, "csv", classes, _joined(ids), row_labels, tasks)


def _check_pixels(table: pa.Table, columns: list[str], where: str) -> None:
    """Every pixel a whole number 0-255; else one line naming the first bad cell (line as in an editor)."""
    import pyarrow.compute as pc

    for name in columns:
        column = table.column(name)
        numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
        if numeric and not column.null_count:
            low, high = pc.min_max(column).values()
            whole = pa.types.is_integer(column.type) or pc.all(pc.equal(pc.floor(column), column)).as_py()
            if low.as_py() >= 0 and high.as_py() <= 255 and whole:
                continue
        for row, value in enumerate(column.to_pylist()):
            if not _pixel_value(value):
                shown = "an empty cell" if value is None or value == "" else repr(value)
                raise VitrayError(f"{where}: line {row + 2}, column {name}: {shown} is not a pixel value "
                                  "(a whole number from 0 to 255)")


def _pixel_value(value: Any) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return 0 <= number <= 255 and number == int(number)


# --------------------------------------------------------------------------- decoding
