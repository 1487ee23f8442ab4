"""Decisions: calibrated scores, thresholds with their bounds, unknown images and drift, `vitray calibrate`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vitray.decisions import calibration as cal
from vitray.decisions.drift import NightSample, Reference, compare, psi, sample_keys
from vitray.decisions.ood import Gaussians, auroc, conformal_threshold, energy
from vitray.decisions.policy import REASONS, Policy, load_policy
from vitray.errors import VitrayError


def _scores(rng, n, defect_share=0.8):
    is_defect = rng.uniform(size=n) < defect_share
    return np.where(is_defect, rng.beta(6, 1.2, n), rng.beta(1.2, 6, n)), is_defect


def test_temperature_scaling_recovers_an_overconfident_models_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 5)) * 2
    labels = np.array([rng.choice(5, p=p) for p in cal.softmax(true_logits)])
    t = cal.fit_temperature(true_logits * 3, labels)  # three times too sharp
    assert t == pytest.approx(3, rel=0.1)
    before = cal.expected_calibration_error(cal.softmax(true_logits * 3), labels)
    after = cal.expected_calibration_error(cal.softmax(true_logits * 3, t), labels)
    assert after < 0.03 < before


def test_the_escape_and_false_reject_rates_hold_on_fresh_images_at_the_stated_confidence():
    """Over many calibration draws, a fresh set's escape rate exceeds the target in at most ~5% of them."""
    rng = np.random.default_rng(1)
    over_escape = over_reject = 0
    draws = 60
    for _ in range(draws):
        score, defect = _scores(rng, 3000)
        t = cal.choose_thresholds(score, defect, 0.01, 0.05, 0.95)
        assert t.ok is not None and t.ng is not None
        fresh, fresh_defect = _scores(rng, 60000)
        measured = cal.rates(fresh, fresh_defect, t)
        over_escape += measured["escape"]["rate"] > 0.01
        over_reject += measured["false_reject"]["rate"] > 0.05
    assert over_escape <= 0.1 * draws and over_reject <= 0.1 * draws


def test_too_few_defective_images_set_no_ok_threshold_and_decide_nothing_ok():
    rng = np.random.default_rng(2)
    score, defect = _scores(rng, 300)  # ~240 defective: an escape rate of 0.005 cannot be bounded
    t = cal.choose_thresholds(score, defect, 0.005, 0.05, 0.95)
    assert t.ok is None
    assert "ok" not in set(cal.decide_scores(score, t))
    assert cal.upper_bound(0, 598, 0.95) < 0.005 < cal.upper_bound(0, 597, 0.95)


def test_the_ood_scores_separate_unknown_images_and_the_threshold_keeps_its_rate():
    rng = np.random.default_rng(3)
    means = rng.normal(size=(5, 24)) * 3
    labels = rng.integers(0, 5, 3000)
    inside = means[labels] + rng.normal(size=(3000, 24))
    outside = rng.normal(size=(500, 24)) * 3 + 6
    gaussians = Gaussians.fit(inside[:1500], labels[:1500])
    assert auroc(gaussians.score(inside[1500:]), gaussians.score(outside)) > 0.99
    tau = conformal_threshold(gaussians.score(inside[1500:2500]), 0.02)
    assert np.mean(gaussians.score(inside[2500:]) > tau) < 0.05
    assert conformal_threshold(np.arange(10.0), 0.01) == float("inf")  # too few to set a 1% quantile
    assert energy(np.array([[10.0, 0, 0], [1.0, 1, 1]]))[0] < energy(np.array([[10.0, 0, 0], [1.0, 1, 1]]))[1]


