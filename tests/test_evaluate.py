"""Metrics against hand-computed values, and the plots and report a user reads."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import as_a_fresh_process_without_ray
from vitray import storage
from vitray.errors import VitrayError
from vitray.figures import plot_confusion, plot_curves
from vitray.metrics import classification_metrics, format_report

LABELS = ["passed", "Xplus", "Xminus", "Yplus"]
# 3 passed, 2 Xplus, 5 Xminus, no Yplus.
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
Y_PRED = [0, 1, 2, 1, 1, 2, 2, 2, 0, 1]


@pytest.fixture
def metrics():
    return classification_metrics(Y_TRUE, Y_PRED, LABELS)


def test_metrics_match_hand_computed_values(metrics):
    assert metrics["confusion_matrix"] == [[1, 1, 1, 0],
                                           [0, 2, 0, 0],
                                           [1, 1, 3, 0],
                                           [0, 0, 0, 0]]
    assert metrics["accuracy"] == pytest.approx(6 / 10)
    passed, xplus, xminus = (metrics["per_class"][name] for name in LABELS[:3])
    # passed: 1 of 2 "passed" predictions right, 1 of 3 passed parts found.
    assert (passed["precision"], passed["recall"], passed["f1"]) == pytest.approx((1 / 2, 1 / 3, 2 / 5))
    assert (xplus["precision"], xplus["recall"], xplus["f1"]) == pytest.approx((2 / 4, 1.0, 2 / 3))
    assert (xminus["precision"], xminus["recall"], xminus["f1"]) == pytest.approx((3 / 4, 3 / 5, 2 / 3))
    assert [metrics["per_class"][n]["support"] for n in LABELS] == [3, 2, 5, 0]
    # Macro-F1 over the three classes present: (2/5 + 2/3 + 2/3) / 3.
    assert metrics["macro_f1"] == pytest.approx(26 / 45)
    assert metrics["labels"] == LABELS


def test_a_class_absent_from_the_data_is_listed_with_zeros(metrics):
    assert metrics["per_class"]["Yplus"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    json.dumps(metrics)  # plain types, ready for metrics.json


def test_predicting_a_class_the_data_lacks_costs_recall_not_macro_average():
    m = classification_metrics([0, 0, 1], [0, 2, 1], ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["a"]["recall"] == 0.5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)


@pytest.mark.parametrize("y_true,y_pred,match", [([0, 1], [0], "2 true labels but 1 predictions"),
                                                 ([0, 4], [0, 1], "id 4 is outside"),
                                                 ([], [], "no samples")])
def test_bad_inputs_are_one_line_errors(y_true, y_pred, match):
    with pytest.raises(VitrayError, match=match):
        classification_metrics(y_true, y_pred, LABELS)


def read_png(uri):
    image = Image.open(io.BytesIO(storage.read_bytes(uri)))
    assert image.format == "PNG"
    image.load()
    return image


def test_confusion_plot_is_a_png(tmp_path, metrics):
    uri = str(tmp_path / "new" / "confusion_matrix.png")  # missing folders are created
    plot_confusion(metrics, uri, title="validation")
    width, height = read_png(uri).size
    assert width > height > 300


def history(epochs=4, with_val=True):
    return [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e if with_val else None,
             "val_accuracy": 1 - 0.5 / e if with_val else None, "val_macro_f1": 1 - 0.6 / e if with_val else None,
             "lr": 1e-3 * e / epochs, "images_per_s": 100.0} for e in range(1, epochs + 1)]


def test_curves_plot_is_a_png_also_without_validation(tmp_path):
    plot_curves(history(), str(tmp_path / "curves.png"))
    plot_curves(history(1, with_val=False), str(tmp_path / "one_epoch.png"))
    # history.csv read back gives strings, blanks where nothing was recorded.
    as_csv = [{k: "" if v is None else str(v) for k, v in row.items()} for row in history(3, with_val=False)]
    plot_curves(as_csv, str(tmp_path / "from_csv.png"))
    for name in ("curves.png", "one_epoch.png", "from_csv.png"):
        assert read_png(str(tmp_path / name)).size[0] > 1000
    with pytest.raises(VitrayError, match="empty"):
        plot_curves([], str(tmp_path / "none.png"))


@pytest.mark.s3
def test_plots_go_to_s3(s3_prefix, metrics):
    plot_confusion(metrics, storage.join(s3_prefix, "confusion_matrix.png"))
    plot_curves(history(), storage.join(s3_prefix, "curves.png"))
    for name in ("confusion_matrix.png", "curves.png"):
        assert min(read_png(storage.join(s3_prefix, name)).size) > 100, name


def test_report_lists_every_class_and_the_matrix(metrics):
    report = format_report(metrics)
    lines = report.splitlines()
    for name in LABELS:
        assert sum(line.startswith(f"{name} ") for line in lines) == 2  # table row + matrix row
    assert lines[-5].split() == LABELS  # matrix header
    assert "0.600" in report and "0.578" in report  # accuracy, macro-F1
    xminus_row = [line for line in lines if line.startswith("Xminus")][-1]
    assert xminus_row.split()[1:] == ["1", "1", "3", "0"]


def test_report_accepts_metrics_read_back_from_json(metrics):
    extra = {**json.loads(json.dumps(metrics)), "params": {"total": 10, "trainable": 5}}
    assert format_report(extra) == format_report(metrics)


def test_evaluate_counts_an_undecodable_image_as_skipped(ray_session, tiny_model, tmp_path):
    from vitray.data import synth
    from vitray.evaluate import evaluate

    data = tmp_path / "data"
    synth.write(str(data), n=30, size=32, seed=5, passed_fraction=0.2, fmt="imagefolder")
    (data / "Xplus" / "cut-short.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    metrics = evaluate(tiny_model, str(data), str(tmp_path / "eval"))
    assert metrics["n"] == 30 and metrics["skipped"] == 1
    assert np.sum(metrics["confusion_matrix"]) == 30
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["n"] == 30 and (tmp_path / "eval" / "confusion_matrix.png").exists()
    assert "localization" not in saved  # an image folder has no boxes


def test_evaluate_scores_the_maps_against_the_boxes_of_the_data(ray_session, tiny_model, tmp_path, monkeypatch):
    from vitray.data import synth
    from vitray.data.sources import inspect_source
    from vitray.evaluate import evaluate

    data = tmp_path / "data"
    synth.write(str(data), n=40, size=32, seed=6, passed_fraction=0.1, fmt="parquet")
    metrics = evaluate(tiny_model, str(data), str(tmp_path / "eval"), batch_size=16, in_process_max=0)
    assert metrics["n"] == 40 and metrics["skipped"] == 0
    where = metrics["localization"]
    source = inspect_source(str(data), None)
    defects = int((source.row_labels != source.labels.index("passed")).sum())
    assert where["method"] == "rollout" and where["images"] == defects  # every defect image, whatever predicted
    assert 0.0 <= where["pointing_game"] <= 1.0 and 0.0 <= where["energy_in_box"] <= 1.0
    # With no cluster named, so small a set is evaluated in this process, to the same figures.
    as_a_fresh_process_without_ray(monkeypatch)
    here = evaluate(tiny_model, str(data), str(tmp_path / "here"), batch_size=16)
    assert here["confusion_matrix"] == metrics["confusion_matrix"] and here["n"] == 40
    assert here["localization"] == pytest.approx(where, abs=1e-4)
