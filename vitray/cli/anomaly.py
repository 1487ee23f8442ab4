"""`vitray anomaly`: a bank of good patch features for anomaly detection; `score --anomaly` and `evaluate --anomaly` use it."""
from __future__ import annotations

import argparse
from typing import Any

from vitray.cli.options import ray_options, summary


def add_anomaly(sub: Any) -> None:
    from vitray.anomaly.config import AnomalyConfig
    from vitray.options import add_options

    p = sub.add_parser("anomaly", help="fit an anomaly bank from good images",
                       description="Fit a memory bank of a ViT encoder's patch features from good images only "
                                   "(PatchCore's method); OUT/bank.json and bank.safetensors are what `vitray "
                                   "evaluate --anomaly` and `vitray score --anomaly` read. See docs/anomaly.md.")
    add_options(p, AnomalyConfig)
    ray_options(p)
    p.set_defaults(func=run_anomaly)


def run_anomaly(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.anomaly.config import AnomalyConfig
    from vitray.anomaly.fit import fit_bank
    from vitray.options import config_from

    config = config_from(AnomalyConfig, args, ray_address=args.ray_address)
    config.check()
    result = fit_bank(config)
    s = result.summary
    print(summary(f"bank of {s['bank_rows']:,} patch features from {s['fit_images']:,} good images; threshold "
                  f"{s['threshold']:.3f} ({s['false_reject_rate']:.1%} of {s['held_out_images']:,} held-out good "
                  f"images above it)",
                  {"bank": storage.join(result.out, "bank.json"), "summary": storage.join(result.out, "fit.json")},
                  f"vitray evaluate --anomaly {result.out} --data TEST --out EVAL"))
    return 0
