"""Trained models: loading them checked (the driver reads no weights), and exporting them in transformers' layout."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
from typing import Any

import pyarrow.fs as pafs
import torch
from transformers import ViTConfig, ViTForImageClassification

from vitray import storage
from vitray.errors import VitrayError
from vitray.models.building import OFFLINE_LOAD, first_line, local_model_dir, patch_side, vit_config_dict
from vitray.models.preprocessing import CONFIG_FILE, Preprocessing, square_side
from vitray.versions import MODEL_LIBRARIES, version_note

def load_trained(uri: str, attn_implementation: str = "sdpa") -> tuple[ViTForImageClassification, Preprocessing,
                                                                       list[str]]:
    """A trained classifier (folder or s3:// prefix in save_pretrained layout), its preprocessing and labels.

    Labels come in id order from config.json's id2label. The model is in eval mode.
    """
    return _load_checked(uri, attn_implementation=attn_implementation)


def describe_trained(uri: str) -> tuple[list[str], Preprocessing, int]:
    """Labels, preprocessing and patch size of a trained classifier, checked without reading its weights.

    What a driver needs before scoring; the actors load the weights. Reading them there too
    would cost vit-large's 1.2 GB and seconds for nothing. The model is built from its config on
    PyTorch's meta device (no memory, no loading path of transformers) and its tensors are
    checked against the weight files' own headers: the safetensors header (whose lengths also
    tell a file cut short) or the table of a PyTorch file.
    """
    local = local_model_dir(uri)
    config = _classifier_config(local, uri)
    stored = _stored_shapes(local, uri)
    try:
        vit_config = ViTConfig.from_dict(config)
        with torch.device("meta"):
            model = ViTForImageClassification(vit_config)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise VitrayError(f"{uri}: config.json does not describe a model: {first_line(exc)}"
                          f"{version_note('transformers')}") from None
    _check_same_tensors([tuple(t.shape) for t in model.state_dict().values()], list(stored.values()), uri)
    labels = [vit_config.id2label[i] for i in range(vit_config.num_labels)]
    return labels, _preprocessing(local, vit_config, uri), patch_side(vit_config.patch_size)


def _load_checked(uri: str, **kwargs: Any) -> tuple[ViTForImageClassification, Preprocessing, list[str]]:
    local = local_model_dir(uri)
    _classifier_config(local, uri)
    _stored_shapes(local, uri)
    try:
        model, info = ViTForImageClassification.from_pretrained(local, output_loading_info=True,
                                                                **OFFLINE_LOAD, **kwargs)
    except RuntimeError as exc:
        if "mismatched_sizes" in str(exc):  # its details are in a table transformers logged above
            raise VitrayError(f"{uri}: the weights do not match config.json (tensor shapes differ)") from None
        raise VitrayError(f"{uri}: cannot load the model: {first_line(exc)}{version_note(*MODEL_LIBRARIES)}") \
            from None
    except (OSError, ValueError) as exc:
        raise VitrayError(f"{uri}: cannot load the model: {first_line(exc)}{version_note(*MODEL_LIBRARIES)}") \
            from None
    missing = sorted(info.get("missing_keys") or []) + sorted(k[0] for k in info.get("mismatched_keys") or [])
    if missing:
        # from_pretrained would silently initialise these at random.
        raise VitrayError(f"{uri}: the weights do not match config.json (missing or mismatched: "
                          f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model.eval(), _preprocessing(local, model.config, uri), labels


def _classifier_config(local: str, uri: str) -> dict[str, Any]:
    config = vit_config_dict(local, uri)
    if "ViTForImageClassification" not in (config.get("architectures") or []):
        raise VitrayError(f"{uri}: not a ViTForImageClassification (architectures={config.get('architectures')})")
    return config


def _preprocessing(local: str, config: ViTConfig, uri: str) -> Preprocessing:
    prep = Preprocessing.load(local, channels=config.num_channels)
    return dataclasses.replace(prep, size=square_side(config.image_size, uri))


def _check_same_tensors(expected: list[tuple[int, ...]], stored: list[tuple[int, ...]], uri: str) -> None:
    """The stored tensors are the ones the config describes: as many values, and the same shapes.

    Names are not compared: transformers renames a model's modules between releases and maps
    the stored names when it loads (ViT's `encoder.layer.N.attention.attention.query` is
    `layers.N.attention.q_proj` in transformers 5.25), and a release may fuse tensors; the
    count of values and, tensor for tensor, the shapes do not depend on either.
    """
    want, have = sum(map(math.prod, expected)), sum(map(math.prod, stored))
    same_shapes = len(expected) != len(stored) or sorted(expected) == sorted(stored)
    if want != have or not same_shapes:
        raise VitrayError(f"{uri}: the weights do not match config.json (the weights hold {have:,} values in "
                          f"{len(stored)} tensors, config.json describes {want:,} in {len(expected)})")


def _stored_shapes(folder: str, uri: str) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's name and shape, read from the weight files' headers (no tensor data).

    Each safetensors file must be at least as long as its header says: a copy cut short fails
    here, in one line. PyTorch files are read on the meta device, which maps no data.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    names = sorted(os.listdir(folder))
    for name in names:
        path = os.path.join(folder, name)
        # transformers' weight files (model.safetensors, model-00001-of-00002.safetensors); a folder
        # may hold others beside them (a calibration's tensors).
        if name.startswith("model") and name.endswith(".safetensors"):
            shapes.update(_safetensors_shapes(path, name, uri))
    if not shapes:
        for name in (n for n in names if n.endswith(".bin")):
            try:
                table = torch.load(os.path.join(folder, name), map_location="meta", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
                raise VitrayError(f"{uri}: cannot read the weights {name}: {first_line(exc)}") from None
            shapes.update({k: tuple(v.shape) for k, v in table.items() if isinstance(v, torch.Tensor)})
    if not shapes:
        raise VitrayError(f"{uri}: no weights (no .safetensors or pytorch_model.bin file beside config.json)")
    return shapes


def _safetensors_shapes(path: str, name: str, uri: str) -> dict[str, tuple[int, ...]]:
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
            size = os.fstat(f.fileno()).st_size
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = 8 + length + max((v["data_offsets"][1] for v in tensors.values()), default=0)
        shapes = {k: tuple(int(n) for n in v["shape"]) for k, v in tensors.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise VitrayError(f"{uri}: cannot read the weights {name}: {first_line(exc)}") from None
    if size < end:
        raise VitrayError(f"{uri}: the weights {name} are cut short ({size:,} of {end:,} bytes)")
    return shapes


def export_model(model: torch.nn.Module, prep: Preprocessing, uri: str) -> None:
    """Save a plain `ViTForImageClassification` + its preprocessing to a folder or s3:// prefix.

    LoRA adapters are merged (into a copy: the model being trained is left as it is), DDP and
    torch.compile wrappers are removed. config.json is written last, so a reader never takes a
    half-written folder for a model.
    """
    plain = _plain_model(model)
    with tempfile.TemporaryDirectory(prefix="vitray-export-") as tmp:
        plain.save_pretrained(tmp)
        prep.save(tmp)
        dest = storage.resolve(uri)
        names = sorted(os.listdir(tmp), key=lambda n: (n == CONFIG_FILE, n))
        try:
            dest.fs.create_dir(dest.path, recursive=True)
            for name in names:
                pafs.copy_files(os.path.join(tmp, name), dest.child(name).path,
                                source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)
        except OSError as exc:
            raise VitrayError(storage.describe_error(uri, exc)) from None


def _plain_model(model: torch.nn.Module) -> ViTForImageClassification:
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            break
    peft = sys.modules.get("peft")  # a PeftModel exists only where peft was imported
    if peft is not None and isinstance(model, peft.PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    if not isinstance(model, ViTForImageClassification):
        raise VitrayError(f"export: expected a ViTForImageClassification, got {type(model).__name__}")
    return model
