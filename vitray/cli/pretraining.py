"""`vitray pretrain`: masked-autoencoder pre-training on unlabelled images; OUT/model is an encoder `train` fine-tunes."""
from __future__ import annotations

import argparse
from typing import Any

from vitray.cli.options import given, ray_options, summary


def add_pretrain(sub: Any) -> None:
    from vitray.options import add_options
    from vitray.train.pretrain import PretrainConfig

    p = sub.add_parser("pretrain", help="masked-autoencoder pre-training on unlabelled images",
                       description="Pre-train a ViT as a masked autoencoder (MAE) on unlabelled images with Ray "
                                   "Train; OUT/model is an encoder that `vitray train --model OUT/model` fine-tunes. "
                                   "Writes history.csv, curves.png and reconstructions.png.")
    add_options(p, PretrainConfig)
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
