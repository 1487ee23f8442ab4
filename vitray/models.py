"""ViT image classifiers: from-scratch presets, pretrained loading, fine-tune policies, export.

Every model is a plain transformers `ViTForImageClassification`; its preprocessing
(`Preprocessing`) is saved beside it, so an exported folder scores like the trained model.

From-scratch presets (`--model NAME`); image size, patch size and channels follow the data:

| preset    | hidden | layers | heads | MLP  | default size / patch | parameters                            |
|-----------|--------|--------|-------|------|----------------------|---------------------------------------|
| vit-tiny  | 64     | 4      | 4     | 128  | 32 px / 4            | 0.14 M (28 px grey) - 0.20 M (224 px) |
| vit-small | 192    | 6      | 6     | 768  | 64 px / 8            | 2.7 M (28 px) - 2.9 M (224 px)        |
| vit-base  | 768    | 12     | 12    | 3072 | 224 px / 16          | 85.8 M (ViT-B/16 shape, 224 px)       |
(parameters with 5 classes; vit-base is for GPU benchmarks)
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PretrainedConfig, ViTConfig, ViTForImageClassification
from transformers.image_processing_base import ImageProcessingMixin
from transformers.utils import logging as hf_logging

from vitray import storage
from vitray.errors import VitrayError

# Per-shard "Loading weights" / "Writing model shards" bars, once per actor and export, are noise
# in a batch job's log (and interleave across Ray workers).
hf_logging.disable_progress_bar()

PREPROCESSOR_FILE = "preprocessor_config.json"
CONFIG_FILE = "config.json"
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5


@dataclass(frozen=True)
class Preprocessing:
    """The model's own input preprocessing: resize to `size`, scale to [0,1], normalise."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise VitrayError(f"preprocessing: {self.channels} channels; only 1 (grey) or 3 (RGB) are supported")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise VitrayError(f"preprocessing: mean/std need {self.channels} values each, "
                              f"got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise VitrayError(f"preprocessing: std must be positive, got {list(self.std)}")

    @classmethod
    def default(cls, size: int, channels: int = 3) -> "Preprocessing":
        """Mean and std 0.5: maps [0,1] to [-1,1], the convention of from-scratch presets."""
        return cls(size, channels, (DEFAULT_MEAN,) * channels, (DEFAULT_STD,) * channels)

    def to_dict(self) -> dict:
        """`preprocessor_config.json` content that `AutoImageProcessor` reads as a ViTImageProcessor."""
        return {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": self.size, "width": self.size},
            "resample": 2,  # PIL bilinear, as ViTImageProcessor
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "num_channels": self.channels,
        }

    @classmethod
    def from_dict(cls, d: dict, channels: int | None = None) -> "Preprocessing":
        """Read an image-processor dict (ours or a hub model's); `channels` is the model's, if known."""
        channels = channels or int(d.get("num_channels", 3))
        size = _processor_size(d)
        if d.get("do_normalize", True):
            mean = _per_channel(d.get("image_mean", DEFAULT_MEAN), channels, "image_mean")
            std = _per_channel(d.get("image_std", DEFAULT_STD), channels, "image_std")
        else:
            mean, std = (0.0,) * channels, (1.0,) * channels
        return cls(size, channels, mean, std)

    def save(self, uri: str) -> None:
        """Write `uri/preprocessor_config.json` (local folder or s3:// prefix)."""
        storage.write_json(storage.join(uri, PREPROCESSOR_FILE), self.to_dict())

    @classmethod
    def load(cls, uri: str, channels: int | None = None) -> "Preprocessing":
        """Read `uri/preprocessor_config.json`; without one, mean/std 0.5 and the size from config.json."""
        config = _read_json_if_exists(storage.join(uri, CONFIG_FILE)) or {}
        channels = channels or config.get("num_channels")
        found = _read_json_if_exists(storage.join(uri, PREPROCESSOR_FILE))
        if found is not None:
            return cls.from_dict(found, channels)
        if "image_size" not in config:
            raise VitrayError(f"{uri}: neither {PREPROCESSOR_FILE} nor an image_size in {CONFIG_FILE}")
        return cls.default(_square(config["image_size"], uri), int(channels or 3))


def _processor_size(d: dict) -> int:
    """The side the model sees: the crop when the processor crops, else the resize target."""
    size = d.get("crop_size") if d.get("do_center_crop") else d.get("size")
    if isinstance(size, dict):
        if "height" in size:
            return _square((size["height"], size.get("width", size["height"])), "preprocessor size")
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
    if size is None:
        raise VitrayError(f"{PREPROCESSOR_FILE}: no size")
    return _square(size, "preprocessor size")


