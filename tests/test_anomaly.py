"""Anomaly detection from good images: coreset, bank, fit → score → evaluate, refusals, a killed fit."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import INSPECTION_LABELS, save_tiny_vit
from vitray.errors import VitrayError

SIZE = 32  # the tiny ViT's input: an 8x8 patch grid


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    return save_tiny_vit(str(tmp_path_factory.mktemp("enc") / "model"), INSPECTION_LABELS, size=SIZE)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> str:
    from vitray.data import synth

    out = str(tmp_path_factory.mktemp("good") / "data")
    synth.write(out, n=40, size=SIZE, seed=3, passed_fraction=1.0, fmt="imagefolder")
    return out


@pytest.fixture(scope="module")
def bank(tmp_path_factory, encoder, good) -> str:
    from vitray.anomaly import AnomalyConfig, fit_bank

    out = str(tmp_path_factory.mktemp("bank") / "bank")
    fit_bank(AnomalyConfig(data=good, model=encoder, out=out, layers=(0, 1), chunk_patches=640))
    return out


def good_images(folder: str, n: int = 8) -> np.ndarray:
    from PIL import Image

    names = sorted(os.listdir(os.path.join(folder, "passed")))[-n:]
    return np.stack([np.asarray(Image.open(os.path.join(folder, "passed", f)).convert("RGB")) for f in names])


def test_the_greedy_coreset_takes_one_point_of_every_cluster():
    import torch

    from vitray.anomaly.coreset import greedy_coreset

    centres = torch.eye(6) * 100
    points = torch.cat([c + torch.randn(50, 6) for c in centres])
    picks = greedy_coreset(points, 6, seed=1)
    assert sorted(int(i) // 50 for i in picks) == list(range(6))
    assert len(greedy_coreset(points, 1000)) == len(points)


def test_the_bank_never_holds_more_than_twice_its_budget_and_ends_within_it():
    import torch

    from vitray.anomaly.coreset import CappedBank

    capped, peak = CappedBank(max_rows=100), 0
    for _ in range(30):
        capped.add(torch.randn(37, 8))
        peak = max(peak, capped.rows)
    assert peak < 200 and capped.seen == 30 * 37 and capped.merges > 0
    assert capped.finish().shape == (100, 8)


def test_nearest_distances_are_exact_whatever_the_slice():
    import torch

    from vitray.anomaly.bank import nearest_distances

    queries, rows = torch.randn(70, 16), torch.randn(300, 16)
    exact = torch.cdist(queries, rows).min(dim=1).values
    assert torch.allclose(nearest_distances(queries, rows, slice_rows=64, query_rows=32), exact, atol=1e-4)


def test_a_fit_writes_a_safe_bank_with_its_threshold_and_summary(bank, encoder):
    from safetensors import safe_open

    from vitray.anomaly.bank import read_meta
    from vitray.anomaly.features import load_encoder

    names = set(os.listdir(bank))
    assert {"bank.safetensors", "bank.json", "fit.json"} <= names and not any(n.endswith((".pt", ".pkl")) for n in names)
    meta = read_meta(bank)
    with safe_open(os.path.join(bank, "bank.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("features").shape) == (meta.rows, meta.dim)
    assert meta.fingerprint == load_encoder(encoder).fingerprint and meta.grid == (8, 8) and meta.layers == (0, 1)
    summary = json.load(open(os.path.join(bank, "fit.json")))
    assert summary["fit_images"] + summary["held_out_images"] == 40 and summary["held_out_images"] == 4
    assert summary["bank_rows"] == meta.rows <= summary["coreset_rows"] < summary["patches"]
    assert meta.threshold == pytest.approx(summary["held_out_scores"]["1.0"])  # 1% of 4 images: the highest


def test_the_scorer_adds_a_score_and_a_map_and_finds_a_pasted_object(bank, good):
    from vitray.anomaly import AnomalyScorer, anomaly_overlay_png

    scorer = AnomalyScorer(bank)
    images = good_images(good)
    broken = images.copy()
    broken[:, 4:12, 20:28] = (255, 0, 255)  # a magenta object no good image has: cells (1..2, 5..6) at 4 px
    batch = {"id": np.arange(16).astype(str), "image": np.concatenate([images, broken]),
             "error_kind": np.array([""] * 15 + ["corrupt"], dtype=object)}
    out = scorer(batch)
    assert out["anomaly_score"].dtype == np.float32 and out["anomaly_map"].shape == (16, 64)
    assert np.isnan(out["anomaly_score"][15]) and np.isnan(out["anomaly_map"][15]).all()
    assert (out["anomaly_score"][8:15] > out["anomaly_score"][:7]).all()
    peaks = np.argmax(out["anomaly_map"][8:15], axis=1)
    assert all(r in (0, 1, 2, 3) and c in (4, 5, 6, 7) for r, c in zip(peaks // 8, peaks % 8)), peaks
    png = anomaly_overlay_png(broken[0], out["anomaly_map"][8], scorer.grid, float(out["anomaly_score"][8]),
                              scorer.threshold)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_from_a_forward_pass_already_made_match_the_scorer(bank, good):
    import torch

    from vitray.anomaly import AnomalyScorer
    from vitray.data.preprocess import normalize

    scorer = AnomalyScorer(bank)
    images = good_images(good)
    prep = scorer.encoder.prep
    with torch.inference_mode():
        hidden = scorer.encoder.model(pixel_values=normalize(torch.from_numpy(images), prep.mean, prep.std),
                                      output_hidden_states=True).hidden_states
    shared = scorer.score_hidden_states(hidden)
    direct = scorer({"image": images})
    assert np.allclose(shared["anomaly_map"], direct["anomaly_map"], atol=1e-4)


def test_fit_then_evaluate_on_the_command_line(tmp_path, encoder, good, capsys):
    from vitray.cli import main
    from vitray.data import synth

    test = str(tmp_path / "test")
    synth.write(test, n=30, size=SIZE, seed=4, passed_fraction=0.5, defects="novel")
    out = str(tmp_path / "bank")
    assert main(["anomaly", "--data", good, "--model", encoder, "--out", out, "--layers", "0,1",
                 "--chunk-patches", "640"]) == 0
    assert "threshold" in capsys.readouterr().out
    assert main(["evaluate", "--anomaly", out, "--data", test, "--out", str(tmp_path / "eval")]) == 0
    result = json.load(open(tmp_path / "eval" / "anomaly.json"))
    assert result["images"] == 30 and result["good"] == 15 and 0 <= result["auroc"] <= 1
    assert set(result["per_kind"]) == {"scratch", "empty", "foreign", "chipped", "second"}
    assert result["localization"]["images"] == 15 and 0 <= result["localization"]["pointing_game"] <= 1


@pytest.mark.parametrize("case", ["no good images", "empty folder", "not a ViT", "layer out of range"])
def test_bad_inputs_are_refused_in_one_line_before_any_work(tmp_path, encoder, good, capsys, case):
    from vitray.cli import main
    from vitray.data import synth

    args = {"--data": good, "--model": encoder, "--out": str(tmp_path / "bank")}
    needle = {"no good images": "none passed", "empty folder": "no images", "not a ViT": "not a ViT encoder",
              "layer out of range": "encoder layers 1 to 2"}[case]
    if case == "no good images":
        args["--data"] = str(tmp_path / "defects")
        synth.write(args["--data"], n=8, size=SIZE, seed=1, passed_fraction=0.0, fmt="imagefolder")
    elif case == "empty folder":
        os.makedirs(tmp_path / "empty")
        args["--data"] = str(tmp_path / "empty")
    elif case == "not a ViT":
        os.makedirs(tmp_path / "bert")
        (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
        args["--model"] = str(tmp_path / "bert")
    extra = ["--layers", "3"] if case == "layer out of range" else []
    assert main(["anomaly", *[x for kv in args.items() for x in kv], *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("vitray: error:") and needle in err[0], err
    assert not (tmp_path / "bank" / "bank.json").exists()


def test_a_bank_from_another_encoder_is_refused(tmp_path, bank):
    from vitray.anomaly import AnomalyScorer

    other = save_tiny_vit(str(tmp_path / "other"), INSPECTION_LABELS, size=SIZE, seed=9)
    with pytest.raises(VitrayError, match="another encoder"):
        AnomalyScorer(bank, encoder=other)


def test_a_folder_that_is_no_bank_is_refused_in_one_line(tmp_path, capsys):
    from vitray.cli import main

    os.makedirs(tmp_path / "nobank")
    assert main(["evaluate", "--anomaly", str(tmp_path / "nobank"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "e")]) == 2
    assert "not an anomaly bank" in capsys.readouterr().err


def test_a_killed_fit_leaves_no_bank_and_the_same_command_fits_it_whole(tmp_path, encoder, good, monkeypatch):
    from vitray.anomaly import AnomalyConfig, fit_bank
    from vitray.anomaly import coreset

    out = str(tmp_path / "bank")
    config = AnomalyConfig(data=good, model=encoder, out=out, layers=(1,), chunk_patches=640)
    fit_bank(config)
    calls = {"n": 0}
    add = coreset.CappedBank.add

    def killed_after_one_chunk(self, features):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        add(self, features)

    monkeypatch.setattr(coreset.CappedBank, "add", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        fit_bank(config)
    assert not os.path.exists(os.path.join(out, "bank.json"))  # the older bank is not left beside newer rows
    assert not os.path.exists(os.path.join(out, "_lease.json"))
    monkeypatch.setattr(coreset.CappedBank, "add", add)
    result = fit_bank(config)
    assert os.path.exists(os.path.join(out, "bank.json")) and result.meta.rows > 0


@pytest.mark.slow
def test_a_fit_on_ray_matches_the_one_in_process(ray_session, tmp_path, encoder, good, monkeypatch):
    from conftest import as_a_fresh_process_without_ray
    from vitray.anomaly import AnomalyConfig, fit_bank, load_bank

    as_a_fresh_process_without_ray(monkeypatch)
    here = fit_bank(AnomalyConfig(data=good, model=encoder, out=str(tmp_path / "here"), layers=(1,),
                                  chunk_patches=640))
    monkeypatch.undo()
    on_ray = fit_bank(AnomalyConfig(data=good, model=encoder, out=str(tmp_path / "ray"), layers=(1,),
                                    chunk_patches=640, in_process_max=0, workers=2))
    assert not on_ray.summary["in_process"] and here.summary["in_process"]
    # The same chunks on any worker keep the same patches; the merge order may differ.
    assert on_ray.meta.rows == here.meta.rows
    a, b = load_bank(str(tmp_path / "here")).features, load_bank(str(tmp_path / "ray")).features
    assert sorted(map(tuple, a.numpy().round(4).tolist())) == sorted(map(tuple, b.numpy().round(4).tolist()))


def _with_objects(images: np.ndarray) -> np.ndarray:
    broken = images.copy()
    broken[:, 4:12, 20:28] = (255, 0, 255)  # a magenta object no good image has
    return broken


@pytest.fixture(scope="module")
def strict_bank(tmp_path_factory, bank, good) -> str:
    """The bank with its threshold between the good images' scores and those with an object: the
    untrained encoder ranks them apart, but a threshold from 4 held-out images lies above both."""
    import shutil

    from vitray.anomaly import AnomalyScorer

    out = str(tmp_path_factory.mktemp("strict") / "bank")
    shutil.copytree(bank, out)
    scorer = AnomalyScorer(bank)
    clean = scorer({"image": good_images(good)})["anomaly_score"]
    broken = scorer({"image": _with_objects(good_images(good))})["anomaly_score"]
    assert clean.max() < broken.min()
    meta = json.load(open(os.path.join(out, "bank.json")))
    meta["threshold"] = float(clean.max() + broken.min()) / 2
    json.dump(meta, open(os.path.join(out, "bank.json"), "w"))
    return out


@pytest.mark.parametrize("attention", ["defects", "all"])
def test_the_model_stage_scores_the_bank_of_its_own_backbone_from_its_own_pass(strict_bank, encoder, good,
                                                                               attention):
    bank = strict_bank
    from vitray.anomaly import AnomalyScorer
    from vitray.inference import Predictor, PredictOptions

    images = np.concatenate([good_images(good), _with_objects(good_images(good))])
    batch = {"id": np.arange(16).astype(str), "image": images,
             "error_kind": np.array([""] * 15 + ["corrupt"], dtype=object)}
    stage = Predictor(encoder, PredictOptions(attention=attention, anomaly=bank))
    assert stage.anomaly.shared  # the bank was fitted on this classifier's backbone: no second encoder
    out = stage(batch)
    direct = AnomalyScorer(bank)(batch)
    # Exact up to float32 rounding, which the square root enlarges near a distance of 0.
    assert np.allclose(out["anomaly_map"], direct["anomaly_map"], atol=5e-3, equal_nan=True)
    assert np.isnan(out["anomaly_score"][15]) and not out["anomalous"][15]
    assert out["anomalous"][8:15].all() and not out["anomalous"][:8].any()


def test_the_onnx_engine_scores_with_the_banks_encoder_beside_the_graph(strict_bank, encoder, good):
    from vitray.anomaly import AnomalyScorer
    from vitray.export import onnx_model
    from vitray.inference import OnnxPredictor, PredictOptions

    images = np.concatenate([good_images(good), _with_objects(good_images(good))])
    batch = {"id": np.arange(16).astype(str), "image": images, "error_kind": np.array([""] * 16, dtype=object)}
    out = OnnxPredictor(onnx_model(encoder, maps=False)[3], PredictOptions(anomaly=strict_bank))(batch)
    assert np.allclose(out["anomaly_map"], AnomalyScorer(strict_bank)(batch)["anomaly_map"], atol=5e-3)
    assert list(out["anomalous"]) == [False] * 8 + [True] * 8


def test_score_with_a_bank_commits_scores_maps_overlays_and_a_report_section(tmp_path, strict_bank, encoder, good):
    from PIL import Image

    from vitray.score import ScoreConfig, read_predictions, score

    night = tmp_path / "night"
    night.mkdir()
    for n, (clean, broken) in enumerate(zip(good_images(good), _with_objects(good_images(good)))):
        Image.fromarray(clean).save(night / f"good-{n}.png")
        Image.fromarray(broken).save(night / f"object-{n}.png")
    out = tmp_path / "out"
    bank = strict_bank
    manifest = score(ScoreConfig(model=encoder, input=str(night), output=str(out), anomaly=bank))
    rows = read_predictions(str(out)).to_table().to_pylist()
    assert len(rows) == 16 and all(r["anomaly_shape"] == [8, 8] and len(r["anomaly_map"]) == 64 for r in rows)
    flagged = {r["id"] for r in rows if r["anomalous"]}
    assert flagged == {f"object-{n}.png" for n in range(8)}
    for r in rows:  # --attention defects: an overlay for each anomalous image, beside the attention ones
        assert (r["anomaly_png"] is not None) == r["anomalous"]
        if r["anomaly_png"]:
            assert r["anomaly_png"].startswith("anomaly/") and (out / r["anomaly_png"]).read_bytes()[:4] == b"\x89PNG"
    assert manifest["anomaly"] == {"bank": bank, "threshold": pytest.approx(manifest["anomaly"]["threshold"]),
                                   "anomalous": len(flagged)}
    page = (out / "report.html").read_text()
    assert "Anomalies (newest run)" in page and "object-0.png" in page
    assert not os.listdir(out / "_pending")
    again = score(ScoreConfig(model=encoder, input=str(night), output=str(out), anomaly=bank))
    assert again["counts"]["scored"] == 0 and again["anomaly"]["anomalous"] == 0


def test_score_refuses_a_bank_of_another_input_size_in_one_line(tmp_path, bank, good):
    from vitray.score import ScoreConfig, score

    other = save_tiny_vit(str(tmp_path / "model48"), INSPECTION_LABELS, size=48)
    with pytest.raises(VitrayError, match="its encoder takes 32x32 px images, the model 48x48"):
        score(ScoreConfig(model=other, input=good, output=str(tmp_path / "out"), anomaly=bank))
    with pytest.raises(VitrayError, match="not an anomaly bank"):
        score(ScoreConfig(model=other, input=good, output=str(tmp_path / "out"), anomaly=str(tmp_path)))
