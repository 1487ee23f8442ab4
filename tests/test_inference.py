"""The scoring actor's model call: a CPU batch run in chunks answers as the whole batch would."""
from __future__ import annotations

import numpy as np
import pytest

from vitray.inference import PredictOptions, Predictor


@pytest.mark.parametrize("attention", ["none", "all", "defects"])
def test_a_batch_in_cpu_chunks_scores_as_one_pass(tiny_model, attention) -> None:
    images = np.random.default_rng(0).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    chunked = Predictor(tiny_model, PredictOptions(attention=attention))
    chunked.forward_chunk, chunked.map_chunk = 4, 3  # several chunks and a ragged last one
    whole = Predictor(tiny_model, PredictOptions(attention=attention))
    whole.forward_chunk = whole.map_chunk = None

    got, expected = chunked({"image": images}), whole({"image": images})
    assert np.array_equal(got["pred"], expected["pred"])
    np.testing.assert_allclose(got["probs"], expected["probs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["attention"], expected["attention"], rtol=1e-5, atol=1e-6)
    assert np.isnan(got["attention"]).all() == (attention == "none")