def _square(size: Any, what: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise VitrayError(f"{what}: non-square input {list(size)} is not supported")
        size = size[0]
    return int(size)


def _per_channel(value: Any, channels: int, what: str) -> tuple[float, ...]:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
    if len(values) == channels:
        return tuple(values)
    if len(values) == 1:
        return tuple(values * channels)
    if channels == 1:
        # A grey model fed by an RGB processor: grey is close to the mean of the channels.
        return (sum(values) / len(values),)
    raise VitrayError(f"{PREPROCESSOR_FILE}: {what} has {len(values)} values for a {channels}-channel model")


def _read_json_if_exists(uri: str) -> Any | None:
    return storage.read_json(uri) if storage.exists(uri) else None


# From-scratch presets. image_size/patch_size/num_channels are defaults that
# build_model replaces with the data's size, auto_patch_size and channel count.
PRESETS: dict[str, dict] = {
    "vit-tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                     image_size=32, patch_size=4, num_channels=3),
    "vit-small": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, intermediate_size=768,
                      image_size=64, patch_size=8, num_channels=3),
    "vit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     image_size=224, patch_size=16, num_channels=3),
}
DEFAULT_PRESET = "vit-tiny"

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
    kind = _source_kind(spec)
    if kind == "preset":
        return _build_preset(spec or DEFAULT_PRESET, id2label, label2id, image_size, channels, attn_implementation)
    if kind == "hub":
        return _build_from_hub(spec, id2label, label2id, attn_implementation)
    local = _local_model_dir(spec)
    config = _vit_config_dict(local, spec)
    model = _from_pretrained(local, spec, attn_implementation, id2label=id2label, label2id=label2id,
                             ignore_mismatched_sizes=True)
    prep = Preprocessing.load(local, channels=model.config.num_channels)
    return model, dataclasses.replace(prep, size=_square(config.get("image_size", prep.size), spec))


def params_for(spec: str | None, finetune: str = "full", n_labels: int | None = None,
               image_size: int | None = None, channels: int = 3) -> dict:
    """`param_report(...).to_dict()` of a model under a fine-tune policy, from its config alone.

    No weights are read (the model is built on the meta device), so a hub model costs one small
    download. The head has `n_labels` outputs: by default a pretrained model's own, 5 for a preset.
    """
    kind = _source_kind(spec)
    with torch.device("meta"):
        if kind == "preset":
            model, _ = build_model(spec, [str(i) for i in range(n_labels or 5)], image_size, channels)
        else:
            if kind == "hub":
                config = _vit_config_dict(spec, spec)
            else:
                config = storage.read_json(storage.join(spec, CONFIG_FILE))
                if config.get("model_type") != "vit":
                    raise VitrayError(f"{spec}: not a ViT image classifier (model_type={config.get('model_type')})")
            vit_config = ViTConfig.from_dict(config)
            if n_labels:
                vit_config.num_labels = n_labels
            model = ViTForImageClassification(vit_config)
    return param_report(apply_finetune(model, finetune)).to_dict()


def _source_kind(spec: str | None) -> str:
    """"preset", "location" (local folder, file://, s3://) or "hub"; a one-line error for anything else."""
    if spec is None or spec in PRESETS:
        return "preset"
    if storage.is_s3(spec) or spec.startswith("file://") or os.path.exists(os.path.expanduser(spec)):
        return "location"
    if spec.startswith(("/", ".", "~")) or spec.endswith("/") or spec.count("/") > 1:  # a path, not org/name
        raise VitrayError(f"model folder not found: {spec}")
    if not _HUB_ID.match(spec):
        raise VitrayError(f"unknown model {spec!r}: not a preset ({', '.join(PRESETS)}), an existing folder, "
                          f"an s3:// prefix or a hub id (org/name)")
    return "hub"


# "org/name" as the hub spells repo ids; a missing relative folder "out/model" looks the same,
# which is why the hub error also says that it is not a local folder.
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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
    return model, Preprocessing.default(config.image_size, channels)


