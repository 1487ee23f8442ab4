"""`vitray export`: a trained model as one ONNX graph that takes what a camera gives.

The graph's input is `images`, uint8 (batch, size, size, channels) at the model's input
size (resizing stays outside: see docs/export.md); the model's own normalisation is inside
the graph, so an ONNX runtime scores exactly as `vitray score` does. Its outputs are
`probs` (batch, classes) and, exported with `attention=True`, `attention` (batch,
rows*cols): the attention rollout map (head fusion mean, no discard) that `vitray score`
and `vitray explain` draw by default; then `logits` and `embedding` (the classifier's input),
what a calibrated model decides from. The labels and the preprocessing travel in the
model's metadata (`vitray` key, JSON), and so does a calibration made by `vitray calibrate`
(`vitray_calibration`: its two files). The batch dimension is dynamic.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

from vitray import storage
from vitray.errors import VitrayError
from vitray.options import option, positive_int

METADATA_KEY = "vitray"
CALIBRATION_KEY = "vitray_calibration"
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportConfig:
    """`vitray export`: each option once (`vitray.options`)."""

    model: str = option(help="trained model folder or s3:// prefix", metavar="URI", required=True,
                        doc="a trained model folder or `s3://` prefix")
    out: str = option(help="the .onnx file to write (local or s3://)", metavar="FILE.onnx", required=True,
                      doc="the file to write (local or `s3://`)")
    attention: bool = option(False, "also output the attention rollout map (head fusion mean, no discard)")
    opset: int = option(DEFAULT_OPSET, "the ONNX opset", parse=positive_int, metavar="N")


def export_onnx(config: ExportConfig) -> dict:
    """Export `config.model` to `config.out` (.onnx, local or s3://); returns its metadata."""
    model_uri, out_uri, attention, opset = config.model, config.out, config.attention, config.opset
    if not out_uri.endswith(".onnx"):
        raise VitrayError(f"--out {out_uri}: name the file .onnx")
    _require_onnx()
    import torch

    from vitray.attention import register_weights_attention
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
        outputs = ["probs", "attention", "logits", "embedding"] if attention else ["probs", "logits", "embedding"]
        torch.onnx.export(graph, (example,), path, input_names=["images"], output_names=outputs,
                          dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
                          opset_version=opset or DEFAULT_OPSET, dynamo=False)
        _add_metadata(path, metadata, _calibration_of(model_uri))
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
            export_onnx(ExportConfig(model_uri, os.path.join(d, "model.onnx"), attention=maps))
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


def _add_metadata(path: str, metadata: dict, calibration: str | None = None) -> None:
    import onnx

    model = onnx.load(path)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    if calibration is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = CALIBRATION_KEY, calibration
    onnx.save(model, path)


def _calibration_of(model_uri: str) -> str | None:
    """The model folder's calibration (vitray.decisions.policy) as one JSON string, or None."""
    import base64

    from vitray.decisions.policy import CALIBRATION_FILE, TENSORS_FILE

    record, tensors = storage.join(model_uri, CALIBRATION_FILE), storage.join(model_uri, TENSORS_FILE)
    if not storage.exists(record):
        return None
    return json.dumps({CALIBRATION_FILE: storage.read_bytes(record).decode("utf-8"),
                       TENSORS_FILE: base64.b64encode(storage.read_bytes(tensors)).decode("ascii")})


def calibration_files(data: bytes) -> dict[str, bytes] | None:
    """The calibration an exported model carries, as the two files `vitray calibrate` wrote; None without one."""
    import base64

    import onnx

    from vitray.decisions.policy import CALIBRATION_FILE, TENSORS_FILE

    found = {p.key: p.value for p in onnx.load_model_from_string(data).metadata_props}
    if CALIBRATION_KEY not in found:
        return None
    packed = json.loads(found[CALIBRATION_KEY])
    return {CALIBRATION_FILE: packed[CALIBRATION_FILE].encode("utf-8"),
            TENSORS_FILE: base64.b64decode(packed[TENSORS_FILE])}


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

    from vitray.rollout import forward_with_attentions, rollout

    class CameraModel(torch.nn.Module):
        """uint8 NHWC images in; probabilities (and the rollout map) out, normalised inside."""

        def __init__(self, model: Any, mean: Any, std: Any, attention: bool) -> None:
            super().__init__()
            self.model, self.attention = model, attention
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
            self._embedding: list[Any] = []
            # The classifier's input: the embedding a calibration's decisions work from.
            model.classifier.register_forward_hook(lambda module, inputs, output: self._embedding.append(inputs[0]))

        def forward(self, images: Any) -> Any:
            x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
            self._embedding.clear()
            if not self.attention:
                logits = self.model(pixel_values=x).logits
                return torch.softmax(logits, dim=-1), logits, self._embedding[-1]
            logits, attentions = forward_with_attentions(self.model, x)
            return torch.softmax(logits, dim=-1), rollout(attentions, "mean", 0.0), logits, self._embedding[-1]

    return CameraModel


def _CameraModel(*args: Any) -> Any:  # noqa: N802 - a class made on first use (torch is imported lazily)
    return _camera_model_class()(*args)
