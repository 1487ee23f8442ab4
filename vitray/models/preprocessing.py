"""A model's own input preprocessing (`preprocessor_config.json`): size, channels, mean and std."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from vitray import storage
from vitray.errors import VitrayError

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
        return cls.default(square_side(config["image_size"], uri), int(channels or 3))


def _processor_size(d: dict) -> int:
    """The side the model sees: the crop when the processor crops, else the resize target."""
    size = d.get("crop_size") if d.get("do_center_crop") else d.get("size")
    if isinstance(size, dict):
        if "height" in size:
            return square_side((size["height"], size.get("width", size["height"])), "preprocessor size")
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
    if size is None:
        raise VitrayError(f"{PREPROCESSOR_FILE}: no size")
    return square_side(size, "preprocessor size")


def square_side(size: Any, what: str) -> int:
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
