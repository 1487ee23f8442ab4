"""`vitray export` and `vitray score --engine onnx`: the ONNX graph scores as the PyTorch model does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from vitray.errors import VitrayError
from vitray.export import ExportConfig, export_onnx, onnx_model, read_metadata
from vitray.inference import OnnxPredictor, PredictOptions, Predictor
from vitray.score import ScoreConfig, score

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "score_onnx.py"


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    export_onnx(ExportConfig(tiny_model, out, attention=True))
    return out


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_the_onnx_graph_scores_1000_images_as_pytorch_does(tiny_model, exported):
    options = PredictOptions(attention="all")
    torch_side, onnx_side = Predictor(tiny_model, options), OnnxPredictor(Path(exported).read_bytes(), options)
    for start in range(0, 1000, 250):
        batch = {"image": _images(250, seed=start)}
        a, b = torch_side(dict(batch)), onnx_side(dict(batch))
        assert np.array_equal(a["pred"], b["pred"])
        assert np.abs(a["probs"] - b["probs"]).max() < 1e-4
        assert np.abs(a["attention"] - b["attention"]).max() < 1e-3


def test_maps_follow_the_attention_mode_and_failed_rows_skip_the_model(exported):
    model = Path(exported).read_bytes()
    batch = {"image": _images(8), "error_kind": np.array([""] * 7 + ["corrupt"], dtype=object)}
    none = OnnxPredictor(model, PredictOptions(attention="none"))(dict(batch))
    assert np.isnan(none["attention"]).all() and "image" not in none
    defects = OnnxPredictor(model, PredictOptions(attention="defects"))(dict(batch))
    passed = defects["pred"] == defects_label(exported)
    assert np.isnan(defects["attention"][passed]).all()
    assert not np.isnan(defects["attention"][~passed & (batch["error_kind"] == "")]).any()
    assert defects["pred"][7] == -1 and np.isnan(defects["probs"][7]).all()


def defects_label(exported: str) -> int:
    return read_metadata(exported)["labels"].index("passed")


def test_the_graph_takes_any_batch_size_and_carries_its_preprocessing(tiny_model, exported):
    import onnxruntime as ort

    session = ort.InferenceSession(exported, providers=["CPUExecutionProvider"])
    for n in (1, 7):
        probs, maps, logits, embedding = session.run(None, {"images": _images(n)})
        assert probs.shape == (n, 5) and maps.shape == (n, 64) and embedding.shape == (n, 32)
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        assert np.allclose(e / e.sum(axis=1, keepdims=True), probs, atol=1e-5)
    meta = read_metadata(exported)
    assert meta["labels"] == ["passed", "Xplus", "Xminus", "Yplus", "Yminus"]
    assert (meta["size"], meta["channels"], meta["grid"], meta["input"]) == (32, 3, [8, 8], "uint8 NHWC")
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["attention"] == "rollout"


def test_refusals_are_one_line(tiny_model, exported, tmp_path):
    with pytest.raises(VitrayError, match="name the file .onnx"):
        export_onnx(ExportConfig(tiny_model, str(tmp_path / "model.bin")))
    with pytest.raises(VitrayError, match="not an ONNX model"):
        (tmp_path / "junk.onnx").write_bytes(b"junk")
        onnx_model(str(tmp_path / "junk.onnx"), maps=False)
    plain = str(tmp_path / "plain.onnx")
    export_onnx(ExportConfig(tiny_model, plain))
    with pytest.raises(VitrayError, match="exported without maps"):
        onnx_model(plain, maps=True)
    with pytest.raises(VitrayError, match="--engine onnx"):
        ScoreConfig(model=exported, input="x", output="y").check()
    with pytest.raises(VitrayError, match="default maps only"):
        ScoreConfig(model=tiny_model, input="x", output="y", engine="onnx", head_fusion="max").check()


def _pngs(folder: Path, n: int) -> list[str]:
    names = []
    for i, image in enumerate(_images(n, seed=7)):
        name = f"cam{i % 2}/{i:03d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name)
        names.append(name)
    return names


def _predictions(out: str) -> dict:
    table = ds.dataset(os.path.join(out, "predictions"), format="parquet").to_table()
    return {row["id"]: row for row in table.to_pylist()}


def test_score_with_the_onnx_engine_commits_what_the_torch_engine_does(ray_session, tiny_model, exported, tmp_path):
    data = tmp_path / "images"
    names = _pngs(data, 40)
    runs = {}
    for name, model, engine in (("torch", tiny_model, "torch"), ("folder", tiny_model, "onnx"),
                                ("file", exported, "onnx")):
        out = str(tmp_path / name)
        manifest = score(ScoreConfig(model=model, input=str(data), output=out, attention="all", engine=engine))
        assert manifest["counts"]["scored"] == 40 and manifest["arguments"]["engine"] == engine
        runs[name] = _predictions(out)
    for name in ("folder", "file"):
        assert set(runs[name]) == set(names)
        for key, row in runs["torch"].items():
            other = runs[name][key]
            assert other["label"] == row["label"]
            assert np.abs(np.array(other["probs"]) - np.array(row["probs"])).max() < 1e-4
            assert np.abs(np.array(other["attention"]) - np.array(row["attention"])).max() < 1e-3
            assert other["attention_png"] == row["attention_png"]


def test_the_cli_exports_and_the_standalone_example_needs_neither_torch_nor_ray(tiny_model, tmp_path, capsys):
    from vitray.cli import main

    out = str(tmp_path / "cli.onnx")
    assert main(["export", "--model", tiny_model, "--out", out, "--attention"]) == 0
    assert "next: vitray score --model" in capsys.readouterr().out
    image = tmp_path / "one.png"
    Image.fromarray(_images(1, seed=3)[0]).save(image)
    # The example, then a check that it loaded nothing of vitray, PyTorch or Ray.
    code = ("import runpy, sys\n"
            f"sys.argv = ['score_onnx.py', {out!r}, {str(image)!r}]\n"
            f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
            "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'vitray', 'transformers'})\n"
            "print('loaded:', loaded)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    line, loaded = done.stdout.strip().splitlines()
    assert loaded == "loaded: []"
    expected = Predictor(tiny_model, PredictOptions(attention="none"))({"image": _images(1, seed=3)})
    name, label, prob = line.split("\t")[:3]
    assert name == str(image) and label == read_metadata(out)["labels"][int(expected["pred"][0])]
    assert abs(float(prob) - float(expected["score"][0])) < 1e-4
