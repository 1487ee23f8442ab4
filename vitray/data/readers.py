"""Readers: image folders, Hugging Face-layout Parquet, Kaggle digit CSV, plain image trees.

`inspect_source` looks at a URI on the driver (listing, metadata, label columns
only: never the image bytes) and fails early with one line when something is
wrong. `read_images` then streams the images as a Ray Dataset with columns
`id`, `path`, `label`, `bbox` and `image` (uint8 HxWxC).
"""
from __future__ import annotations

import ast
import io
import json
import logging
import posixpath
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from vitray import storage
from vitray.errors import VitrayError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FORMATS = ("imagefolder", "parquet", "csv", "images")
# Images above this many pixels are refused as decompression bombs (PIL's own
# default warns at 89M and errors at twice that; a warning would let one through).
MAX_IMAGE_PIXELS = 64_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NO_BOX = (np.nan, np.nan, np.nan, np.nan)
KAGGLE_SIDE = 28


@dataclass
class Source:
    """What a data URI holds, found on the driver before any Ray work starts.

    `rows` are the units the Ray read tasks take: one per image file, or one
    per Parquet row group / CSV file. `ids` and `row_labels` list every image
    in a stable order, so that splits and resumption can be decided up front.
    """

    uri: str
    format: str
    labels: list[str]
    ids: list[str]
    row_labels: np.ndarray  # label id per image, -1 when unlabelled
    tasks: list[dict[str, Any]] = field(repr=False)
    has_boxes: bool = False
    bad_names: list[str] = field(default_factory=list)  # files whose names cannot be ids (storage.walk)

    @property
    def labelled(self) -> bool:
        return bool(self.labels) and bool((self.row_labels >= 0).all())

    def __len__(self) -> int:
        return len(self.ids)


