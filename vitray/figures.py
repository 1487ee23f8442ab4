"""Figures as PNGs: the confusion matrix, the training and pre-training curves, an MAE's
reconstructions, and `save_figure`, which writes any matplotlib figure through `vitray.storage`
(so OUT may be a local folder or an s3:// prefix).
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


def plot_pretrain_curves(history: list[dict[str, Any]], uri: str) -> None:
    """Pre-training's curves.png: the reconstruction losses, the learning rate and the throughput by epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    losses, rate, speed = fig.subplots(1, 3, sharex=True)
    losses.plot(epochs, [row["loss"] for row in history], marker="o", markersize=3, label="train")
    losses.plot(epochs, [row["val_loss"] for row in history], marker="o", markersize=3, label="validation")
    losses.legend(fontsize=9)
    rate.plot(epochs, [row["lr"] for row in history], marker="o", markersize=3)
    rate.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    speed.plot(epochs, [row["images_per_s"] for row in history], marker="o", markersize=3)
    titles = ("masked-patch reconstruction loss", "learning rate", "images per second")
    for ax, title in zip((losses, rate, speed), titles):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    save_figure(fig, uri)


def plot_reconstructions(mae: Any, images: np.ndarray, prep: Any, uri: str, seed: int = 0) -> None:
    """Pre-training's reconstructions.png: a row per image (uint8 NHWC): the image, what the encoder saw, the reconstruction.

    The reconstruction shows the visible patches as they were and the decoder's prediction in the
    masked ones. A model trained on normalised patches (norm_pix_loss) predicts each patch's
    pattern, not its brightness and contrast: those are taken from the true patch to show it, as
    MAE's own visualisation does.
    """
    import torch
    from matplotlib.figure import Figure

    from vitray.data.preprocess import normalize
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)), prep.mean, prep.std)
    target = mae.patchify(x)
    with torch.inference_mode():
        scores = torch.rand(len(x), target.shape[1], generator=torch.Generator().manual_seed(seed))
        out = mae(pixel_values=x, noise=scores)
    predicted = out.logits.float()
    if mae.config.norm_pix_loss:
        predicted = predicted * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    hidden = out.mask.unsqueeze(-1)  # 1 where masked
    grey = torch.tensor([(0.5 - m) / s for m, s in zip(prep.mean, prep.std)]).repeat(target.shape[-1] // prep.channels)
    panels = {"image": target, f"masked ({mae.config.mask_ratio:.0%})": target * (1 - hidden) + grey * hidden,
              "reconstruction": target * (1 - hidden) + predicted * hidden}
    mean = torch.tensor(prep.mean).view(1, -1, 1, 1)
    std = torch.tensor(prep.std).view(1, -1, 1, 1)
    fig = Figure(figsize=(1.9 * len(panels), 1.9 * len(x)), layout="constrained")
    axes = fig.subplots(len(x), len(panels), squeeze=False)
    for col, (title, patches) in enumerate(panels.items()):
        pixels = (mae.unpatchify(patches, x.shape[-2:]) * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        for row, ax in enumerate(axes[:, col]):
            grey_image = pixels.shape[-1] == 1
            ax.imshow(pixels[row, ..., 0] if grey_image else pixels[row], cmap="gray" if grey_image else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
        axes[0, col].set_title(title, fontsize=10)
    if mae.config.norm_pix_loss:
        fig.suptitle("masked patches: the predicted pattern at the true patch's mean and contrast", fontsize=7)
    save_figure(fig, uri)
