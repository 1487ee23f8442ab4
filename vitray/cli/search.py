"""`vitray tune`: many `train`s with Ray Tune; the searched options replace train's flags of the same name."""
from __future__ import annotations

import argparse
from typing import Any

from vitray.cli.options import given, option_default, positive_int, summary
from vitray.cli.training import add_train_options

TUNE_OPTIONS = ("samples", "scheduler", "metric", "max_concurrent")  # SearchConfig's own options


def add_tune(sub: Any) -> None:
    # "resolve": the searched options replace train's number-typed flags of the same name.
    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune",
                       description="Run many `train`s with Ray Tune (ASHA stops weak trials early); writes "
                                   "OUT/trials.csv, OUT/tune.png and the best trial's model as OUT/best/model. "
                                   "A re-run with the same --out resumes the search. SPACE: loguniform:LOW:HIGH, "
                                   "uniform:LOW:HIGH, choice:A,B,C or a single value.",
                       conflict_handler="resolve")
    from vitray.tune import SearchConfig

    add_train_options(p)
    p.add_argument("--lr", metavar="SPACE", help="peak learning rate (default: loguniform over a decade either "
                                                 "side of train's default)")
    p.add_argument("--epochs", metavar="SPACE", help="a trial's budget: its cosine schedule length (default: "
                                                     "train's)")
    p.add_argument("--batch-size", metavar="SPACE", help="per worker (default: train's)")
    p.add_argument("--finetune", metavar="SPACE", help="e.g. choice:full,head,lora:8 (default: train's)")
    p.add_argument("--samples", type=positive_int,
                   help=f"number of trials (default {option_default(SearchConfig, 'samples')})")
    p.add_argument("--scheduler", choices=("asha", "fifo"), help="asha stops weak trials early (default asha)")
    p.add_argument("--metric", choices=("val_macro_f1", "val_accuracy", "val_loss"),
                   help="what ranks trials and picks the exported checkpoint (default val_macro_f1)")
    p.add_argument("--max-concurrent", type=positive_int,
                   help="trials at once (default: what the cluster's CPUs and GPUs hold)")
    p.add_argument("--workers-per-trial", "--workers", dest="workers_per_trial", type=positive_int,
                   help="Ray Train workers of each trial (default 1)")
    p.set_defaults(func=run_tune)


def tune_config(args: argparse.Namespace) -> Any:
    from vitray.train.config import TrainConfig, config_fields
    from vitray.tune import SEARCHABLE, SearchConfig

    values = given(args, [*config_fields(), *TUNE_OPTIONS, "workers_per_trial"], required=("data", "out"))
    if "workers_per_trial" in values:
        values["workers"] = values.pop("workers_per_trial")
    space = {name: values.pop(name) for name in SEARCHABLE if name in values}
    options = {name: values.pop(name) for name in TUNE_OPTIONS if name in values}
    return SearchConfig(TrainConfig(**values), space=space, **options)


def run_tune(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.tune import format_trials, search

    config = tune_config(args)
    config.check()
    result = search(config)
    print(format_trials(result.trials, list(config.spaces()), result.metric))
    best = result.best
    model = storage.join(result.model.out, "model")
    print(summary(f"best trial {best.trial_id}: {result.metric} {best.best:.4f} at epoch {best.best_epoch}",
                   {"best model": model, "trials": storage.join(result.out, "trials.csv"),
                    "plot": storage.join(result.out, "tune.png")},
                   f"vitray evaluate --model {model} --data TEST --out EVAL"))
    return 0