def _images(rng, n: int, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings that depend on the class, and the statistics of images of a bright square."""
    from vitray.decisions.drift import image_statistics

    emb = rng.normal(size=(n, 32)) + classes[:, None] * 2.0
    images = np.zeros((n, 16, 16, 3), np.uint8)
    images[:, 4:12, 4:12] = rng.integers(150, 200, (n, 1, 1, 1))
    return emb, image_statistics(images + rng.integers(0, 20, images.shape).astype(np.uint8))


def test_drift_raises_the_alarm_for_a_shifted_night_and_rarely_for_a_stable_one():
    rng = np.random.default_rng(4)
    classes = rng.choice(3, 3000, p=[0.25, 0.4, 0.35])
    emb, stats = _images(rng, 3000, classes)
    reference = Reference.fit(emb, stats, classes, rng.uniform(size=3000), seed=0)
    alarms = 0
    for seed in range(20):  # stable nights, with another mix of classes than the calibration set's
        night_classes = rng.choice(3, 1000, p=[0.02, 0.49, 0.49])
        e, s = _images(rng, 1000, night_classes)
        night = NightSample(seed=seed)
        night.add(reference.project(e, s, night_classes), rng.uniform(size=1000))
        alarms += compare(reference, night)["drifted"]
    assert alarms <= 1
    night_classes = rng.choice(3, 1000, p=[0.02, 0.49, 0.49])
    e, s = _images(rng, 1000, night_classes)
    shifted = NightSample()
    shifted.add(reference.project(e + np.r_[np.full(4, 0.4), np.zeros(28)], s, night_classes), rng.uniform(size=1000))
    result = compare(reference, shifted)
    assert result["drifted"] and result["p_value"] < 0.01
    # A night larger than the sample keeps a uniform sample of bounded size.
    big = NightSample(size=100)
    big.add(reference.project(*_images(rng, 5000, np.zeros(5000)), np.zeros(5000)), rng.uniform(size=5000))
    assert big.seen == 5000 and len(big.scores) == 100
    assert psi(np.linspace(0, 1, 1000), np.linspace(0, 1, 1000)) < 0.01 < psi(np.linspace(0, 1, 1000),
                                                                                 np.linspace(0.5, 1, 1000))


def _policy(ok=0.2, ng=0.8, ood_threshold=50.0) -> Policy:
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(200, 8))
    labels = ["Xminus", "Xplus", "passed"]
    record = {"temperature": 1.0, "labels": labels, "ok_class": "passed", "thresholds": {"ok": ok, "ng": ng},
              "ood": {"method": "mahalanobis", "threshold": ood_threshold}}
    classes = rng.integers(0, 3, 200)
    return Policy(record, Gaussians.fit(emb, classes),
                  Reference.fit(emb, rng.uniform(size=(200, 18)), classes, rng.uniform(size=200)))


def test_a_policy_decides_ok_ng_and_review_with_its_reasons(tmp_path):
    policy = _policy()
    logits = np.array([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.3], [0.0, 0.0, 5.0]])
    embeddings = np.zeros((4, 8))
    embeddings[3] = 40.0  # far from every class
    stats = np.zeros((4, 18))
    out = policy.apply(logits, embeddings, stats)
    assert list(out["decision"]) == ["ok", "ng", "review", "review"]
    assert list(out["reason"]) == [REASONS["ok"], REASONS["ng"], REASONS["between"], REASONS["unlike"]]
    assert out["probs_calibrated"].shape == (4, 3) and out["drift_projection"].shape == (4, 1 + 8 + 18)
    policy.save(str(tmp_path))
    again = load_policy(str(tmp_path), ["Xminus", "Xplus", "passed"])
    assert list(again.apply(logits, embeddings, stats)["decision"]) == list(out["decision"])
    assert load_policy(str(tmp_path / "none"), ["a"]) is None
    with pytest.raises(VitrayError, match="calibration was made for the labels"):
        load_policy(str(tmp_path), ["a", "b", "c"])


def test_an_anomalous_image_is_never_decided_ok_and_a_defect_stays_ng():
    policy = _policy()
    logits = np.array([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.3]])
    out = policy.apply(logits, np.zeros((4, 8)), np.zeros((4, 18)), anomalous=np.array([False, True, True, True]))
    assert list(out["decision"]) == ["ok", "review", "ng", "review"]
    assert list(out["reason"]) == [REASONS["ok"], REASONS["anomaly"], REASONS["ng"], REASONS["between"]]


def test_calibrate_writes_the_calibration_into_the_model_and_out(tiny_model, tmp_path, monkeypatch, capsys):
    import shutil

    from vitray.cli import main
    from vitray.data import synth

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a small set: calibrated in this process
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    synth.write(str(tmp_path / "val"), n=240, size=32, seed=3, passed_fraction=0.3)
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", str(model), "--data", str(tmp_path / "val"), "--out", str(out),
                 "--false-reject-rate", "0.2"]) == 0
    record = json.loads((out / "calibration.json").read_text())
    assert record == json.loads((model / "calibration.json").read_text())
    assert (model / "calibration.safetensors").is_file() and (out / "reliability.png").is_file()
    assert record["n"]["images"] == 240 and record["n"]["fit"] + record["n"]["held_out"] == 240
    assert record["ece"]["after"] <= record["ece"]["before"]
    assert record["thresholds"]["ok"] is None and "no OK threshold" in record["notes"][0]
    assert set(record["measured"]) == {"escape", "false_reject", "review"}
    assert "OK at or below" in capsys.readouterr().out
    policy = load_policy(str(model), record["labels"])
    assert policy.temperature == pytest.approx(record["temperature"])


@pytest.mark.parametrize("args,needle", [
    (["--escape-rate", "0"], "--escape-rate must be between 0 and 1"),
    (["--ok-class", "good"], "--ok-class 'good' is not one of the model's classes"),
    (["--ood-method", "knn"], "invalid choice"),
])
def test_calibrate_refuses_bad_options_in_one_line(args, needle, tiny_model, tmp_path, capsys, monkeypatch):
    from vitray.cli import main
    from vitray.data import synth

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    synth.write(str(tmp_path / "val"), n=20, size=32, seed=3, passed_fraction=0.3)
    try:
        code = main(["calibrate", "--model", tiny_model, "--data", str(tmp_path / "val"), "--out",
                     str(tmp_path / "o"), *args])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vitray")]
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not os.path.exists(os.path.join(tiny_model, "calibration.json"))


@pytest.mark.slow
def test_the_onnx_export_carries_the_calibration_and_decides_as_pytorch_does(tiny_model, tmp_path, monkeypatch):
    import shutil

    from vitray.data import synth
    from vitray.decisions.calibrate import CalibrateConfig, calibrate
    from vitray.export import ExportConfig, export_onnx
    from vitray.inference import OnnxPredictor, PredictOptions, Predictor

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    synth.write(str(tmp_path / "val"), n=240, size=32, seed=4, passed_fraction=0.3)
    calibrate(CalibrateConfig(model=str(model), data=str(tmp_path / "val"), out=str(tmp_path / "cal"),
                              false_reject_rate=0.2))
    export_onnx(ExportConfig(str(model), str(tmp_path / "model.onnx"), attention=True))
    images = np.stack([s.image for s in synth.generate(64, passed_fraction=0.3, size=32, seed=9)])
    batch = {"id": np.arange(64).astype(str).astype(object), "image": images,
             "error_kind": np.array([""] * 63 + ["corrupt"], dtype=object),
             "error": np.array([""] * 63 + ["x"], dtype=object)}
    options = PredictOptions(attention="all", decisions=True)
    torch_rows = Predictor(str(model), options)(dict(batch))
    onnx_rows = OnnxPredictor((tmp_path / "model.onnx").read_bytes(), options)(dict(batch))
    assert list(onnx_rows["decision"]) == list(torch_rows["decision"])
    assert torch_rows["decision"][-1] is None and set(torch_rows["decision"][:-1]) <= {"ok", "ng", "review"}
    assert np.allclose(onnx_rows["defect_score"][:-1], torch_rows["defect_score"][:-1], atol=1e-4)
    assert "logits" not in torch_rows and "embedding" not in onnx_rows  # only the decision columns go on


def test_night_samples_taken_piece_by_piece_merge_into_the_nights_own():
    rng = np.random.default_rng(6)
    ids = [f"cam{i % 3}/{i:05d}.png" for i in range(5000)]
    projections, scores = rng.normal(size=(5000, 8)).astype(np.float32), rng.uniform(size=5000).astype(np.float32)
    whole = NightSample(size=300)
    whole.add_keyed(sample_keys(ids), projections, scores)
    merged = NightSample(size=300)
    for start in range(0, 5000, 700):  # pieces on workers, each sending its own smallest keys
        piece = NightSample(size=300)
        piece.add_keyed(sample_keys(ids[start:start + 700]), projections[start:start + 700], scores[start:start + 700])
        merged.merge(json.loads(json.dumps(piece.summary())))
    assert merged.seen == whole.seen == 5000 and len(merged.scores) == 300
    assert np.array_equal(merged.keys, whole.keys) and np.allclose(merged.projections_array, whole.projections_array)
    assert 0.4 < np.mean(sample_keys(ids)) < 0.6


@pytest.fixture(scope="module")
def calibrated(tiny_model, tmp_path_factory):
    """The tiny model, calibrated on 240 rendered images (in this process)."""
    import shutil

    from vitray.data import synth
    from vitray.decisions.calibrate import CalibrateConfig, calibrate

    root = tmp_path_factory.mktemp("calibrated")
    shutil.copytree(tiny_model, root / "model")
    synth.write(str(root / "val"), n=240, size=32, seed=3, passed_fraction=0.3)
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        calibrate(CalibrateConfig(model=str(root / "model"), data=str(root / "val"), out=str(root / "cal"),
                                  false_reject_rate=0.2))
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    return str(root / "model")


def _night(folder, seed: int, brightness: float = 1.0, n: int = 120) -> None:
    from PIL import Image

    from vitray.data import synth

    folder.mkdir(parents=True)
    for i, sample in enumerate(synth.generate(n, passed_fraction=0.02, size=32, seed=seed)):
        pixels = np.clip(sample.image.astype(np.float32) * brightness, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def test_a_calibrated_model_decides_every_image_of_the_nightly_job(calibrated, tmp_path, monkeypatch, capsys):
    import pyarrow.csv as pacsv

    from vitray.cli import main
    from vitray.score import read_predictions

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _night(tmp_path / "night", seed=50)
    out = tmp_path / "scores"
    assert main(["score", "--model", calibrated, "--input", str(tmp_path / "night"), "--output", str(out),
                 "--attention", "all"]) == 0
    table = read_predictions(str(out)).to_table()
    assert table.num_rows == 120 and set(table.column("decision").to_pylist()) <= {"ok", "ng", "review"}
    assert None not in table.column("reason").to_pylist()
    assert all(abs(sum(p) - 1) < 1e-4 for p in table.column("probs_calibrated").to_pylist())
    (manifest,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    decisions = manifest["decisions"]
    assert sum(decisions["counts"].values()) == 120
    assert decisions["drift"]["tested"] and not decisions["drift"]["drifted"]  # the calibration's renderer
    review = decisions["review"]
    if review["images"]:
        rows = pacsv.read_csv(review["csv"]).to_pylist()
        assert len(rows) == review["images"] == decisions["counts"].get("review", 0)
        assert {r["decision"] for r in rows} == {"review"} and all(r["attention_png"] for r in rows)
    page = (out / "report.html").read_text()
    assert "Decisions (newest run)" in page and "like the calibration" in page
    assert "REVIEW" in capsys.readouterr().out

    # The same night again: nothing scored twice, nothing decided twice.
    assert main(["score", "--model", calibrated, "--input", str(tmp_path / "night"), "--output", str(out)]) == 0
    assert read_predictions(str(out)).to_table().num_rows == 120


def test_a_night_that_drifted_says_so_and_fails_the_run_when_asked(calibrated, tmp_path, monkeypatch, capsys):
    from vitray.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _night(tmp_path / "dark", seed=51, brightness=0.6)  # the light went down
    args = ["score", "--model", calibrated, "--input", str(tmp_path / "dark"), "--attention", "none"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert "drifted from the calibration's" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "b"), "--fail-on-drift"]) == 3
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("vitray")]
    assert line.startswith("vitray: error: tonight's images drifted")
    (manifest,) = [json.loads(p.read_text()) for p in (tmp_path / "b" / "runs").glob("*.json")]
    assert manifest["decisions"]["drift"]["drifted"] and manifest["counts"]["scored"] == 120  # all committed


def test_a_model_without_a_calibration_scores_as_before(tiny_model, tmp_path, monkeypatch):
    from vitray.cli import main
    from vitray.score import read_predictions

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _night(tmp_path / "night", seed=52, n=20)
    assert main(["score", "--model", tiny_model, "--input", str(tmp_path / "night"), "--output",
                 str(tmp_path / "out")]) == 0
    table = read_predictions(str(tmp_path / "out")).to_table()
    assert table.column("decision").null_count == 20
    (manifest,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")]
    assert "decisions" not in manifest
