"""The figures a user reads: the confusion matrix and the training curves, as PNGs on disk or S3."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from vitray import storage
from vitray.errors import VitrayError
from vitray.figures import plot_confusion, plot_curves
from vitray.metrics import classification_metrics

@pytest.fixture
def metrics():
    return classification_metrics([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2], ["passed", "Xplus", "Xminus"])


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
