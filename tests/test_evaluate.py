"""`vitray evaluate` on a trained model: what it counts as skipped, and its maps against the data's boxes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import as_a_fresh_process_without_ray


def test_evaluate_counts_an_undecodable_image_as_skipped(ray_session, tiny_model, tmp_path):
    from vitray.data import synth
    from vitray.evaluate import EvaluateConfig, evaluate

    data = tmp_path / "data"
    synth.write(str(data), n=30, size=32, seed=5, passed_fraction=0.2, fmt="imagefolder")
    (data / "Xplus" / "cut-short.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    metrics = evaluate(EvaluateConfig(str(data), str(tmp_path / "eval"), model=tiny_model))
    assert metrics["n"] == 30 and metrics["skipped"] == 1
    assert np.sum(metrics["confusion_matrix"]) == 30
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["n"] == 30 and (tmp_path / "eval" / "confusion_matrix.png").exists()
    assert "localization" not in saved  # an image folder has no boxes


def test_evaluate_scores_the_maps_against_the_boxes_of_the_data(ray_session, tiny_model, tmp_path, monkeypatch):
    from vitray.data import synth
    from vitray.data.sources import inspect_source
    from vitray.evaluate import EvaluateConfig, evaluate

    data = tmp_path / "data"
    synth.write(str(data), n=40, size=32, seed=6, passed_fraction=0.1, fmt="parquet")
    metrics = evaluate(EvaluateConfig(str(data), str(tmp_path / "eval"), model=tiny_model, batch_size=16, in_process_max=0))
    assert metrics["n"] == 40 and metrics["skipped"] == 0
    where = metrics["localization"]
    source = inspect_source(str(data), None)
    defects = int((source.row_labels != source.labels.index("passed")).sum())
    assert where["method"] == "rollout" and where["images"] == defects  # every defect image, whatever predicted
    assert 0.0 <= where["pointing_game"] <= 1.0 and 0.0 <= where["energy_in_box"] <= 1.0
    # With no cluster named, so small a set is evaluated in this process, to the same figures.
    as_a_fresh_process_without_ray(monkeypatch)
    here = evaluate(EvaluateConfig(str(data), str(tmp_path / "here"), model=tiny_model, batch_size=16))
    assert here["confusion_matrix"] == metrics["confusion_matrix"] and here["n"] == 40
    assert here["localization"] == pytest.approx(where, abs=1e-4)
