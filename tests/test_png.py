"""The one PNG encoder (overlays, synth, explain): what it writes decodes to exactly the array it was given."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vitray.png import encode


@pytest.mark.parametrize("shape", [(64, 64, 3), (1, 1, 3), (5, 17, 3), (224, 224, 3), (9, 7), (28, 28, 1), (1, 1, 1)])
def test_png_decodes_to_the_same_pixels(shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    with Image.open(io.BytesIO(encode(pixels))) as image:
        assert image.format == "PNG" and image.mode == ("RGB" if shape[-1] == 3 else "L")
        image.load()  # checks the CRCs and the deflate stream
        np.testing.assert_array_equal(np.asarray(image), pixels.reshape(image.height, image.width, -1).squeeze(-1)
                                      if image.mode == "L" else pixels)


def test_smooth_images_compress() -> None:
    ramp = np.broadcast_to(np.arange(128, dtype=np.uint8)[None, :, None], (128, 128, 3)).copy()
    assert len(encode(ramp)) < ramp.nbytes / 20


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 2), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros(8, np.uint8),
                                 np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)])
def test_other_arrays_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode(bad)
