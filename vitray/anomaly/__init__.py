"""Anomaly detection from good images only, on ViT patch features (PatchCore's method).

`features` turns a ViT encoder's chosen layers into neighbourhood-pooled patch features,
`coreset` reduces them to a bounded memory bank, `bank` stores and searches it, `fit` runs a
fit (on Ray Data actors or in this process) and sets the threshold, `scorer` adds
`anomaly_score` and `anomaly_map` to scoring batches. See docs/anomaly.md.

The names below load their module on first use, so that the CLI checks options without torch.
"""
import importlib
from typing import Any

_HOMES = {
    "config": ("AnomalyConfig",),
    "features": ("FeatureSpec", "load_encoder", "patch_features"),
    "coreset": ("CappedBank", "greedy_coreset"),
    "bank": ("Bank", "BankMeta", "load_bank", "nearest_distances", "read_meta"),
    "fit": ("FitResult", "fit_bank"),
    "scorer": ("AnomalyScorer", "anomaly_overlay_png", "image_scores"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME_OF[name]}"), name)
    globals()[name] = value
    return value
