"""Readers: each format on small fixtures written here, detection, and one-line errors."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vitray.data import decode
from vitray.data.decode import ImageError, decode_image
from vitray.data.readers import read_encoded, read_images
from vitray.data.sources import detect_format, inspect_source
from vitray.errors import VitrayError


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _rgb(h: int, w: int, value: int) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


@pytest.fixture
def imagefolder(tmp_path):
    for c, v in (("cat", 10), ("dog", 200)):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(_rgb(12, 20, v + i)).save(tmp_path / c / f"{i}.png")
    return tmp_path


def _write_hf_parquet(path, rows: list[dict], label_names: list[str] | None = None) -> None:
    features = {"image": {"_type": "Image"}}
    if label_names is not None:
        features["label"] = {"_type": "ClassLabel", "names": label_names}
    table = pa.Table.from_pylist(rows)
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path, row_group_size=2)


def test_imagefolder_labels_ids_and_pixels(ray_session, imagefolder):
    source = inspect_source(str(imagefolder))
    assert source.format == "imagefolder"
    assert source.labels == ["cat", "dog"]
    assert source.ids == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    rows = {r["id"]: r for r in read_images(source).take_all()}
    assert len(rows) == 6
    assert rows["dog/2.png"]["label"] == 1
    assert rows["dog/2.png"]["image"].shape == (12, 20, 3)
    assert rows["dog/2.png"]["image"][0, 0, 0] == 202


def test_imagefolder_skips_a_corrupt_image(ray_session, imagefolder):
    (imagefolder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    source = inspect_source(str(imagefolder))
    assert len(source) == 7
    ids = {r["id"] for r in read_images(source).take_all()}
    assert "dog/broken.png" not in ids and len(ids) == 6


def test_subset_by_ids_reads_only_those(ray_session, imagefolder):
    source = inspect_source(str(imagefolder))
    rows = read_encoded(source, ids=["cat/1.png", "dog/0.png"]).take_all()
    assert sorted(r["id"] for r in rows) == ["cat/1.png", "dog/0.png"]


def test_parquet_with_response_gives_labels_and_boxes(ray_session, tmp_path):
    rows = [{"image": {"bytes": _png(_rgb(16, 16, 50 * i)), "path": f"{i}.png"},
             "response": str({"bboxes": [[1.0, 2.0, 10.0 + i, 12.0]], "labels": [lab]})}
            for i, lab in enumerate(["Xplus", "passed", "Xplus", "Yminus", "passed"])]
    _write_hf_parquet(tmp_path / "train.parquet", rows)
    source = inspect_source(str(tmp_path))
    assert source.format == "parquet" and source.has_boxes
    assert source.labels == ["Xplus", "Yminus", "passed"]
    got = {r["id"]: r for r in read_images(source).take_all()}
    assert list(got) and len(got) == 5
    r3 = got["train.parquet#3"]
    assert r3["label"] == source.labels.index("Yminus")
    np.testing.assert_allclose(r3["bbox"], [1.0, 2.0, 13.0, 12.0])
    assert r3["image"][0, 0, 0] == 150


def test_parquet_classlabel_ids_use_the_names(ray_session, tmp_path):
    rows = [{"image": {"bytes": _png(_rgb(8, 8, 0)), "path": None}, "label": i % 2} for i in range(4)]
    _write_hf_parquet(tmp_path / "d.parquet", rows, label_names=["ok", "bad"])
    source = inspect_source(str(tmp_path / "d.parquet"))
    assert source.labels == ["bad", "ok"]  # sorted names
    labels = {r["id"]: r["label"] for r in read_images(source).take_all()}
    assert labels["d.parquet#0"] == source.labels.index("ok")
    assert labels["d.parquet#1"] == source.labels.index("bad")


def test_parquet_readable_by_datasets_matches_reader(ray_session, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"image": {"bytes": _png(_rgb(8, 8, 30 * i)), "path": f"{i}.png"}, "label": i % 3} for i in range(6)]
    _write_hf_parquet(tmp_path / "train-00000.parquet", rows, label_names=["a", "b", "c"])
    hf = datasets.load_dataset("parquet", data_dir=str(tmp_path), split="train")
    ours = {r["id"]: r for r in read_images(inspect_source(str(tmp_path))).take_all()}
    for i, row in enumerate(hf):
        mine = ours[f"train-00000.parquet#{i}"]
        np.testing.assert_array_equal(np.asarray(row["image"].convert("RGB")), mine["image"])
        assert hf.features["label"].int2str(row["label"]) == ["a", "b", "c"][mine["label"]]


def test_bad_response_is_one_line_naming_the_file(tmp_path):
    rows = [{"image": {"bytes": _png(_rgb(8, 8, 0)), "path": "x.png"}, "response": "{'labels': oops"}]
    _write_hf_parquet(tmp_path / "broken.parquet", rows)
    with pytest.raises(VitrayError) as err:
        inspect_source(str(tmp_path))
    message = str(err.value)
    assert "broken.parquet" in message and "response" in message and "\n" not in message


def _kaggle_csv(path, n: int, labelled: bool = True) -> np.ndarray:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 784))
    df = pd.DataFrame(pixels, columns=[f"pixel{i}" for i in range(784)])
    labels = rng.integers(0, 10, n)
    if labelled:
        df.insert(0, "label", labels)
    df.to_csv(path, index=False)
    return pixels


def test_kaggle_csv_train_and_test_layouts(ray_session, tmp_path):
    pixels = _kaggle_csv(tmp_path / "train.csv", 12)
    source = inspect_source(str(tmp_path / "train.csv"))
    assert source.format == "csv" and source.labelled
    assert source.labels == sorted(source.labels)
    rows = {r["id"]: r for r in read_images(source).take_all()}
    img = rows["train.csv#5"]["image"]
    assert img.shape == (28, 28, 1) and img.dtype == np.uint8
    np.testing.assert_array_equal(img.reshape(-1), pixels[5])

    _kaggle_csv(tmp_path / "test.csv", 4, labelled=False)
    test = inspect_source(str(tmp_path / "test.csv"))
    assert not test.labelled and test.ids == [f"test.csv#{i}" for i in range(4)]


def test_csv_with_wrong_columns_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(VitrayError, match=r"x\.csv.*pixel0"):
        inspect_source(str(tmp_path / "x.csv"))


def test_empty_folder_and_missing_path_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitrayError, match="no images"):
        inspect_source(str(tmp_path / "empty"))
    with pytest.raises(VitrayError, match="not found"):
        inspect_source(str(tmp_path / "nope"))


def test_detects_a_flat_tree_of_images_as_unlabelled(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(_rgb(4, 4, 1)).save(tmp_path / "top.png")
    Image.fromarray(_rgb(4, 4, 1)).save(tmp_path / "a" / "b" / "deep.jpg")
    assert detect_format(str(tmp_path)) == "images"
    assert inspect_source(str(tmp_path)).ids == ["a/b/deep.jpg", "top.png"]


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "I;16", "1"])
def test_odd_but_valid_images_decode(mode):
    img = Image.new(mode, (5, 3))
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    arr = decode_image(buf.getvalue())
    assert arr.dtype == np.uint8 and arr.shape[:2] == (3, 5) and arr.shape[2] in (1, 3)


@pytest.mark.parametrize("shape", [(9, 13, 3), (9, 13), (1, 1, 3), (300, 7)])
def test_plain_pngs_decode_to_pils_pixels(shape):
    # 8-bit grey and RGB PNGs take libspng; the pixels must be exactly PIL's.
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = _png(pixels)
    assert decode._decode_plain_png(data) is not None
    decoded = decode_image(data)
    expected = pixels if pixels.ndim == 3 else pixels[:, :, None]
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, expected)


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "I;16", "1"])
def test_other_pngs_are_left_to_pil(mode):
    buf = io.BytesIO()
    Image.new(mode, (5, 3)).save(buf, format="PNG")
    assert decode._decode_plain_png(buf.getvalue()) is None


def test_damaged_png_data_is_reported_not_decoded():
    # libspng would decode a flipped bit deep in the image data without complaint; the chunk's
    # CRC gives it away, and PIL then names the file corrupt.
    data = bytearray(_png(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)))
    data[data.find(b"IDAT") + 2000] ^= 0x10
    with pytest.raises(ImageError) as err:
        decode_image(bytes(data))
    assert err.value.kind == "corrupt"


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("L", (4, 4), v) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue()).shape == (4, 4, 3)


@pytest.mark.parametrize("data,kind", [(b"", "empty"), (b"hello", "not-an-image"),
                                       (_png(_rgb(20, 20, 9))[:60], "corrupt")])
def test_unusable_bytes_give_a_short_kind(data, kind):
    with pytest.raises(ImageError) as err:
        decode_image(data)
    assert err.value.kind == kind


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError) as err:
        decode_image(_png(_rgb(20, 20, 1)))
    assert err.value.kind == "too-large"


# --------------------------------------------------------------------------- inputs of many files


def test_image_files_are_read_once_each_in_the_order_of_the_ids(imagefolder):
    from vitray.data.readers import iter_encoded

    source = inspect_source(str(imagefolder), "images")
    got = [i for batch in iter_encoded(source, ["dog/0.png", "cat/1.png", "dog/0.png", "none.png"])
           for i in batch["id"]]
    assert got == ["dog/0.png", "cat/1.png"]
    assert [int(v) for b in iter_encoded(inspect_source(str(imagefolder)), ["dog/2.png"]) for v in b["label"]] == [1]


def test_ids_are_one_arrow_array_used_as_a_list():
    from vitray.data.ids import Ids

    ids = Ids(["b/1.png", "a/2.png", "c.png"])
    assert ids == ["b/1.png", "a/2.png", "c.png"] and ids != ["b/1.png"] and Ids([]) == []
    assert len(ids) == 3 and ids[0] == "b/1.png" and ids[-1] == "c.png" and ids[np.int64(1)] == "a/2.png"
    assert ids[1:] == ["a/2.png", "c.png"] and list(ids) == ["b/1.png", "a/2.png", "c.png"]
    assert "c.png" in ids and "d.png" not in ids and not Ids([])
    arrow = pa.array(ids, pa.string())  # handed to Arrow without a copy
    assert arrow.equals(ids.array) and arrow.buffers()[2].address == ids.array.buffers()[2].address
    assert np.isin(ids, ["c.png"]).tolist() == [False, False, True]


def test_the_driver_holds_no_python_object_per_image(tmp_path):
    """A night's input is listed and planned as Arrow arrays: what the driver keeps in Python's
    own heap does not grow with the number of images."""
    import tracemalloc

    from vitray.score.planning import plan_run

    n = 20_000
    root = tmp_path / "night"
    for d in range(100):
        (root / f"cam{d:02d}").mkdir(parents=True)
    for i in range(n):
        (root / f"cam{i % 100:02d}" / f"{i:07d}.png").touch()
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "a.png").touch()
    plan_run(str(tmp_path / "out"), inspect_source(str(tmp_path / "few"), "images").ids)  # imports warmed up

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        source = inspect_source(str(root), "images")
        planned = plan_run(str(tmp_path / "out"), source.ids)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(planned.remaining) == n and planned.remaining[5] == "cam00/0000500.png"
    # 8 bytes per image are the labels' numpy array; a Python str per id alone would be ~75.
    assert held < 16 * n, f"{held / n:.0f} bytes per image in Python's heap"


def _counting_proxy(s3, monkeypatch):
    """benchmarks/scale.py's counting proxy in front of the S3 server, and the AWS variables pointing at it."""
    import sys
    import threading
    from http.server import ThreadingHTTPServer

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks"))
    import scale

    host, port = s3.endpoint.split("://")[1].split(":")
    scale.Counting.upstream = (host, int(port))
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), scale.Counting)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return proxy, scale.Counting.counts


