"""Names a package offers but loads from their module on first use (PEP 562).

    __all__, __getattr__ = lazy_names(__name__, globals(), {"config": ("TrainConfig",), ...})

so that `from vitray.train import TrainConfig` imports `vitray.train.config` alone, and checking a
command's options imports neither PyTorch nor Ray.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, namespace: dict[str, Any],
               homes: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], Any]]:
    """`package`'s `__all__` and module `__getattr__` for `homes` (module → the names it defines)."""
    home_of = {name: module for module, names in homes.items() for name in names}

    def getattr_(name: str) -> Any:
        if name not in home_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home_of[name]}"), name)
        namespace[name] = value  # the next lookup finds it without this function
        return value

    return sorted(home_of), getattr_
