"""Classification metrics against hand-computed values, and the terminal report a user reads."""
from __future__ import annotations

import json

import pytest

from vitray.errors import VitrayError
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