@pytest.mark.s3
def test_an_image_on_s3_is_read_with_one_request(s3, s3_prefix, monkeypatch):
    from vitray import storage
    from vitray.data.readers import iter_encoded

    blobs = {f"cam{i % 2}/{i}.png": _png(_rgb(6, 6, i)) for i in range(5)}
    for name, blob in blobs.items():
        storage.write_bytes(f"{s3_prefix}/in/{name}", blob)
    proxy, counts = _counting_proxy(s3, monkeypatch)
    try:
        source = inspect_source(f"{s3_prefix}/in", "images")
        counts.clear()
        got = {i: d for batch in iter_encoded(source) for i, d in zip(batch["id"], batch["data"])}
        assert dict(counts) == {"GET": 5}  # no HeadObject before each GetObject
    finally:
        proxy.shutdown()
    assert got == blobs


@pytest.mark.s3
def test_images_on_s3_are_read_by_ray(ray_session, s3_prefix):
    from vitray import storage

    for i in range(3):
        storage.write_bytes(f"{s3_prefix}/in/{i}.png", _png(_rgb(4, 5, 40 * i)))
    rows = {r["id"]: r for r in read_images(inspect_source(f"{s3_prefix}/in")).take_all()}
    assert sorted(rows) == ["0.png", "1.png", "2.png"] and rows["2.png"]["image"][0, 0, 0] == 80