def init_position_embeddings(model: ViTForImageClassification) -> None:
    """Start a from-scratch model's (learned) position embeddings as 2-D sine-cosine ones (as MAE does).

    At the default random init (std 0.02) the patches' positions are all but invisible to the
    model, and a task that is only about where things are (a part shifted in its seat) first
    has to learn them: runs sat at chance for 5 to 20 of 40 epochs, some never left it.
    """
    embeddings = model.vit.embeddings.position_embeddings  # (1, 1 + rows*cols, hidden)
    patch = _patch(model.config.patch_size)
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
    config = _vit_config_dict(hub_id, hub_id)
    model = _from_pretrained(hub_id, hub_id, attn_implementation, id2label=id2label, label2id=label2id,
                             ignore_mismatched_sizes=True)
    channels = model.config.num_channels
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(hub_id)
        prep = Preprocessing.from_dict(processor, channels)
    except OSError:  # the repo has no preprocessor_config.json
        prep = Preprocessing.default(_square(config["image_size"], hub_id), channels)
    return model, dataclasses.replace(prep, size=_square(config.get("image_size", prep.size), hub_id))


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
    return VitrayError(f"{source}: cannot load the model: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _vit_config_dict(source: str, display: str) -> dict:
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
        return ViTForImageClassification.from_pretrained(source, attn_implementation=attn_implementation, **kwargs)
    except OSError as exc:
        raise _hub_error(display, exc) from None
    except (ValueError, RuntimeError) as exc:
        raise VitrayError(f"{display}: cannot load the model: {_first_line(exc)}") from None


def _local_model_dir(uri: str) -> str:
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
    return labels, prep, _patch(model.config.patch_size)


def _load_checked(uri: str, **kwargs: Any) -> tuple[ViTForImageClassification, Preprocessing, list[str]]:
    local = _local_model_dir(uri)
    config = _vit_config_dict(local, uri)
    if "ViTForImageClassification" not in (config.get("architectures") or []):
        raise VitrayError(f"{uri}: not a ViTForImageClassification (architectures={config.get('architectures')})")
    _check_safetensors_lengths(local, uri)
    try:
        model, info = ViTForImageClassification.from_pretrained(local, output_loading_info=True, **kwargs)
    except RuntimeError as exc:
        if "mismatched_sizes" in str(exc):  # its details are in a table transformers logged above
            raise VitrayError(f"{uri}: the weights do not match config.json (tensor shapes differ)") from None
        raise VitrayError(f"{uri}: cannot load the model: {_first_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise VitrayError(f"{uri}: cannot load the model: {_first_line(exc)}") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(k[0] for k in info.get("mismatched_keys") or [])
    if missing:
        # from_pretrained would silently initialise these at random.
        raise VitrayError(f"{uri}: the weights do not match config.json (missing or mismatched: "
                          f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    prep = Preprocessing.load(local, channels=model.config.num_channels)
    prep = dataclasses.replace(prep, size=_square(model.config.image_size, uri))
    return model.eval(), prep, labels


def _patch(patch_size: Any) -> int:
    return patch_size if isinstance(patch_size, int) else int(patch_size[0])


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
            raise VitrayError(f"{uri}: cannot read the weights {name}: {_first_line(exc)}") from None
        end = 8 + length + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size < end:
            raise VitrayError(f"{uri}: the weights {name} are cut short ({size:,} of {end:,} bytes)")


def parse_finetune(policy: str, num_layers: int | None = None) -> tuple[str, int | None]:
    """("full"|"head", None) or ("last", K) or ("lora", R); K is checked against `num_layers` when given."""
    text = str(policy).strip().lower()
    if text in ("full", "head"):
        return text, None
    kind, _, arg = text.partition(":")
    if kind not in ("last", "lora") or not arg.isdigit() or int(arg) < 1:
        raise VitrayError(f"--finetune {policy!r}: use full, head, last:K (K >= 1 encoder layers) "
                          f"or lora:R (LoRA rank R >= 1)")
    value = int(arg)
    if kind == "last" and num_layers is not None and value > num_layers:
        raise VitrayError(f"--finetune {policy!r}: the model has only {num_layers} encoder layers")
    return kind, value


def apply_finetune(model: ViTForImageClassification, policy: str) -> torch.nn.Module:
    """Mark what trains: "full", "head" (classifier), "last:K" (last K layers, final norm, head), "lora:R".

    LoRA (rank R, alpha 2R, dropout 0.1) goes on the attention query and value projections, as in
    the LoRA paper and peft's image-classification recipe; the new head trains in full
    (modules_to_save). "lora" returns a peft `PeftModel` wrapping `model`; the others return `model`.
    """
    layers = model.vit.layers if hasattr(model.vit, "layers") else model.vit.encoder.layer
    kind, value = parse_finetune(policy, num_layers=len(layers))
    if kind == "lora":
        config = LoraConfig(r=value, lora_alpha=2 * value, lora_dropout=0.1,
                            target_modules=_attention_targets(model), modules_to_save=["classifier"])
        return get_peft_model(model, config)
    model.requires_grad_(kind == "full")
    trainable: list[torch.nn.Module] = [model.classifier]
    if kind == "last":
        trainable += [*layers[-value:], model.vit.layernorm]
    for module in trainable:
        module.requires_grad_(True)
    return model


def _attention_targets(model: torch.nn.Module) -> list[str]:
    # transformers 5 names the projections q_proj/v_proj; 4.x named them query/value.
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]


@dataclass(frozen=True)
class ParamReport:
    """Parameter counts of a model as it trains."""

    total: int
    trainable: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "trainable": self.trainable, "share": self.share}


def param_report(model: torch.nn.Module) -> ParamReport:
    """Total and trainable parameters (for LoRA: base + adapters + the head's trainable copy)."""
    params = list(model.parameters())
    return ParamReport(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))


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
    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    if not isinstance(model, ViTForImageClassification):
        raise VitrayError(f"export: expected a ViTForImageClassification, got {type(model).__name__}")
    return model
