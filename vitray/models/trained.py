"""Trained models: loading them checked (the driver reads no weights), and exporting them in transformers' layout."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any

import pyarrow.fs as pafs
import torch
from transformers import ViTForImageClassification

from vitray import storage
from vitray.errors import VitrayError
from vitray.models.building import first_line, local_model_dir, patch_side, vit_config_dict
from vitray.models.preprocessing import CONFIG_FILE, Preprocessing, square_side

def load_trained(uri: str, attn_implementation: str = "sdpa") -> tuple[ViTForImageClassification, Preprocessing,
                                                                       list[str]]:
    """A trained classifier (folder or s3:// prefix in save_pretrained layout), its preprocessing and labels.

    Labels come in id order from config.json's id2label. The model is in eval mode.
    """
    return _load_checked(uri, attn_implementation=attn_implementation)


def describe_trained(uri: str) -> tuple[list[str], Preprocessing, int]:
    """Labels, preprocessing and patch size of a trained classifier, checked without reading its weights.

    What a driver needs before scoring; the actors load the weights. Reading them there too
    would cost vit-large's 1.2 GB and seconds for nothing: the model is built on the meta
    device, which checks every tensor's name and shape, and the safetensors headers say
    whether each file is as long as it should be.
    """
    model, prep, labels = _load_checked(uri, device_map="meta")
    return labels, prep, patch_side(model.config.patch_size)


def _load_checked(uri: str, **kwargs: Any) -> tuple[ViTForImageClassification, Preprocessing, list[str]]:
    local = local_model_dir(uri)
    config = vit_config_dict(local, uri)
    if "ViTForImageClassification" not in (config.get("architectures") or []):
        raise VitrayError(f"{uri}: not a ViTForImageClassification (architectures={config.get('architectures')})")
    _check_safetensors_lengths(local, uri)
    try:
        model, info = ViTForImageClassification.from_pretrained(local, output_loading_info=True, **kwargs)
    except RuntimeError as exc:
        if "mismatched_sizes" in str(exc):  # its details are in a table transformers logged above
            raise VitrayError(f"{uri}: the weights do not match config.json (tensor shapes differ)") from None
        raise VitrayError(f"{uri}: cannot load the model: {first_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise VitrayError(f"{uri}: cannot load the model: {first_line(exc)}") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(k[0] for k in info.get("mismatched_keys") or [])
    if missing:
        # from_pretrained would silently initialise these at random.
        raise VitrayError(f"{uri}: the weights do not match config.json (missing or mismatched: "
                          f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    prep = Preprocessing.load(local, channels=model.config.num_channels)
    prep = dataclasses.replace(prep, size=square_side(model.config.image_size, uri))
    return model.eval(), prep, labels


def _check_safetensors_lengths(folder: str, uri: str) -> None:
    """Each safetensors file at least as long as its header says (a copy cut short fails here, in one line)."""
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(length))
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError) as exc:
            raise VitrayError(f"{uri}: cannot read the weights {name}: {first_line(exc)}") from None
        end = 8 + length + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size < end:
            raise VitrayError(f"{uri}: the weights {name} are cut short ({size:,} of {end:,} bytes)")


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
