"""Figures as PNGs: the confusion matrix, the training curves, and `save_figure`, which writes any
matplotlib figure through `vitray.storage` (so OUT may be a local folder or an s3:// prefix).
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from vitray import storage
from vitray.errors import VitrayError


def plot_confusion(metrics: dict, uri: str, title: str = "") -> None:
    """PNG with the confusion matrix as counts and row-normalised (each row: where a true class went)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    labels = list(metrics["labels"])
    counts = np.asarray(metrics["confusion_matrix"], dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(labels)
    side = max(3.6, 0.62 * n + 1.6)  # inches per panel: about 0.6 in per class keeps names legible
    font = 10 if n <= 10 else 8 if n <= 20 else 6
    fig = Figure(figsize=(2 * side + 0.8, side + 0.9), layout="constrained")
    headline = f"accuracy {metrics['accuracy']:.3f}   macro-F1 {metrics['macro_f1']:.3f}"
    fig.suptitle(f"{title}\n{headline}" if title else headline, fontsize=11)
    panels = [(counts, "counts", lambda v, i: f"{int(v)}"),
              (normalised, "row-normalised (recall on the diagonal)", lambda v, i: f"{v:.0%}" if rows[i] else "-")]
    for ax, (values, name, text) in zip(fig.subplots(1, 2), panels):
        peak = values.max() if values.max() > 0 else 1.0
        ax.imshow(values, cmap="Blues", vmin=0, vmax=peak)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if n <= 50:
            ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=font)
            ax.set_yticks(range(n), labels, fontsize=font)
        if n <= 25:
            for i in range(n):
                for j in range(n):
                    # Dark text on light cells, light on dark: readable whatever the count.
                    colour = "white" if values[i, j] > 0.55 * peak else "black"
                    ax.text(j, i, text(values[i, j], i), ha="center", va="center", fontsize=font, color=colour)
    save_figure(fig, uri)


HISTORY_PANELS = [
    ("loss", [("train_loss", "train"), ("val_loss", "validation")]),
    ("validation", [("val_accuracy", "accuracy"), ("val_macro_f1", "macro-F1")]),
    ("learning rate", [("lr", "lr")]),
]


def plot_curves(history: list[dict], uri: str) -> None:
    """PNG of the training history by epoch: losses, validation accuracy/macro-F1, learning rate."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise VitrayError("plot_curves: the training history is empty")
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    for ax, (name, series) in zip(fig.subplots(1, 3, sharex=True), HISTORY_PANELS):
        for key, label in series:
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if name == "validation":
            ax.set_ylim(0, 1.02)
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if ax.lines and name != "learning rate":
            ax.legend(fontsize=9)
        if not ax.lines:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="grey")
    save_figure(fig, uri)


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one column; rows without the value (no validation set, CSV blanks) are skipped."""
    xs, ys = [], []
    for i, row in enumerate(history):
        value = _number(row.get(key))
        if value is not None:
            epoch = _number(row.get("epoch"))
            xs.append(epoch if epoch is not None else i + 1)
            ys.append(value)
    return xs, ys


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def save_figure(fig: Any, uri: str, dpi: int = 120) -> None:
    """A matplotlib figure as a PNG at a local path or s3:// URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    storage.write_bytes(uri, buf.getvalue())
