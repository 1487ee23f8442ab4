"""What a `--model` or `--finetune` string names, read without importing torch or transformers.

Options are checked before any work starts, and a wrong one should be refused in a blink, not
after the seconds that importing PyTorch and transformers take: everything here is plain Python.
"""
from __future__ import annotations

import os
import re

from vitray import storage
from vitray.errors import VitrayError

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

# "org/name" as the hub spells repo ids; a missing relative folder "out/model" looks the same,
# which is why the hub error also says that it is not a local folder.
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def source_kind(spec: str | None) -> str:
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


def portable(spec: str | None) -> str | None:
    """A model spec that means the same in a Ray worker: a local folder made absolute, others as they are.

    A missing folder or a garbled name is refused here (`source_kind`), before torch is imported.
    """
    if source_kind(spec) != "location" or not os.path.exists(os.path.expanduser(spec)):
        return spec  # a preset, a URI (s3://, file://) or a hub id
    return storage.absolute(spec)


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


# The key `vitray pretrain` adds to the config.json of the encoder it exports (transformers keeps
# unknown keys, so a classifier fine-tuned from it carries the key on).
PRETRAINED_HERE = "vitray_pretrain"


def pretrained_here(spec: str | None) -> bool:
    """Whether `spec` is a folder or s3:// prefix whose model `vitray pretrain` pre-trained (config.json says so)."""
    if spec is None or spec in PRESETS or source_kind(spec) != "location":
        return False
    try:
        config = storage.read_json(storage.join(spec, "config.json"))
    except (OSError, ValueError):
        return False  # the loading itself says what is wrong with it, in its own line
    return isinstance(config, dict) and PRETRAINED_HERE in config
