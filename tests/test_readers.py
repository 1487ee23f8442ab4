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
