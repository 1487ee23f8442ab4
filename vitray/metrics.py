"""Classification metrics: accuracy, macro-F1, the per-class report and confusion matrix, and the
image AUROC of an anomaly score. The metric dict is the one `metrics.json` and `evaluation.json`
hold; the training workers, `evaluate` and the benchmarks compute it here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vitray.errors import VitrayError


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: list[str],
                           sample_weight: Sequence[float] | None = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (scikit-learn's).

    Ids index `labels`. Every label gets a per-class row, also one absent from the data (support 0);
    a ratio with a zero denominator counts as 0.0. Macro-F1 averages over the classes that occur
    in `y_true` (support > 0): a class the data does not contain says nothing about the model, and
    counting it as F1 0 would punish an evaluation set for leaving a class out. Predictions of such
    a class still cost the true classes their recall. `sample_weight` counts each pair that often.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    true = np.asarray(y_true, dtype=np.int64).ravel()
    pred = np.asarray(y_pred, dtype=np.int64).ravel()
    weight = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).ravel()
    n = len(labels)
    if true.shape != pred.shape:
        raise VitrayError(f"metrics: {true.size} true labels but {pred.size} predictions")
    total = true.size if weight is None else float(weight.sum())
    if total == 0:
        raise VitrayError("metrics: no samples to evaluate")
    for name, ids in (("true label", true), ("prediction", pred)):
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size:
            raise VitrayError(f"metrics: {name} id {int(bad[0])} is outside the {n} classes {labels}")
    ids = np.arange(n)
    confusion = np.rint(confusion_matrix(true, pred, labels=ids, sample_weight=weight)).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=ids, sample_weight=weight, zero_division=0.0)
    present = support > 0
    return {
        "accuracy": float(np.trace(confusion) / total),
        "macro_f1": float(f1[present].mean()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(round(support[i]))}
            for i, name in enumerate(labels)
        },
        "confusion_matrix": confusion.tolist(),
        "labels": list(labels),
    }


def metrics_from_confusion(counts: np.ndarray, labels: list[str]) -> dict:
    """`classification_metrics` of a (true, predicted) count matrix, such as workers add up."""
    counts = np.asarray(counts)
    true, pred = np.indices(counts.shape)
    return classification_metrics(true.ravel(), pred.ravel(), labels, sample_weight=counts.ravel())


def format_report(metrics: dict) -> str:
    """A terminal table: per-class precision/recall/F1/support, accuracy, macro-F1, confusion matrix."""
    labels = list(metrics["labels"])
    per_class = metrics["per_class"]
    support = sum(int(per_class[name]["support"]) for name in labels)
    width = max([len(name) for name in labels] + [len("accuracy"), len("macro-F1")])
    lines = [f"{'':<{width}}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}"]
    for name in labels:
        row = per_class[name]
        lines.append(f"{name:<{width}}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['f1']:>6.3f}"
                     f"  {int(row['support']):>7d}")
    lines += ["", f"{'accuracy':<{width}}  {'':>9}  {'':>6}  {metrics['accuracy']:>6.3f}  {support:>7d}",
              f"{'macro-F1':<{width}}  {'':>9}  {'':>6}  {metrics['macro_f1']:>6.3f}  "
              f"{'(classes with support > 0)'}", "",
              "confusion matrix (rows: true class, columns: predicted class)"]
    matrix = metrics["confusion_matrix"]
    cells = [max(len(name), *(len(str(int(row[j]))) for row in matrix)) for j, name in enumerate(labels)]
    lines.append(f"{'':<{width}}  " + "  ".join(f"{name:>{w}}" for name, w in zip(labels, cells)))
    for name, row in zip(labels, matrix):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{int(v):>{w}d}" for v, w in zip(row, cells)))
    return "\n".join(lines)




def anomaly_metrics(label: np.ndarray, score: np.ndarray, pointing: np.ndarray, energy: np.ndarray,
                    labels: list[str], good: int, threshold: float) -> dict:
    """Image AUROC (all defects; each kind), rates at the threshold, map localisation on the defects."""
    from sklearn.metrics import roc_auc_score

    defect = label != good
    if defect.all() or not defect.any():
        raise VitrayError("anomaly evaluation needs both good images and defect images")
    kinds = {}
    for i, name in enumerate(labels):
        mine = label == i
        if i == good or not mine.any():
            continue
        pick = mine | ~defect
        kinds[name] = {"images": int(mine.sum()), "auroc": round(float(roc_auc_score(defect[pick], score[pick])), 4),
                       "detected": round(float((score[mine] > threshold).mean()), 4)}
    boxed = defect & ~np.isnan(pointing)
    return {
        "images": int(len(label)), "good": int((~defect).sum()), "defects": int(defect.sum()),
        "auroc": round(float(roc_auc_score(defect, score)), 4),
        "threshold": float(threshold),
        "false_reject_rate": round(float((score[~defect] > threshold).mean()), 4),
        "detection_rate": round(float((score[defect] > threshold).mean()), 4),
        "per_kind": kinds,
        "localization": {
            "images": int(boxed.sum()),
            "pointing_game": round(float(pointing[boxed].mean()), 4) if boxed.any() else None,
            "energy_in_box": round(float(energy[boxed].mean()), 4) if boxed.any() else None,
        },
    }
