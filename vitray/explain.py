"""`vitray explain`: attention maps for a few images, without Ray: each one's overlay with label
and score, the image as the model saw it, and the map as a .npy (the maps are `vitray.rollout`'s).
"""
from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitray.attention import register_weights_attention
from vitray.options import option
from vitray.rollout import attention_maps, check_map_options, discard_ratio_option, head_fusion_option, method_option


@dataclass(frozen=True)
class ExplainConfig:
    """`vitray explain IMAGE...`: each option once (`vitray.options`); the images are positional."""

    images: tuple[str, ...]
    model: str = option(help="trained model folder or s3:// prefix", metavar="URI", required=True,
                        doc="a trained model folder or `s3://` prefix")
    out: str = option(help="output folder or s3:// prefix", metavar="URI", required=True,
                      doc="output folder or `s3://` prefix")
    method: str = method_option()
    head_fusion: str = head_fusion_option()
    discard_ratio: float = discard_ratio_option()


def explain_images(config: ExplainConfig) -> list[dict]:
    """Attention maps for a few images, without Ray; returns one dict per image.

    Writes `OUT/<name>.png` (overlay on the image as the model saw it, with label and
    score), `OUT/<name>_input.png` (that image, enlarged for viewing) and `OUT/<name>.npy`
    (the map on the patch grid, max-normalised). `<name>` is the file's stem, made unique.
    """
    import torch

    from vitray.data.preprocess import normalize, resize_image
    from vitray.data.decode import ImageError, decode_image
    from vitray import storage
    from vitray.errors import VitrayError
    from vitray.models import load_trained
    from vitray.overlays import overlay
    from vitray.png import encode

    images, out, method = list(config.images), config.out, config.method
    head_fusion, discard_ratio = config.head_fusion, config.discard_ratio
    check_map_options(method, head_fusion, discard_ratio)
    if not images:
        raise VitrayError("explain: give at least one image")
    net, prep, labels = load_trained(config.model, attn_implementation=register_weights_attention())
    pixels = []
    for uri in images:  # every image is checked before anything is written
        try:
            pixels.append(resize_image(decode_image(storage.read_bytes(uri)), prep.size, prep.channels))
        except ImageError as exc:
            raise VitrayError(f"{uri}: {exc.kind}: {exc}") from None
    x = normalize(torch.from_numpy(np.stack(pixels)), prep.mean, prep.std)
    maps, logits = attention_maps(net, x, method=method, head_fusion=head_fusion, discard_ratio=discard_ratio)
    probs = torch.softmax(logits.float(), dim=-1)
    scores, preds = probs.max(dim=-1)
    results = []
    for uri, name, image, amap, pred, prob in zip(images, _unique_names(images), pixels, maps.numpy(),
                                                  preds.tolist(), scores.tolist()):
        label = labels[pred]
        shown = overlay(image, amap, label=label, score=prob)
        files = {"png": storage.join(out, f"{name}.png"), "input_png": storage.join(out, f"{name}_input.png"),
                 "npy": storage.join(out, f"{name}.npy")}
        storage.write_bytes(files["png"], encode(np.asarray(shown)))
        storage.write_bytes(files["input_png"], encode(np.asarray(_enlarged(image, shown.size))))
        buf = io.BytesIO()
        np.save(buf, amap.astype(np.float32))
        storage.write_bytes(files["npy"], buf.getvalue())
        results.append({"image": uri, "label": label, "score": round(float(prob), 4), **files})
    return results


def _unique_names(uris: Sequence[str]) -> list[str]:
    names, seen = [], {}
    for uri in uris:
        stem = os.path.splitext(posixpath.basename(uri.rstrip("/")))[0] or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def _enlarged(image: np.ndarray, size: tuple[int, int]) -> Any:
    from PIL import Image

    pil = Image.fromarray(image[:, :, 0], mode="L") if image.shape[2] == 1 else Image.fromarray(image, mode="RGB")
    return pil.resize(size, Image.Resampling.NEAREST)  # crisp pixels, the same size as the overlay
