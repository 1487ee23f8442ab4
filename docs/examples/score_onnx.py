"""Score images with a `vitray export` model and nothing but onnxruntime, numpy and Pillow.

    pip install onnxruntime numpy pillow
    python score_onnx.py model.onnx image.png [image2.png ...]

Prints one line per image: its name, the predicted class and its probability (and, for a
model exported with --attention, the patch the model looked at most). The graph normalises
the pixels itself; this script only resizes each image to the model's input size, as
`vitray score` does (Pillow, bilinear).
"""
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def load(path: str, size: int, channels: int) -> np.ndarray:
    """An image file as uint8 (size, size, channels)."""
    image = Image.open(path)
    image = image.convert("L" if channels == 1 or image.mode in ("L", "I;16", "I") else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if channels == 3 and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return pixels


def main(model_path: str, images: list[str]) -> None:
    engine = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = json.loads(engine.get_modelmeta().custom_metadata_map["vitray"])
    batch = np.stack([load(p, meta["size"], meta["channels"]) for p in images])
    names = [o.name for o in engine.get_outputs()]
    outputs = dict(zip(names, engine.run(None, {"images": batch})))
    for i, (path, probs) in enumerate(zip(images, outputs["probs"])):
        best = int(np.argmax(probs))
        line = f"{path}\t{meta['labels'][best]}\t{probs[best]:.4f}"
        if "attention" in outputs:  # exported with --attention: the rollout map on the patch grid
            rows, cols = meta["grid"]
            row, col = divmod(int(np.argmax(outputs["attention"][i])), cols)
            line += f"\tlooked most at patch row {row}, column {col} of {rows}x{cols}"
        print(line)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
