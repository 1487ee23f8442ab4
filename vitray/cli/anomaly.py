"""`vitray anomaly`: a bank of good patch features for anomaly detection; `score --anomaly` and `evaluate --anomaly` use it."""
from __future__ import annotations

import argparse
from typing import Any

from vitray.cli.options import fraction, given, option_default, positive_int, ray_options, summary


def add_anomaly(sub: Any) -> None:
    from vitray.anomaly.config import AnomalyConfig

    d = lambda name: option_default(AnomalyConfig, name)  # noqa: E731
    p = sub.add_parser("anomaly", help="fit an anomaly bank from good images",
                       description="Fit a memory bank of a ViT encoder's patch features from good images only "
                                   "(PatchCore's method); OUT/bank.json and bank.safetensors are what `vitray "
                                   "evaluate --anomaly` and the scoring stage read. See docs/anomaly.md.")
    p.add_argument("--data", help="good images: a folder or prefix (recursive), or a labelled data set whose "
                                  "passed images are taken (local, file:// or s3://)")
    p.add_argument("--model", help="the encoder: a `vitray pretrain` encoder, a trained vitray classifier (its "
                                   "backbone) or a transformers ViT folder")
    p.add_argument("--out", help="output folder or s3:// prefix for the bank")
    p.add_argument("--format", choices=("imagefolder", "parquet", "csv", "images"), help="(default: detected)")
    p.add_argument("--layers", help="encoder layers whose patch tokens are used, e.g. 0,3 (0: the patch "
                                    "embeddings; default: 0 and the layer a quarter up)")
    p.add_argument("--neighbourhood", type=positive_int,
                   help="patches a side averaged around each patch, odd (default: 3 on a grid of 16 patches a "
                        "side or more, else 1)")
    p.add_argument("--coreset", type=float, help=f"share of each chunk's patches kept (default {d('coreset')})")
    p.add_argument("--max-bank", type=positive_int,
                   help=f"rows the bank keeps at most, whatever the number of images (default {d('max_bank')})")
    p.add_argument("--chunk-patches", type=positive_int,
                   help=f"patches per feature call, each reduced on its worker (default {d('chunk_patches')})")
    p.add_argument("--holdout", type=fraction,
                   help=f"share of the good images held out to set the threshold (default {d('holdout')})")
    p.add_argument("--false-reject-rate", type=fraction,
                   help=f"share of held-out good images above the threshold (default {d('false_reject_rate')})")
    p.add_argument("--workers", type=positive_int, help=f"feature actors on Ray (default {d('workers')})")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per feature actor (default 0)")
    p.add_argument("--seed", type=int, help=f"(default {d('seed')})")
    p.add_argument("--in-process-max", type=int, metavar="N",
                   help="with no Ray cluster given, at most N good images are fitted in this process, without "
                        f"starting Ray; 0: always Ray (default {d('in_process_max')})")
    ray_options(p)
    p.set_defaults(func=run_anomaly)


def anomaly_config(args: argparse.Namespace) -> Any:
    from vitray.anomaly.config import AnomalyConfig, config_fields
    from vitray.anomaly.features import parse_layers

    values = given(args, config_fields(), required=("data", "model", "out"))
    if "layers" in values:
        values["layers"] = parse_layers(values["layers"])
    return AnomalyConfig(**values)


def run_anomaly(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.anomaly.fit import fit_bank

    config = anomaly_config(args)
    config.check()
    result = fit_bank(config)
    s = result.summary
    print(summary(f"bank of {s['bank_rows']:,} patch features from {s['fit_images']:,} good images; threshold "
                  f"{s['threshold']:.3f} ({s['false_reject_rate']:.1%} of {s['held_out_images']:,} held-out good "
                  f"images above it)",
                  {"bank": storage.join(result.out, "bank.json"), "summary": storage.join(result.out, "fit.json")},
                  f"vitray evaluate --anomaly {result.out} --data TEST --out EVAL"))
    return 0
