"""The `vitray` command line: parse, check, call the library.

Every command checks its inputs before any work starts and reports problems as
one line `vitray: error: ...` (exit 2). Heavy imports happen inside commands so
that `vitray --help` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from vitray import __version__
from vitray.errors import VitrayError


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"vitray: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded Ray)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs, and tracebacks of failures")
    parser.add_argument("--shared-fs", action="store_true", default=None,
                        help="a local output path is on a filesystem every Ray node mounts (on a cluster of "
                             "several nodes a local output is refused without it; use s3:// instead)")


# --------------------------------------------------------------------------- synth


def _add_synth(sub: Any) -> None:
    p = sub.add_parser("synth", help="render a synthetic inspection data set",
                       description="Render parts seen from above: passed, or shifted out of their "
                                   "seat (Xplus, Xminus, Yplus, Yminus).")
    p.add_argument("out", help="output folder or s3:// prefix")
    p.add_argument("--n", type=_positive_int, required=True, help="number of images")
    p.add_argument("--passed-fraction", type=_fraction, default=0.02,
                   help="share of passed parts (default 0.02, as in the real data)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("parquet", "imagefolder"), default="parquet")
    p.add_argument("--style", choices=("synth", "alt"), default="synth",
                   help="renderer: 'alt' draws the same task differently (for evaluation)")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from vitray.data import synth

    summary = synth.write(args.out, n=args.n, passed_fraction=args.passed_fraction, size=args.size,
                          seed=args.seed, fmt=args.format, style=args.style)
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    print(f"wrote {summary['n']} images ({counts}) as {args.format} to {args.out}")
    print(f"next: vitray train --data {args.out} --out RUN")
    return 0


# --------------------------------------------------------------------------- train


def _default(cls: Any, name: str) -> Any:
    """The one default of an option: the config dataclass's."""
    from dataclasses import MISSING, fields

    for f in fields(cls):
        if f.name == name:
            return None if f.default is MISSING else f.default
    raise KeyError(name)


def read_yaml_mapping(path: str) -> dict[str, Any]:
    """A YAML file of `option: value` (local or s3://); one-line errors otherwise."""
    import yaml

    from vitray import storage

    try:
        values = yaml.safe_load(storage.read_bytes(path)) or {}
    except yaml.YAMLError as exc:
        raise VitrayError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise VitrayError(f"{path}: a config must be a mapping of option: value")
    return values


_UNSET = object()  # an option's value while parsing: "not on the command line"


def _configurable(parser: argparse.ArgumentParser) -> None:
    """Give a command `--config YAML` and keep what the command line really gave apart from defaults."""
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="options from a YAML file (keys are option names, - or _; flags given override it)")
    if "--verbose" not in parser._option_string_actions:
        parser.add_argument("--verbose", action="store_true", help="show the libraries' own logs and tracebacks")
    defaults, required = {}, []
    for action in parser._actions:  # argparse has no public view of a parser's options
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        defaults[action.dest] = action.default
        action.default = _UNSET
        if action.required:
            required.append(action)
            action.required = False  # it may come from --config: checked after merging
    parser.set_defaults(option_defaults=defaults, required_options=required)


