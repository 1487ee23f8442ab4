"""Training: the driver (`run`: `train`, resume, export), what each Ray Train worker runs (`loop`),
the data it reads (`data`), its options (`config`, `TrainConfig`), the checkpoints of a run
(`checkpoints`), and masked-autoencoder pre-training (`pretrain`, `pretrain_loop`).

The names below load their module on first use (PEP 562), so that checking options does not
import PyTorch and Ray.
"""
import importlib
from typing import Any

_HOMES = {
    "config": ("TrainConfig",),
    "run": ("TrainResult", "train"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME_OF[name]}"), name)
    globals()[name] = value
    return value
