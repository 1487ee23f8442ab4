"""`vitray pretrain`: masked-autoencoder pre-training on unlabelled images; OUT/model is an encoder `train` fine-tunes."""
from __future__ import annotations

import argparse
from typing import Any

from vitray.cli.options import fraction, given, option_default, ray_options, summary
from vitray.cli.training import tracking_options


def add_pretrain(sub: Any) -> None:
    from vitray.train.pretrain import FORMATS, PretrainConfig

    d = lambda name: option_default(PretrainConfig, name)  # noqa: E731
    p = sub.add_parser("pretrain", help="masked-autoencoder pre-training on unlabelled images",
                       description="Pre-train a ViT as a masked autoencoder (MAE) on unlabelled images with Ray "
                                   "Train; OUT/model is an encoder that `vitray train --model OUT/model` fine-tunes. "
                                   "Writes history.csv, curves.png and reconstructions.png.")
    p.add_argument("--data", help="images: a folder or prefix (recursive; labels ignored), parquet or digit CSV "
                                  "(local, file:// or s3://)")
    p.add_argument("--out", help="output folder or s3:// prefix; the same --out resumes")
    p.add_argument("--format", choices=FORMATS, help="data format (default: detected)")
    p.add_argument("--model", help="a preset (vit-tiny, vit-small, vit-base), or a ViT to go on from (folder, "
                                   "s3:// prefix, hub id) (default: the preset train sizes for the data)")
    p.add_argument("--image-size", type=int, help="input side of a preset (default: the data's)")
    p.add_argument("--epochs", type=int, help=f"(default {d('epochs')})")
    p.add_argument("--mask-ratio", type=float, help=f"share of patches hidden (default {d('mask_ratio')})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d('lr')})")
    p.add_argument("--batch-size", type=int, help=f"per worker (default {d('batch_size')})")
    p.add_argument("--workers", type=int, help=f"Ray Train workers (default {d('workers')})")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; > 0 trains on GPU with bf16 (default 0)")
    p.add_argument("--augment", choices=("auto", "none"), help="auto: small shifts and lighting (default auto)")
    p.add_argument("--val-fraction", type=fraction, help=f"share held out (default {d('val_fraction')})")
    p.add_argument("--seed", type=int, help=f"(default {d('seed')})")
    p.add_argument("--fresh", action="store_true", default=None,
                   help="discard the checkpoints under --out and start from the first epoch (a resume keeps "
                        "the options the run began with)")
    tracking_options(p)
    ray_options(p)
    # A config may also set the recipe's fields that have no flag (norm_pix_loss, weight_decay, ...).
    p.set_defaults(func=run_pretrain, config_extra=PretrainConfig)


def pretrain_config(args: argparse.Namespace) -> Any:
    from vitray.train.pretrain import PretrainConfig, config_fields

    values = given(args, config_fields(), required=("data", "out"))
    return PretrainConfig(**values)


def run_pretrain(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.train.pretrain import pretrain

    config = pretrain_config(args)
    config.check()
    result = pretrain(config)
    last = result.history[-1]
    model = storage.join(result.out, "model")
    print(summary(f"pre-trained {last['epoch']} epochs: reconstruction loss {last['loss']:.4f}, "
                  f"validation {last['val_loss']:.4f}",
                  {"model": model, "history": storage.join(result.out, "history.csv"),
                   "curves": storage.join(result.out, "curves.png"),
                   "reconstructions": storage.join(result.out, "reconstructions.png")},
                  f"vitray train --data LABELLED --out RUN --model {model}"))
    return 0
