"""A classifier to train: a from-scratch preset sized for the data, or pretrained weights with a new head."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import pyarrow.fs as pafs
import torch
from transformers import PretrainedConfig, ViTConfig, ViTForImageClassification
from transformers.image_processing_base import ImageProcessingMixin
from transformers.utils import logging as hf_logging

from vitray import storage
from vitray.errors import VitrayError
from vitray.models.preprocessing import CONFIG_FILE, Preprocessing, square_side
from vitray.models.specs import DEFAULT_PRESET, PRESETS, source_kind
from vitray.versions import MODEL_LIBRARIES, version_note

# Per-shard "Loading weights" / "Writing model shards" bars, once per actor and export, are noise
# in a batch job's log (and interleave across Ray workers).
hf_logging.disable_progress_bar()

# transformers 5.25 replaces layers by kernels fetched from the Hugging Face Hub while loading,
# unless told not to. A batch job on an offline cluster cannot fetch them, and a model should
# compute the same on every node whatever the Hub serves that day: vitray loads without them.
OFFLINE_LOAD: dict[str, Any] = {"use_kernels": False}

MAX_PATCH = 16
MIN_GRID = 7
TINY_INPUT = 16  # from-scratch models see images under this side upsampled...
UPSAMPLED_INPUT = 32  # ...to this one


def input_size_for(native: int) -> int:
    """The input side of a from-scratch model for data whose images are `native` px.

    Images under 16 px are upsampled to 32 (bilinear, as at score time), which with 4 px
    patches gives an 8x8 grid. On scikit-learn's 8x8 digits with the same rotation/zoom
    augmentation: native 8 px with 2 px patches 96.7%, upsampled to 16 px with 2 px patches
    98.9%, to 32 px with 4 px patches 99.2% (docs/benchmarks.md); the turns and zooms also
    get sub-pixel room.
    """
    return UPSAMPLED_INPUT if int(native) < TINY_INPUT else int(native)


def auto_patch_size(image_size: int) -> int:
    """The largest patch size of at most 16 px that divides `image_size` and leaves >= 7 patches a side.

    So small images get a grid of about 7-8 per side (28 -> 4, 32 -> 4, 64 -> 8) and large
    ones the usual 16 px patches (224 -> 16, 14x14 grid). Tiny even images (under 16 px,
    such as scikit-learn's 8x8 digits) take 2 px patches: on those digits that reached
    96.4% where 1 px patches reached 94.7% (docs/benchmarks.md). Sizes whose only
    divisors force a much finer grid than 16 px patches would (a prime such as 227) are
    refused: their token count would explode.
    """
    if image_size < 1:
        raise VitrayError(f"image size {image_size}: must be a positive number of pixels")
    if 4 <= image_size < 16 and image_size % 2 == 0:
        return 2
    patch = max(p for p in range(1, MAX_PATCH + 1)
                if image_size % p == 0 and (image_size // p >= MIN_GRID or p == 1))
    grid = image_size // patch
    if grid > max(32, -(-image_size // MAX_PATCH)):
        better = max(MAX_PATCH, round(image_size / MAX_PATCH) * MAX_PATCH)
        raise VitrayError(f"image size {image_size}: no patch size up to {MAX_PATCH} px divides it into a "
                          f"usable grid ({grid}x{grid} patches); use a size such as {better}")
    return patch


def build_model(spec: str | None, labels: list[str], image_size: int | None = None, channels: int = 3,
                attn_implementation: str = "sdpa") -> tuple[ViTForImageClassification, Preprocessing]:
    """A classifier for `labels` and its preprocessing, from a preset, a folder/URI or a hub id.

    - None: the default preset (vit-tiny) sized for the data (`image_size`, `channels`).
    - A preset name: that preset with image size, patch size and channels set for the data.
    - A local folder, file:// or s3:// prefix, or a hub id ("org/name"): pretrained weights with a
      new head for `labels`. A pretrained model keeps its own input size and channel count (the data
      are resized/converted to them), so `image_size` and `channels` do not apply to it.
    """
    id2label, label2id = _label_maps(labels)
    kind = source_kind(spec)
    if kind == "preset":
        return _build_preset(spec or DEFAULT_PRESET, id2label, label2id, image_size, channels, attn_implementation)
    if kind == "hub":
        return _build_from_hub(spec, id2label, label2id, attn_implementation)
    local = local_model_dir(spec)
    config = vit_config_dict(local, spec)
    model = _from_pretrained(local, spec, attn_implementation, id2label=id2label, label2id=label2id,
                             ignore_mismatched_sizes=True)
    prep = Preprocessing.load(local, channels=model.config.num_channels)
    return model, dataclasses.replace(prep, size=square_side(config.get("image_size", prep.size), spec))


def _label_maps(labels: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    labels = [str(label) for label in labels]
    if not labels:
        raise VitrayError("no class labels: a classifier needs at least one")
    if len(set(labels)) != len(labels):
        raise VitrayError(f"class labels are not unique: {labels}")
    return dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}


def _build_preset(name: str, id2label: dict[int, str], label2id: dict[str, int], image_size: int | None,
                  channels: int, attn_implementation: str) -> tuple[ViTForImageClassification, Preprocessing]:
    kwargs = dict(PRESETS[name], num_channels=channels)
    if image_size is not None:
        kwargs.update(image_size=image_size, patch_size=auto_patch_size(image_size))
    config = ViTConfig(**kwargs, id2label=id2label, label2id=label2id, attn_implementation=attn_implementation)
    model = ViTForImageClassification(config)
    init_position_embeddings(model)
    init_linear_layers(model)
    return model, Preprocessing.default(config.image_size, channels)


def init_linear_layers(model: torch.nn.Module) -> None:
    """Start a from-scratch model's linear layers and patch projection Xavier-uniform (as MAE's encoder does).

    transformers starts them at std 0.02, made for ViT-B's width. In the presets' narrow layers
    (64 wide) queries and keys then come out so small that every token attends to every other
    alike, and each projection's gradient is proportional to the other, still tiny one: a run
    waits at that saddle, at chance, for a number of epochs that depends on the seed. Xavier's
    scale (the layer's fan-in and fan-out) gives attention that differs between tokens from
    the first step.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
        elif isinstance(module, torch.nn.Conv2d):  # the patch projection: a linear map of the flattened patch
            torch.nn.init.xavier_uniform_(module.weight.data.view(module.weight.shape[0], -1))


def init_position_embeddings(model: ViTForImageClassification) -> None:
    """Start a from-scratch model's (learned) position embeddings as 2-D sine-cosine ones (as MAE does).

    At the default random init (std 0.02) the patches' positions are all but invisible to the
    model, and a task that is only about where things are (a part shifted in its seat) first
    has to learn them: runs sat at chance for 5 to 20 of 40 epochs, some never left it.
    """
    embeddings = model.vit.embeddings.position_embeddings  # (1, 1 + rows*cols, hidden)
    patch = patch_side(model.config.patch_size)
    side = model.config.image_size // patch
    hidden = embeddings.shape[-1]
    if hidden % 4 or embeddings.shape[1] != 1 + side * side:
        return  # no even split into sin/cos of x and y: keep the random init
    omega = 1.0 / 10000 ** (torch.arange(hidden // 4, dtype=torch.float64) / (hidden // 4))
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                          indexing="ij")
    ax, ay = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    table = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)
    with torch.no_grad():
        embeddings[0, 0].zero_()
        embeddings[0, 1:].copy_(table.to(embeddings.dtype))


def _build_from_hub(hub_id: str, id2label: dict[int, str], label2id: dict[str, int],
                    attn_implementation: str) -> tuple[ViTForImageClassification, Preprocessing]:
    # Fetch the small config first: an unreachable hub then fails once, before any weights.
    config = vit_config_dict(hub_id, hub_id)
    model = _from_pretrained(hub_id, hub_id, attn_implementation, id2label=id2label, label2id=label2id,
                             ignore_mismatched_sizes=True)
    return model, _hub_preprocessing(hub_id, config, model.config.num_channels)


def _hub_preprocessing(hub_id: str, config: dict, channels: int) -> Preprocessing:
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(hub_id)
        prep = Preprocessing.from_dict(processor, channels)
    except OSError:  # the repo has no preprocessor_config.json
        prep = Preprocessing.default(square_side(config["image_size"], hub_id), channels)
    return dataclasses.replace(prep, size=square_side(config.get("image_size", prep.size), hub_id))


def preprocessing_for(spec: str | None, image_size: int | None = None, channels: int = 3) -> Preprocessing:
    """The preprocessing `build_model(spec, ..., image_size, channels)` gives, from configs alone.

    No weights are read: the driver of a run needs only this and the parameter count
    (`params_for`), and the workers build the model.
    """
    kind = source_kind(spec)
    if kind == "preset":
        return Preprocessing.default(image_size or PRESETS[spec or DEFAULT_PRESET]["image_size"], channels)
    config = pretrained_config(spec)
    if kind == "hub":
        return _hub_preprocessing(spec, config, int(config.get("num_channels", 3)))
    prep = Preprocessing.load(spec, channels=int(config.get("num_channels", 3)))
    return dataclasses.replace(prep, size=square_side(config.get("image_size", prep.size), spec))


def pretrained_config(spec: str) -> dict:
    """config.json of a pretrained model (folder, s3:// prefix or hub id), checked to be a ViT; no weights read."""
    if source_kind(spec) == "hub":
        return vit_config_dict(spec, spec)
    config_uri = storage.join(spec, CONFIG_FILE)
    if not storage.exists(config_uri):
        raise VitrayError(f"{spec}: no {CONFIG_FILE} (not a model folder in save_pretrained layout)")
    config = storage.read_json(config_uri)
    if config.get("model_type") != "vit":
        raise VitrayError(f"{spec}: not a ViT image classifier (model_type={config.get('model_type')})")
    return config


def _hub_error(source: str, exc: BaseException) -> VitrayError:
    """One line for a model that could not be loaded; says so plainly when the hub is unreachable."""
    chain, cause = [], exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    names = " ".join(type(c).__name__ for c in chain)
    text = " ".join(str(c) for c in chain).lower()
    offline = not os.path.isdir(source) and (
        any(k in names for k in ("LocalEntryNotFound", "OfflineMode", "ConnectError", "gaierror", "Timeout"))
        or "couldn't connect" in text or "outgoing traffic has been disabled" in text)
    if offline:
        return VitrayError(f"{source}: not a local folder, and the Hugging Face hub is unreachable (offline) with "
                           f"no cached copy; download the model where the hub is reachable and pass its folder "
                           f"or an s3:// copy as --model")
    return VitrayError(f"{source}: cannot load the model: {first_line(exc)}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def vit_config_dict(source: str, display: str) -> dict:
    """config.json of a folder or hub id, checked to be a ViT."""
    try:
        config, _ = PretrainedConfig.get_config_dict(source)
    except OSError as exc:
        raise _hub_error(display, exc) from None
    model_type = config.get("model_type")
    if model_type != "vit":
        raise VitrayError(f"{display}: not a ViT image classifier (model_type={model_type})")
    return config


def _from_pretrained(source: str, display: str, attn_implementation: str, **kwargs: Any) -> ViTForImageClassification:
    try:
        return ViTForImageClassification.from_pretrained(source, attn_implementation=attn_implementation,
                                                         **OFFLINE_LOAD, **kwargs)
    except OSError as exc:
        raise _hub_error(display, exc) from None
    except (ValueError, RuntimeError) as exc:
        raise VitrayError(f"{display}: cannot load the model: {first_line(exc)}"
                          f"{version_note(*MODEL_LIBRARIES)}") from None


def local_model_dir(uri: str) -> str:
    """A local folder holding the model at `uri`; s3:// prefixes are downloaded to a cache first."""
    loc = storage.resolve(uri)
    if not loc.is_s3:
        if not os.path.isdir(loc.path):
            raise VitrayError(f"model folder not found: {uri}")
        if not os.path.isfile(os.path.join(loc.path, CONFIG_FILE)):
            raise VitrayError(f"{uri}: no {CONFIG_FILE} (not a model folder in save_pretrained layout)")
        return loc.path
    files = storage.list_files(uri, recursive=False)
    if not files:
        raise VitrayError(f"model not found: {uri} (no files under it)")
    names = [storage.relative(loc, f.path) for f in files]
    if CONFIG_FILE not in names:
        raise VitrayError(f"{uri}: no {CONFIG_FILE} (not a model folder in save_pretrained layout)")
    # Keyed by the listing, so a model overwritten under the same prefix is fetched again.
    signature = json.dumps([uri] + [[n, f.size, str(f.mtime)] for n, f in zip(names, files)])
    cache = os.path.join(_cache_root(), hashlib.sha256(signature.encode()).hexdigest()[:20])
    if os.path.isfile(os.path.join(cache, CONFIG_FILE)):
        return cache
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    partial = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(cache))
    try:
        for name, f in zip(names, files):
            pafs.copy_files(f.path, os.path.join(partial, name), source_filesystem=loc.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(partial, cache)
        except OSError:  # another process on this node finished the same download first
            pass
    except OSError as exc:
        raise VitrayError(storage.describe_error(uri, exc)) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return cache


def _cache_root() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vitray", "models")
    return os.environ.get("VITRAY_MODEL_CACHE", default)


def patch_side(patch_size: Any) -> int:
    """A config's patch size as one side (transformers allows a pair)."""
    return patch_size if isinstance(patch_size, int) else int(patch_size[0])