class ImageError(Exception):
    """An image that cannot be used: `kind` is short (empty, corrupt, too-large, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------- detection


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
    files = storage.list_files(uri)
    suffixes = {posixpath.splitext(f.path)[1].lower() for f in files}
    if ".parquet" in suffixes:
        return "parquet"
    if ".csv" in suffixes and not suffixes & set(IMAGE_SUFFIXES):
        return "csv"
    root = storage.resolve(uri)
    images = [f for f in files if f.path.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise VitrayError(f"{uri}: no images, .parquet or .csv files found")
    depths = {storage.relative(root, f.path).count("/") for f in images}
    return "imagefolder" if depths == {1} else "images"


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
    rel = [storage.relative(root, f.path) for f in storage.list_files(uri)]
    images = [r for r in rel if r.lower().endswith(IMAGE_SUFFIXES) and r.count("/") == 1]
    if not images:
        raise VitrayError(f"{uri}: an image folder needs ROOT/<class>/<image> files; none found")
    classes = _class_index((r.split("/")[0] for r in images), labels, uri)
    index = {c: i for i, c in enumerate(classes)}
    row_labels = np.array([index[r.split("/")[0]] for r in images], dtype=np.int64)
    tasks = [{"kind": "file", "path": posixpath.join(root.path, r), "id": r, "label": int(l)}
             for r, l in zip(images, row_labels)]
    return Source(uri, "imagefolder", classes, images, row_labels, tasks)


def _inspect_images(uri: str, labels: list[str] | None) -> Source:
    found = storage.require(uri, "input")
    root = storage.resolve(uri)
    if found.type == pafs.FileType.File:
        ids = [posixpath.basename(root.path)]
        paths = [root.path]
        bad: list[str] = []
    else:
        listing = storage.walk(uri)
        paths = [f.path for f in listing.files if f.path.lower().endswith(IMAGE_SUFFIXES)]
        ids = [storage.relative(root, p) for p in paths]
        bad = [n for n in listing.bad_names if n.lower().endswith(IMAGE_SUFFIXES)]
    if not ids and not bad:
        raise VitrayError(f"{uri}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    tasks = [{"kind": "file", "path": p, "id": i, "label": -1} for p, i in zip(paths, ids)]
    return Source(uri, "images", list(labels or []), ids, np.full(len(ids), -1, np.int64), tasks,
                  bad_names=bad)


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
    ids: list[str] = []
    names: list[str | None] = []
    tasks: list[dict[str, Any]] = []
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
        start = len(ids)
        ids.extend(f"{rel}#{i}" for i in range(len(column)))
        names.extend(file_names)
        first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            tasks.append({"kind": "parquet", "path": path, "rel": rel, "row_group": g,
                          "first_row": first, "label_col": label_col, "row_offset": start + first})
            first += n
    labelled = [n for n in names if n is not None]
    classes = _class_index(labelled, labels, uri) if labelled else list(labels or [])
    index = {c: i for i, c in enumerate(classes)}
    row_labels = np.array([index[n] if n is not None else -1 for n in names], dtype=np.int64)
    return Source(uri, "parquet", classes, ids, row_labels, tasks, has_boxes)


def _inspect_csv(uri: str, labels: list[str] | None) -> Source:
    from pyarrow import csv as pacsv

    root = storage.resolve(uri)
    if storage.info(uri).type == pafs.FileType.File:
        files = [root.path]
    else:
        files = [f.path for f in storage.list_files(uri) if f.path.endswith(".csv")]
    ids: list[str] = []
    names: list[str | None] = []
    tasks: list[dict[str, Any]] = []
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
        start = len(ids)
        ids.extend(f"{rel}#{i}" for i in range(table.num_rows))
        if "label" in table.column_names:
            names.extend(str(v) for v in table.column("label").to_pylist())
        else:
            names.extend([None] * table.num_rows)
        tasks.append({"kind": "csv", "path": path, "rel": rel, "row_offset": start, "rows": table.num_rows})
    labelled = [n for n in names if n is not None]
    classes = _class_index(labelled, labels, uri) if labelled else list(labels or [])
    # Digits sort as strings, which is also their numeric order ("0".."9").
    index = {c: i for i, c in enumerate(classes)}
    row_labels = np.array([index[n] if n is not None else -1 for n in names], dtype=np.int64)
    return Source(uri, "csv", classes, ids, row_labels, tasks)


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


def decode_image(data: bytes) -> np.ndarray:
    """Bytes of any common image file → uint8 HxWx1 (grey) or HxWx3 (RGB).

    Odd but valid files are converted (CMYK, 16-bit, palette, alpha; the first
    frame of an animation). Unusable ones raise ImageError with a short kind.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty", "the file is empty")
    pixels = _decode_plain_png(data)
    if pixels is not None:
        return pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                # The header alone tells the size: refuse before decoding any pixels.
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageError("too-large", f"{img.width}x{img.height} pixels is over the limit of "
                                                  f"{MAX_IMAGE_PIXELS} (a decompression bomb?)")
                img.seek(0)
                img.load()
                return _to_array(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too-large", str(exc).splitlines()[0][:200]) from None
    except UnidentifiedImageError:
        raise ImageError("not-an-image", "not a readable image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError("corrupt", str(exc).splitlines()[0][:200] or type(exc).__name__) from None


def _decode_plain_png(data: bytes) -> np.ndarray | None:
    """An 8-bit grey or RGB PNG, not interlaced, through libspng (half PIL's time); else None.

    The common inspection file, so decoding it is much of what a scoring run costs. The
    pixels are PIL's (neither applies gamma or transparency). Every chunk's CRC is checked
    first: libspng, as pyspng drives it, decodes damaged data without complaint where PIL
    reports it; whatever is not plain (or fails here) goes to PIL, which says what is wrong.
    """
    if len(data) < 45 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, interlace = data[24], data[25], data[28]
    if depth != 8 or colour not in (0, 2) or interlace != 0 or width * height > MAX_IMAGE_PIXELS:
        return None
    if not _png_chunks_intact(data):
        return None
    import pyspng

    try:
        pixels = pyspng.load(data)
    except RuntimeError:
        return None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _png_chunks_intact(data: bytes) -> bool:
    """Every chunk up to IEND is whole and its CRC matches."""
    import zlib

    view = memoryview(data)
    pos, end = len(PNG_SIGNATURE), len(data)
    while pos + 12 <= end:
        body_end = pos + 8 + int.from_bytes(data[pos:pos + 4], "big")
        if body_end + 4 > end or zlib.crc32(view[pos + 4:body_end]) != int.from_bytes(data[body_end:body_end + 4], "big"):
            return False
        if data[pos + 4:pos + 8] == b"IEND":
            return True
        pos = body_end + 4
    return False


def _to_array(img: Any) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth: scale the actual range to 8 bit rather than clip.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return arr.round().astype(np.uint8)[:, :, None]
    if mode in ("L", "1"):
        return np.asarray(img.convert("L"), dtype=np.uint8)[:, :, None]
    if mode == "LA" or (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "PA"):
        img = img.convert("RGBA")
        background = _white(img.size)
        background.paste(img, mask=img.getchannel("A"))
        img = background
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _white(size: tuple[int, int]) -> Any:
    from PIL import Image

    return Image.new("RGB", size, (255, 255, 255))


# --------------------------------------------------------------------------- Ray Datasets


def _empty_batch() -> dict[str, list]:
    # Encoded files fill `data`; CSV rows arrive as pixels in `image`. Only the
    # filled one becomes a column (an all-null column would turn into NaNs).
    return {"id": [], "path": [], "label": [], "bbox": [], "data": [], "image": []}


def _read_task(task: dict[str, Any], fs: pafs.FileSystem, keep: frozenset[str] | None) -> dict[str, list]:
    """Encoded bytes (or, for CSV, pixels) of the images one task covers."""
    out = _empty_batch()

    def add(id_: str, path: str, label: int, bbox: tuple, data: bytes | None, image: np.ndarray | None) -> None:
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
        except OSError:
            data = None  # recorded as an unreadable image by the decoder
        add(task["id"], task["path"], task["label"], NO_BOX, data, None)
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
    return columns


def read_encoded(source: Source, ids: Iterable[str] | None = None, parallelism: int | None = None) -> Any:
    """A Ray Dataset of the source's images, still encoded: id, path, label, bbox, data|image.

    `ids` restricts it to those images (a split, or what is left to score),
    filtered before any image bytes are read; image files are read in the order of `ids`.
    """
    import ray.data

    ids = list(ids) if ids is not None else None
    keep = frozenset(ids) if ids is not None else None
    tasks = source.tasks
    if ids is not None and all(t["kind"] == "file" for t in tasks):
        by_id = {t["id"]: t for t in tasks}
        tasks = [by_id[i] for i in dict.fromkeys(ids) if i in by_id]  # in the order of `ids`
        keep = None
    label_of = {i: int(l) for i, l in zip(source.ids, source.row_labels) if l >= 0}
    fs = storage.resolve(source.uri).fs
    items = [{"task": json.dumps(t)} for t in tasks]
    blocks = parallelism or max(1, min(len(items), 4 * max(1, len(items) // 256) + 8))
    ds = ray.data.from_items(items, override_num_blocks=min(blocks, max(1, len(items))))
    # Files are small units of work: group them so a task reads many.
    batch = 64 if tasks and tasks[0]["kind"] == "file" else 1
    return ds.map_batches(_read_tasks, fn_args=(fs, keep, label_of), batch_size=batch, batch_format="numpy")


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decode the `data` column into `image`; images that fail get `error_kind`/`error`."""
    n = len(batch["id"])
    kinds = np.full(n, None, dtype=object)
    messages = np.full(n, None, dtype=object)
    if "image" in batch:  # already pixels (CSV)
        images = _objects(list(batch["image"]))
    else:
        images = np.full(n, None, dtype=object)
        for i, data in enumerate(batch["data"]):
            if not isinstance(data, (bytes, bytearray, memoryview)):  # None (Arrow may hand it over as NaN)
                kinds[i], messages[i] = "unreadable", "cannot read the file (a broken link, or no permission)"
                continue
            try:
                images[i] = decode_image(data)
            except ImageError as exc:
                kinds[i], messages[i] = exc.kind, str(exc)
    out = {k: v for k, v in batch.items() if k not in ("data", "image")}
    out.update(image=images, error_kind=kinds, error=messages)
    return out


def read_images(source: Source, ids: Iterable[str] | None = None) -> Any:
    """Decoded images as a Ray Dataset; undecodable ones are logged and skipped."""
    return read_encoded(source, ids).map_batches(_decode_and_drop, batch_format="numpy")


def _decode_and_drop(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = decode_batch(batch)
    bad = np.array([k is not None for k in out["error_kind"]], dtype=bool)
    for i in np.flatnonzero(bad):
        log.warning("skipping %s: %s (%s)", out["path"][i], out["error"][i], out["error_kind"][i])
    keep = ~bad
    return {k: v[keep] for k, v in out.items() if k not in ("error_kind", "error")}
