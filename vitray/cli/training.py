"""`vitray train`, `evaluate` and `params`: a model from labelled data, its metrics, its parameter count."""
from __future__ import annotations

import argparse
from typing import Any

from vitray.cli.options import given, ray_options, summary


TRAIN_ONLY = ("in_process_max", "fresh")  # `tune`'s trials run on Ray and resume by the search


def add_train_options(p: argparse.ArgumentParser) -> None:
    from vitray.options import add_options
    from vitray.train.config import TrainConfig

    add_options(p, TrainConfig, skip=TRAIN_ONLY)
    ray_options(p)
    # A config may also set the recipe's fields that have no flag (weight_decay, label_smoothing, ...).
    p.set_defaults(config_extra=TrainConfig)


def train_config(args: argparse.Namespace) -> Any:
    from vitray.train.config import TrainConfig, config_fields

    values = given(args, config_fields(), required=("data", "out"))
    return TrainConfig(**values)


def add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a ViT with Ray Train",
                       description="Train a ViT (from scratch or fine-tuned) on labelled images with Ray Train; "
                                   "writes OUT/model, metrics.json, history.csv and plots.")
    from vitray.options import add_options
    from vitray.train.config import TrainConfig

    add_train_options(p)
    add_options(p, TrainConfig, only=TRAIN_ONLY)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.domain import OK_CLASS
    from vitray.metrics import format_report
    from vitray.train.run import train

    config = train_config(args)
    config.check()
    result = train(config)
    print(format_report(result.metrics))
    model = storage.join(result.out, "model")
    passed = result.metrics["per_class"].get(OK_CLASS)
    print(summary(f"exported epoch {result.exported_epoch} of {config.epochs}: validation accuracy "
                   f"{result.metrics['accuracy']:.3f}, macro-F1 {result.metrics['macro_f1']:.3f}"
                   + (f", {OK_CLASS} recall {passed['recall']:.2f}" if passed else "")
                   + (f" (best validation macro-F1 at epoch {result.best_epoch})"
                      if result.best_epoch != result.exported_epoch else ""),
                   {"model": model, "metrics": storage.join(result.out, "metrics.json"),
                    "curves": storage.join(result.out, "curves.png"),
                    "confusion matrix": storage.join(result.out, "confusion_matrix.png")},
                   f"vitray evaluate --model {model} --data TEST --out EVAL; "
                   f"vitray score --model {model} --input IMAGES --output SCORES"))
    return 0



def add_evaluate(sub: Any) -> None:
    from vitray.evaluate import EvaluateConfig
    from vitray.options import add_options

    p = sub.add_parser("evaluate", help="metrics of a model on labelled data",
                       description="Accuracy, macro-F1, per-class report and confusion matrix of a trained "
                                   "model on a labelled data set; with --anomaly, an anomaly bank's AUROC.")
    add_options(p, EvaluateConfig)
    ray_options(p)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.errors import VitrayError
    from vitray.evaluate import ANOMALY_FILE, EvaluateConfig, evaluate, evaluate_anomaly
    from vitray.metrics import format_report
    from vitray.options import config_from

    config = config_from(EvaluateConfig, args, ray_address=args.ray_address)
    if not args.model and not args.anomaly:
        raise VitrayError("--model is required (on the command line or in --config), or --anomaly BANK to "
                          "measure an anomaly bank")
    if args.anomaly:
        from vitray.anomaly.bank import read_meta

        read_meta(storage.absolute(args.anomaly))  # a wrong bank is refused before any work
    outputs: dict[str, str] = {}
    headline = []
    if args.model:
        metrics = evaluate(config)
        print(format_report(metrics))
        headline.append(f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
        outputs.update({"evaluation": storage.join(args.out, "evaluation.json"),
                        "confusion matrix": storage.join(args.out, "confusion_matrix.png")})
    if args.anomaly:
        result = evaluate_anomaly(config)
        loc = result["localization"]
        headline.append(f"anomaly AUROC {result['auroc']:.3f}, detected {result['detection_rate']:.1%} at "
                        f"{result['false_reject_rate']:.1%} false rejects"
                        + (f", pointing game {loc['pointing_game']:.2f}" if loc["pointing_game"] is not None else ""))
        outputs["anomaly"] = storage.join(args.out, ANOMALY_FILE)
    print(summary("; ".join(headline), outputs,
                  f"vitray score --model {args.model or 'MODEL'} --input IMAGES --output SCORES"))
    return 0



def add_params(sub: Any) -> None:
    p = sub.add_parser("params", help="total and trainable parameters of a model",
                       description="How many parameters a fine-tuning policy really trains.")
    p.add_argument("--model", required=True, help="preset, folder, s3:// prefix or hub id")
    p.add_argument("--finetune", default="full", help="full | head | last:K | lora:R (default full)")
    p.add_argument("--labels", type=int, default=None,
                   help="number of classes of the new head (default: the model's own)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=run_params)


def run_params(args: argparse.Namespace) -> int:
    import json

    from vitray.models import parse_finetune, params_for

    parse_finetune(args.finetune)
    report = params_for(args.model, args.finetune, n_labels=args.labels, image_size=args.image_size,
                        channels=args.channels)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"model      {args.model}\nfinetune   {args.finetune}\n"
              f"total      {report['total']:,}\ntrainable  {report['trainable']:,} "
              f"({100 * report['share']:.2f}%)")
    return 0


