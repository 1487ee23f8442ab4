"""`vitray export`: a trained model as one ONNX graph that takes what a camera gives.

The graph's input is `images`, uint8 (batch, size, size, channels) at the model's input
size (resizing stays outside: see docs/export.md); the model's own normalisation is inside
the graph, so an ONNX runtime scores exactly as `vitray score` does. Its outputs are
`probs` (batch, classes) and, exported with `attention=True`, `attention` (batch,
rows*cols): the attention rollout map (head fusion mean, no discard) that `vitray score`
and `vitray explain` draw by default. The labels and the preprocessing travel in the
model's metadata (`vitray` key, JSON). The batch dimension is dynamic.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Any

from vitray import storage
from vitray.errors import VitrayError

METADATA_KEY = "vitray"
DEFAULT_OPSET = 18


def export_onnx(model_uri: str, out_uri: str, attention: bool = False, opset: int | None = None) -> dict:
    """Export the model at `model_uri` to `out_uri` (.onnx, local or s3://); returns its metadata."""
    if not out_uri.endswith(".onnx"):
        raise VitrayError(f"--out {out_uri}: name the file .onnx")
    _require_onnx()
    import torch

    from vitray.explain import register_weights_attention
    from vitray.models import load_trained

    storage.check_output(os.path.dirname(out_uri.rstrip("/")) or ".", "--out")
    model, prep, labels = load_trained(model_uri, attn_implementation=register_weights_attention("mean")
                                       if attention else "eager")
    graph = _CameraModel(model, prep.mean, prep.std, attention).eval()
    example = torch.zeros((2, prep.size, prep.size, prep.channels), dtype=torch.uint8)
    metadata = {"labels": labels, "size": prep.size, "channels": prep.channels, "mean": list(prep.mean),
                "std": list(prep.std), "input": "uint8 NHWC", "attention": "rollout" if attention else None,
                "grid": list(_grid(model.config))}
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        path = os.path.join(d, "model.onnx")
        # The TorchScript exporter (dynamo=False): one self-contained file and a batch axis marked
        # dynamic by name; the dynamo exporter asks for onnxscript's optimiser at every export.
        # Its tracer warns of Python checks on shapes (image size, grid): fixed in a graph of one
        # input size, and the batch axis takes no part in them.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(graph, (example,), path, input_names=["images"],
                          output_names=["probs", "attention"] if attention else ["probs"],
                          dynamic_axes={"images": {0: "batch"}, "probs": {0: "batch"},
                                        **({"attention": {0: "batch"}} if attention else {})},
                          opset_version=opset or DEFAULT_OPSET, dynamo=False)
        _add_metadata(path, metadata)
        with open(path, "rb") as f:
            storage.write_bytes(out_uri, f.read())
    return metadata


def onnx_model(model_uri: str, maps: bool) -> tuple[list[str], Any, tuple[int, int], bytes]:
    """Labels, preprocessing, patch grid and ONNX bytes for `vitray score --engine onnx`.

    An .onnx `model_uri` is read as it is (it must carry maps when `maps`); a trained model
    folder is exported here, with the maps' output when `maps`.
    """
    from vitray.models import Preprocessing

    _require_onnx()
    if model_uri.endswith(".onnx"):
        storage.require(model_uri, "--model")
        data = storage.read_bytes(model_uri)
    else:
        with tempfile.TemporaryDirectory() as d:
            export_onnx(model_uri, os.path.join(d, "model.onnx"), attention=maps)
            with open(os.path.join(d, "model.onnx"), "rb") as f:
                data = f.read()
    meta = metadata_of(data, model_uri)
    if maps and meta.get("attention") != "rollout":
        raise VitrayError(f"{model_uri} was exported without maps: export it with --attention, or score "
                          "with --attention none")
    prep = Preprocessing(int(meta["size"]), int(meta["channels"]), tuple(meta["mean"]), tuple(meta["std"]))
    return list(meta["labels"]), prep, tuple(meta["grid"]), data


def metadata_of(data: bytes, where: str) -> dict:
    """The labels and preprocessing an exported model (its bytes) carries."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's errors have no common base worth naming
        raise VitrayError(f"{where}: not an ONNX model ({str(exc).splitlines()[0][:120]})") from None
    found = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in found:
        raise VitrayError(f"{where}: not a vitray export (no '{METADATA_KEY}' metadata)")
    return json.loads(found[METADATA_KEY])


def read_metadata(uri: str) -> dict:
    """The labels and preprocessing of an exported model file (local or s3://)."""
    return metadata_of(storage.read_bytes(uri), uri)


def _add_metadata(path: str, metadata: dict) -> None:
    import onnx

    model = onnx.load(path)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(model, path)


def _require_onnx() -> None:
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise VitrayError(f"ONNX needs {' and '.join(missing)}: pip install 'vitray[deploy]'")


def _grid(config: Any) -> tuple[int, int]:
    side = config.image_size // (config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0])
    return side, side


def _camera_model_class() -> type:
    import torch

    from vitray.explain import _forward, rollout

    class CameraModel(torch.nn.Module):
        """uint8 NHWC images in; probabilities (and the rollout map) out, normalised inside."""

        def __init__(self, model: Any, mean: Any, std: Any, attention: bool) -> None:
            super().__init__()
            self.model, self.attention = model, attention
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, images: Any) -> Any:
            x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
            if not self.attention:
                return torch.softmax(self.model(pixel_values=x).logits, dim=-1)
            logits, attentions = _forward(self.model, x)
            return torch.softmax(logits, dim=-1), rollout(attentions, "mean", 0.0)

    return CameraModel


def _CameraModel(*args: Any) -> Any:  # noqa: N802 - a class made on first use (torch is imported lazily)
    return _camera_model_class()(*args)