@pytest.mark.s3
def test_s3_read_failures_are_the_readers_one_line_reasons(s3, s3_prefix, monkeypatch):
    from s3server import free_ports
    from vitray import storage
    from vitray.data.readers import read_file

    uri = f"{s3_prefix}/in/a.png"
    storage.write_bytes(uri, b"png")
    path = storage.resolve(uri).path
    assert read_file(storage.file_reader(s3_prefix), path) == (b"png", None)

    storage.delete(storage.resolve(uri))
    assert read_file(storage.file_reader(s3_prefix), path) == (
        None, "the file is gone (deleted or moved after the input was listed)")

    storage.write_bytes(uri, b"png")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3.secret_key)
    assert read_file(storage.file_reader(s3_prefix), path) == (None, "cannot read the file: no permission")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    down = f"http://127.0.0.1:{free_ports(1)[0]}"
    data, reason = read_file(storage.file_reader(s3_prefix, endpoint=down), path)
    assert data is None and reason.startswith("cannot read the file: Could not connect to the endpoint URL")
    assert "\n" not in reason and s3.secret_key not in reason


@pytest.mark.parametrize("code,status,error,reason", [
    ("NoSuchKey", 404, FileNotFoundError, "the file is gone (deleted or moved after the input was listed)"),
    ("AccessDenied", 403, PermissionError, "cannot read the file: no permission"),
    ("SlowDown", 503, OSError, "cannot read the file: An error occurred (SlowDown) when calling the GetObject "
                               "operation: Please reduce your request rate."),
])
def test_s3_errors_become_the_oserrors_of_a_local_read(code, status, error, reason):
    from botocore.exceptions import ClientError

    from vitray import storage
    from vitray.data.readers import unreadable

    failure = ClientError({"Error": {"Code": code, "Message": "Please reduce your request rate."
                                     if code == "SlowDown" else code},
                           "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    exc = storage.s3_os_error(failure)
    assert type(exc) is error and unreadable("b/k.png", exc) == reason