def _merge_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Options not on the command line from `--config` (typed as their flag would be), else their default."""
    values = read_yaml_mapping(args.config) if args.config else {}
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    by_key = {**{opt.lstrip("-").replace("-", "_"): a for a in actions.values() for opt in a.option_strings},
              **actions}
    extra = set(getattr(args, "config_extra", None) or ())
    unknown = sorted(str(k) for k in values if str(k).replace("-", "_") not in by_key and
                     str(k).replace("-", "_") not in extra or str(k) in ("help", "config"))
    if unknown:
        raise VitrayError(f"{args.config}: unknown option(s) {', '.join(unknown)} for 'vitray {args.command}'")
    for key, value in values.items():
        name = str(key).replace("-", "_")
        action = by_key.get(name)
        dest = action.dest if action else name
        if getattr(args, dest, _UNSET) is not _UNSET and action is not None:
            continue  # given on the command line
        setattr(args, dest, _typed(action, value, args.config, key) if action else value)
    for dest, default in args.option_defaults.items():
        if getattr(args, dest, _UNSET) is _UNSET:
            setattr(args, dest, default)
    for action in args.required_options:
        if getattr(args, action.dest) is None:
            raise VitrayError(f"{action.option_strings[0]} is required (on the command line or in --config)")
    return args


def _typed(action: argparse.Action, value: Any, path: str, key: Any) -> Any:
    """A YAML value as its flag would have parsed it (YAML reads `1e-4` as a string)."""
    if value is None:
        return None
    if action.nargs == 0:  # a switch such as --verbose
        return bool(value)
    if action.type is None:
        typed = value  # strings, and tune's SPACEs as written (a list is a choice)
    else:
        try:
            typed = [action.type(str(v)) for v in value] if isinstance(value, list) and action.nargs else \
                action.type(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise VitrayError(f"{path}: {key}: {exc}") from None
    if action.choices is not None and typed not in action.choices:
        raise VitrayError(f"{path}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return typed


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (and its --config) as one Namespace; usage errors exit 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return _merge_config(_subparser(parser, args.command), args)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from vitray.train import TrainConfig

    d = lambda name: _default(TrainConfig, name)  # noqa: E731
    p.add_argument("--data", help="training data: image folder, parquet, digit CSV (local, file:// or s3://)")
    p.add_argument("--out", help="output folder or s3:// prefix")
    p.add_argument("--val", help="validation data (default: a stratified split of --data)")
    p.add_argument("--val-fraction", type=float, help=f"share of --data held out (default {d('val_fraction')})")
    p.add_argument("--format", choices=("imagefolder", "parquet", "csv"), help="data format (default: detected)")
    p.add_argument("--model", help="preset (vit-tiny, vit-small, ...), folder, s3:// prefix or hub id "
                                   "(default: a from-scratch preset sized for the data)")
    p.add_argument("--image-size", type=int, help="input side in pixels (default: the data's, or the model's)")
    p.add_argument("--epochs", type=int, help=f"(default {d('epochs')})")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3; 1e-4 for full fine-tuning "
                                            "of a pretrained model)")
    p.add_argument("--batch-size", type=int, help=f"per worker (default {d('batch_size')})")
    p.add_argument("--workers", type=int, help=f"Ray Train workers (default {d('workers')})")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; > 0 trains on GPU with bf16 (default 0)")
    p.add_argument("--finetune", help="full | head | last:K | lora:R (default full)")
    p.add_argument("--class-weights", choices=("auto", "loss", "none"),
                   help="rare classes: auto draws every class equally often per epoch (class-balanced "
                        "sampling); loss weights the loss by inverse class frequency (default auto)")
    p.add_argument("--augment", choices=("auto", "none"), help="label-aware flips, shifts, lighting (default auto)")
    p.add_argument("--seed", type=int, help=f"(default {d('seed')})")
    _ray_options(p)
    # A config may also set the recipe's fields that have no flag (weight_decay, label_smoothing, ...).
    p.set_defaults(config_extra=[f.name for f in fields(TrainConfig)])


def _train_config(args: argparse.Namespace) -> Any:
    from vitray.train import TrainConfig, config_fields

    values = _given(args, config_fields())
    for required in ("data", "out"):
        if not values.get(required):
            raise VitrayError(f"--{required} is required (on the command line or in --config)")
    return TrainConfig(**values)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a ViT with Ray Train",
                       description="Train a ViT (from scratch or fine-tuned) on labelled images with Ray Train; "
                                   "writes OUT/model, metrics.json, history.csv and plots.")
    _add_train_options(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.evaluate import format_report
    from vitray.train import train

    config = _train_config(args)
    config.check()
    result = train(config)
    print(format_report(result.metrics))
    model = storage.join(result.out, "model")
    passed = result.metrics["per_class"].get("passed")
    print(_summary(f"best epoch {result.best_epoch} of {config.epochs}: validation accuracy "
                   f"{result.metrics['accuracy']:.3f}, macro-F1 {result.metrics['macro_f1']:.3f}"
                   + (f", passed recall {passed['recall']:.2f}" if passed else ""),
                   {"model": model, "metrics": storage.join(result.out, "metrics.json"),
                    "curves": storage.join(result.out, "curves.png"),
                    "confusion matrix": storage.join(result.out, "confusion_matrix.png")},
                   f"vitray evaluate --model {model} --data TEST --out EVAL; "
                   f"vitray score --model {model} --input IMAGES --output SCORES"))
    return 0


# --------------------------------------------------------------------------- evaluate


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="metrics of a model on labelled data",
                       description="Accuracy, macro-F1, per-class report and confusion matrix of a trained "
                                   "model on a labelled data set.")
    p.add_argument("--model", required=True, help="trained model folder or s3:// prefix")
    p.add_argument("--data", required=True, help="labelled data (local, file:// or s3://)")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--format", choices=("imagefolder", "parquet", "csv"))
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per model call (default 256)")
    p.add_argument("--workers", type=_positive_int, default=1, help="inference actors (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per inference actor (default 0: CPU)")
    _ray_options(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.evaluate import evaluate, format_report

    metrics = evaluate(args.model, args.data, args.out, fmt=args.format, batch_size=args.batch_size,
                       workers=args.workers, gpus_per_worker=args.gpus_per_worker, ray_address=args.ray_address)
    print(format_report(metrics))
    print(_summary(f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}",
                   {"evaluation": storage.join(args.out, "evaluation.json"),
                    "confusion matrix": storage.join(args.out, "confusion_matrix.png")},
                   f"vitray score --model {args.model} --input IMAGES --output SCORES"))
    return 0


# --------------------------------------------------------------------------- params


def _add_params(sub: Any) -> None:
    p = sub.add_parser("params", help="total and trainable parameters of a model",
                       description="How many parameters a fine-tuning policy really trains.")
    p.add_argument("--model", required=True, help="preset, folder, s3:// prefix or hub id")
    p.add_argument("--finetune", default="full", help="full | head | last:K | lora:R (default full)")
    p.add_argument("--labels", type=int, default=None,
                   help="number of classes of the new head (default: the model's own)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=_run_params)


def _run_params(args: argparse.Namespace) -> int:
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


# --------------------------------------------------------------------------- tune

TUNE_OPTIONS = ("samples", "scheduler", "metric", "max_concurrent")  # SearchConfig's own options


def _add_tune(sub: Any) -> None:
    # "resolve": the searched options replace train's number-typed flags of the same name.
    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune",
                       description="Run many `train`s with Ray Tune (ASHA stops weak trials early); writes "
                                   "OUT/trials.csv, OUT/tune.png and the best trial's model as OUT/best/model. "
                                   "A re-run with the same --out resumes the search. SPACE: loguniform:LOW:HIGH, "
                                   "uniform:LOW:HIGH, choice:A,B,C or a single value.",
                       conflict_handler="resolve")
    from vitray.tune import SearchConfig

    _add_train_options(p)
    p.add_argument("--lr", metavar="SPACE", help="peak learning rate (default: loguniform over a decade either "
                                                 "side of train's default)")
    p.add_argument("--epochs", metavar="SPACE", help="a trial's budget: its cosine schedule length (default: "
                                                     "train's)")
    p.add_argument("--batch-size", metavar="SPACE", help="per worker (default: train's)")
    p.add_argument("--finetune", metavar="SPACE", help="e.g. choice:full,head,lora:8 (default: train's)")
    p.add_argument("--samples", type=_positive_int,
                   help=f"number of trials (default {_default(SearchConfig, 'samples')})")
    p.add_argument("--scheduler", choices=("asha", "fifo"), help="asha stops weak trials early (default asha)")
    p.add_argument("--metric", choices=("val_macro_f1", "val_accuracy", "val_loss"),
                   help="what ranks trials and picks the exported checkpoint (default val_macro_f1)")
    p.add_argument("--max-concurrent", type=_positive_int,
                   help="trials at once (default: what the cluster's CPUs and GPUs hold)")
    p.add_argument("--workers-per-trial", "--workers", dest="workers_per_trial", type=_positive_int,
                   help="Ray Train workers of each trial (default 1)")
    p.set_defaults(func=_run_tune)


def _tune_config(args: argparse.Namespace) -> Any:
    from vitray.train import TrainConfig, config_fields
    from vitray.tune import SEARCHABLE, SearchConfig

    values = _given(args, [*config_fields(), *TUNE_OPTIONS, "workers_per_trial"])
    for required in ("data", "out"):
        if not values.get(required):
            raise VitrayError(f"--{required} is required (on the command line or in --config)")
    if "workers_per_trial" in values:
        values["workers"] = values.pop("workers_per_trial")
    space = {name: values.pop(name) for name in SEARCHABLE if name in values}
    options = {name: values.pop(name) for name in TUNE_OPTIONS if name in values}
    return SearchConfig(TrainConfig(**values), space=space, **options)


def _run_tune(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.tune import format_trials, search

    config = _tune_config(args)
    config.check()
    result = search(config)
    print(format_trials(result.trials, list(config.spaces()), result.metric))
    best = result.best
    model = storage.join(result.model.out, "model")
    print(_summary(f"best trial {best.trial_id}: {result.metric} {best.best:.4f} at epoch {best.best_epoch}",
                   {"best model": model, "trials": storage.join(result.out, "trials.csv"),
                    "plot": storage.join(result.out, "tune.png")},
                   f"vitray evaluate --model {model} --data TEST --out EVAL"))
    return 0


# --------------------------------------------------------------------------- score


def _add_score(sub: Any) -> None:
    from vitray.explain import HEAD_FUSIONS, METHODS
    from vitray.inference import ATTENTION_MODES
    from vitray.score import SCORE_FORMATS, ScoreConfig

    d = lambda name: _default(ScoreConfig, name)  # noqa: E731
    p = sub.add_parser("score", help="score images in bulk with Ray Data",
                       description="Score every image under --input not yet scored under --output: "
                                   "predictions/, errors/, attention/ overlays, runs/<run_id>.json and "
                                   "report.html. Rerunning scores only what is new or unfinished.")
    p.add_argument("--model", required=True, help="trained model folder or s3:// prefix")
    p.add_argument("--input", required=True, help="folder or s3:// prefix of images (recursive), "
                                                  "or an image folder / parquet / digit CSV data set")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix")
    p.add_argument("--format", choices=SCORE_FORMATS, help="input format (default: detected)")
    p.add_argument("--attention", choices=ATTENTION_MODES, default=d("attention"),
                   help=f"which images get an attention map and overlay (default {d('attention')}: "
                        "those not predicted 'passed')")
    p.add_argument("--method", choices=METHODS, default=d("method"), help=f"(default {d('method')})")
    p.add_argument("--head-fusion", choices=HEAD_FUSIONS, default=d("head_fusion"),
                   help=f"how a layer's heads are combined (rollout; default {d('head_fusion')})")
    p.add_argument("--discard-ratio", type=float, default=d("discard_ratio"),
                   help="share of the weakest attention links dropped per layer, in [0, 1) (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=d("batch_size"),
                   help=f"images per model call (default {d('batch_size')})")
    p.add_argument("--workers", type=_positive_int, default=d("workers"),
                   help=f"inference actors, each loads the model once (default {d('workers')})")
    p.add_argument("--gpus-per-worker", type=float, default=d("gpus_per_worker"),
                   help="GPUs per inference actor (default 0: CPU)")
    p.add_argument("--piece-rows", type=_positive_int, default=d("piece_rows"),
                   help=f"rows committed together; a crash redoes at most the pieces in flight "
                        f"(default {d('piece_rows')})")
    p.add_argument("--submission", help="also write a Kaggle ImageId,Label CSV here (digit CSV input)")
    p.add_argument("--max-error-rate", type=_fraction, default=d("max_error_rate"),
                   help="fail (exit 1) when a larger share of the images cannot be read (default 1.0: never)")
    p.add_argument("--lease-timeout", type=float, default=d("lease_timeout"), metavar="SECONDS",
                   help="one run per --output: a run whose lease was not renewed for this long is gone, "
                        f"and its lease is taken over (default {d('lease_timeout'):.0f})")
    _ray_options(p)
    p.set_defaults(func=_run_score)


def _score_progress() -> tuple[Callable[[dict[str, int]], None], Callable[[], None]]:
    """A progress callback for `score` (a bar on a terminal, lines elsewhere) and its close."""
    from vitray.progress import Progress

    bar: list[Progress] = []

    def show(state: dict[str, int]) -> None:
        if not bar:
            bar.append(Progress("scoring", state["total"], unit="img"))
        bar[0].set(state["scored"] + state["errors"], errors=state["errors"])

    return show, lambda: bar and bar[0].close()


def _run_score(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.score import ScoreConfig, score

    config = ScoreConfig(model=args.model, input=args.input, output=args.output, format=args.format,
                         attention=args.attention, method=args.method, head_fusion=args.head_fusion,
                         discard_ratio=args.discard_ratio, batch_size=args.batch_size,
                         workers=args.workers, gpus_per_worker=args.gpus_per_worker, piece_rows=args.piece_rows,
                         submission=args.submission, max_error_rate=args.max_error_rate,
                         lease_timeout=args.lease_timeout, shared_fs=bool(args.shared_fs),
                         ray_address=args.ray_address, verbose=args.verbose)
    show, close = _score_progress()
    try:
        manifest = score(config, progress=show)
    finally:
        close()
    counts = manifest["counts"]
    rate = manifest["images_per_s"]
    labels = ", ".join(f"{name} {n}" for name, n in sorted(manifest["labels"].items(), key=lambda kv: -kv[1]))
    outputs = {"predictions": storage.join(args.output, "predictions"), "report": manifest["report"],
               "manifest": storage.join(args.output, "runs", f"{manifest['run_id']}.json")}
    if counts["errors"]:
        outputs["errors"] = storage.join(args.output, "errors")
    if manifest.get("submission"):
        outputs["submission"] = manifest["submission"]["uri"]
    print(_summary(f"scored {counts['scored']:,} images ({counts['skipped']:,} already done, {counts['errors']:,} "
                   "errors)" + (f" at {rate:,.0f} img/s" if rate else "") + (f": {labels}" if labels else ""),
                   outputs, f"open {manifest['report']}" if not storage.is_s3(args.output) else
                   f"python -c \"import pyarrow.dataset as d; print(d.dataset('{outputs['predictions']}').head(5))\""))
    return 0


# --------------------------------------------------------------------------- explain


def _add_explain(sub: Any) -> None:
    from vitray.explain import HEAD_FUSIONS, METHODS

    p = sub.add_parser("explain", help="attention maps for a few images",
                       description="Where the model looked: for each IMAGE, OUT/<name>.png (overlay), "
                                   "OUT/<name>_input.png (the image as the model saw it) and OUT/<name>.npy "
                                   "(the map on the patch grid). No Ray needed.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local, file:// or s3://)")
    p.add_argument("--model", required=True, help="trained model folder or s3:// prefix")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--method", choices=METHODS, default="rollout")
    p.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean",
                   help="how a layer's heads are combined (rollout; default mean)")
    p.add_argument("--discard-ratio", type=float, default=0.0,
                   help="share of the weakest attention links dropped per layer, in [0, 1) (default 0)")
    p.set_defaults(func=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    from vitray.explain import explain_images

    results = explain_images(args.model, args.images, args.out, method=args.method, head_fusion=args.head_fusion,
                             discard_ratio=args.discard_ratio)
    width = max(len(r["image"]) for r in results)
    for r in results:
        print(f"{r['image']:<{width}}  {r['label']}  {r['score']:.3f}")
    print(f"maps written to {args.out} (per image: <name>.png overlay, <name>_input.png, <name>.npy map)")
    return 0


# --------------------------------------------------------------------------- main


COMMANDS: list[Callable[[Any], None]] = [_add_synth, _add_train, _add_evaluate, _add_params, _add_tune,
                                           _add_score, _add_explain]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitray", description="Train, tune and run Vision Transformers for "
                                                "visual inspection on Ray.")
    parser.add_argument("--version", action="version", version=f"vitray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():
        _configurable(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Library chatter (download bars, load reports) is not progress; Ray's and ours are.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    try:
        args = parse(argv)
    except VitrayError as exc:
        sys.stderr.write(f"vitray: error: {exc}\n")
        return exc.exit_code
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except VitrayError as exc:
        if exc.exit_code == 130:
            sys.stderr.write(f"vitray: {exc}\n")
            return 130
        if exc.exit_code != 2 and exc.__cause__ is not None:  # a run that failed: keep its traceback
            return _failed(args, exc, str(exc), exc.exit_code)
        sys.stderr.write(f"vitray: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("vitray: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - anything else is one line here, the traceback in a log
        from vitray.faults import describe

        return _failed(args, exc, describe(exc, _output_of(args) or "the run"), 1)


def _summary(headline: str, outputs: dict[str, str], next_command: str) -> str:
    """The closing lines of a command: what it did, where its outputs are, what a user runs next."""
    width = max(len(name) for name in outputs)
    return "\n".join([headline, *(f"  {name:<{width}}  {where}" for name, where in outputs.items()),
                      f"next: {next_command}"])


def setup_logging(verbose: bool) -> None:
    """The one logging set-up: vitray's lines on stderr; the libraries' only with --verbose.

    Quiet, Ray and its workers keep their logs in Ray's log files (vitray.runtime), and the
    libraries' Python warnings (deprecations inside Ray, PyTorch, transformers) are not shown;
    vitray's own warnings and every error are.
    """
    import logging
    import warnings

    from vitray.runtime import VERBOSE_ENV

    os.environ[VERBOSE_ENV] = "1" if verbose else "0"  # Ray's workers and job drivers read it too
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    handler.set_name("vitray")
    root = logging.getLogger()
    # Ours replaces ours (main may run more than once in a process); other handlers stay.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "vitray"] + [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("vitray").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    if not verbose:
        for library in ("ray", "torch", "transformers", "peft", "pyarrow", "datasets", "huggingface_hub",
                        "accelerate", "tqdm"):
            warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")


class _LineFormatter:
    """INFO as the bare message; warnings and errors say so."""

    def format(self, record: Any) -> str:
        import logging

        text = record.getMessage()
        if record.exc_info and logging.getLogger().level <= logging.INFO:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"vitray: {record.levelname.lower()}: {text}" if record.name.startswith("vitray") else \
                f"{record.name}: {record.levelname.lower()}: {text}"
        return text if record.name.startswith("vitray") else f"{record.name}: {text}"


def _output_of(args: argparse.Namespace) -> str | None:
    return getattr(args, "output", None) or getattr(args, "out", None)


def _failed(args: argparse.Namespace, exc: BaseException, line: str, code: int) -> int:
    """One line on stderr naming the log file that holds the traceback (also shown with --verbose)."""
    import traceback

    from vitray.faults import write_log

    output = _output_of(args)
    log = write_log(output if isinstance(output, str) else None, args.command, exc)
    if getattr(args, "verbose", False):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    where = f"; traceback in {log}" if log else ""
    sys.stderr.write(f"vitray: error: {line}{where}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
