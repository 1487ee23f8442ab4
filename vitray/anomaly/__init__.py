"""Anomaly detection from good images only, on ViT patch features (PatchCore's method).

`features` turns a ViT encoder's chosen layers into neighbourhood-pooled patch features,
`coreset` reduces them to a bounded memory bank, `bank` stores and searches it, `fit` runs a
fit (on Ray Data actors or in this process) and sets the threshold, `scorer` adds
`anomaly_score` and `anomaly_map` to scoring batches. See docs/anomaly.md.

The names below load their module on first use, so that the CLI checks options without torch.
"""
from vitray.lazy import lazy_names

_HOMES = {
    "config": ("AnomalyConfig",),
    "features": ("FeatureSpec", "load_encoder", "patch_features"),
    "coreset": ("CappedBank", "greedy_coreset"),
    "bank": ("Bank", "BankMeta", "load_bank", "nearest_distances", "read_meta"),
    "fit": ("FitResult", "fit_bank"),
    "scorer": ("AnomalyScorer", "anomaly_overlay_png", "image_scores"),
}
__all__, __getattr__ = lazy_names(__name__, globals(), _HOMES)
