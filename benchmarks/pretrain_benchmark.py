"""MAE pre-training then fine-tuning against training from scratch, on the same few labels.

    python benchmarks/pretrain_benchmark.py --out DIR [--quick] [--unlabelled N] [--labels 100,300,1000]
                                            [--seeds 3] [--size 64] [--pretrain-epochs 100] [--epochs 40]
                                            [--model vit-tiny] [--workers 2] [--gpus-per-worker 0]

The situation of docs/pretrain.md: a line that makes many images and a person who labels a few.
`vitray synth` renders N unlabelled images (style `synth`, passed at 2%; their labels are never
read), a labelled set of each size in --labels (the same renderer, passed at 2%, other seeds) and
a separate test rendering (1,000 images, passed at 20%, as benchmarks/quality.py). Then:

- pre-training: `vitray.train.pretrain.pretrain` on the unlabelled images, once; its images per second
  (the mean of its epochs after the first, which carries the start-up) is the throughput figure;
- for each label count and seed: `vitray.train.train` from scratch (a preset sized for the data)
  and from the pre-trained encoder (`--model PRE/model`, full fine-tuning), the same recipe for
  both (vitray's defaults, and --lr: by default 1e-3, train's default for both arms), each scored with `vitray.evaluate.evaluate` on the test
  rendering: macro-F1 and the recall of `passed`, min and mean over the seeds.

Writes OUT/pretrain_benchmark.json and prints a table. The full run (3,000 unlabelled at 64 px, 100
pre-training epochs, 100/300/1000 labels, 3 seeds) is for a GPU node or a long CPU night;
--quick is a smoke run of a few minutes on two cores (500 unlabelled at 32 px, 10 pre-training
epochs, 200 labels, 2 seeds, 10 fine-tuning epochs), whose figures say that it runs, not which arm wins.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

TEST_IMAGES = 1000
TEST_PASSED = 0.2
PASSED = 0.02


@dataclass(frozen=True)
class Plan:
    unlabelled: int = 3000
    labels: tuple[int, ...] = (100, 300, 1000)
    seeds: int = 3
    size: int = 64
    pretrain_epochs: int = 100
    epochs: int = 40
    lr: float = 1e-3  # both arms' (fine-tuning) learning rate
    model: str | None = None  # None: the preset vitray sizes for the data
    workers: int = 2
    gpus_per_worker: float = 0.0
    test_images: int = TEST_IMAGES


QUICK = Plan(unlabelled=500, labels=(200,), seeds=2, size=32, pretrain_epochs=10, epochs=10, test_images=300)


def render(out: str, plan: Plan) -> dict[str, str]:
    """The data sets, rendered once (a second run over the same OUT reuses them)."""
    from vitray.data import synth

    sets = {"unlabelled": (plan.unlabelled, PASSED, 21), "test": (plan.test_images, TEST_PASSED, 23),
            **{f"labelled-{n}": (n, PASSED, 100 + n) for n in plan.labels}}
    paths = {}
    for name, (n, passed, seed) in sets.items():
        path = os.path.join(out, "data", f"{name}-{plan.size}px")
        if not os.path.isdir(path):
            # An image folder: no boxes, so evaluation scores the predictions only (no attention maps).
            synth.write(path, n=n, passed_fraction=passed, size=plan.size, seed=seed, fmt="imagefolder")
        paths[name] = path
    return paths


def pretrain_once(out: str, data: str, plan: Plan) -> dict:
    from vitray.train.pretrain import PretrainConfig, pretrain

    started = time.perf_counter()
    result = pretrain(PretrainConfig(data=data, out=out, model=plan.model, epochs=plan.pretrain_epochs,
                                     workers=plan.workers, gpus_per_worker=plan.gpus_per_worker))
    rates = [row["images_per_s"] for row in result.history[1:]] or [result.history[0]["images_per_s"]]
    return {"seconds": round(time.perf_counter() - started, 1), "images_per_s": round(float(np.mean(rates)), 1),
            "loss": result.history[-1]["loss"], "val_loss": result.history[-1]["val_loss"],
            "model": os.path.join(out, "model")}


def fine_tune(out: str, data: str, test: str, model: str | None, seed: int, plan: Plan) -> dict:
    """One arm's training on the labelled images and its figures on the test rendering."""
    from vitray.evaluate import EvaluateConfig, evaluate
    from vitray.train import TrainConfig, train

    started = time.perf_counter()
    train(TrainConfig(data=data, out=os.path.join(out, "train"), model=model, epochs=plan.epochs, seed=seed,
                      lr=plan.lr, workers=plan.workers, gpus_per_worker=plan.gpus_per_worker))
    metrics = evaluate(EvaluateConfig(test, os.path.join(out, "evaluate"), model=os.path.join(out, "train", "model"),
                                      gpus_per_worker=plan.gpus_per_worker))
    passed = metrics["per_class"]["passed"]["recall"]
    return {"macro_f1": round(metrics["macro_f1"], 4), "passed_recall": round(passed, 4),
            "accuracy": round(metrics["accuracy"], 4), "seconds": round(time.perf_counter() - started, 1)}


def summary(runs: list[dict]) -> dict:
    """min and mean over the seeds of each (labels, arm)."""
    table: dict = {}
    for run in runs:
        table.setdefault(run["labels"], {}).setdefault(run["arm"], []).append(run)
    stats = (("min", np.min), ("mean", np.mean))
    return {labels: {arm: {f"{key}_{stat}": round(float(fn([r[key] for r in rows])), 4)
                           for key in ("macro_f1", "passed_recall") for stat, fn in stats}
                     for arm, rows in arms.items()}
            for labels, arms in table.items()}


def print_table(result: dict) -> None:
    pre = result["pretrain"]
    print(f"\npre-training: {result['plan']['unlabelled']:,} images, {result['plan']['pretrain_epochs']} epochs, "
          f"{pre['images_per_s']:,.0f} img/s, {pre['seconds']:.0f} s, final loss {pre['loss']:.4f} "
          f"(validation {pre['val_loss']:.4f})")
    print(f"{'labels':>7}  {'arm':<8} {'macro-F1 min':>12} {'mean':>6} {'passed recall min':>18} {'mean':>6}")
    for labels, arms in sorted(result["summary"].items(), key=lambda kv: int(kv[0])):
        for arm, s in arms.items():
            print(f"{labels:>7}  {arm:<8} {s['macro_f1_min']:>12.3f} {s['macro_f1_mean']:>6.3f} "
                  f"{s['passed_recall_min']:>18.3f} {s['passed_recall_mean']:>6.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes (see the docstring)")
    parser.add_argument("--unlabelled", type=int)
    parser.add_argument("--labels", help="labelled set sizes, comma-separated (a label-count curve)")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--pretrain-epochs", type=int)
    parser.add_argument("--epochs", type=int, help="fine-tuning / from-scratch epochs")
    parser.add_argument("--lr", type=float, help="both arms' learning rate (default 1e-3)")
    parser.add_argument("--model", help="the preset of both arms (default: the one vitray sizes for the data)")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--gpus-per-worker", type=float)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    given = {k: v for k, v in vars(args).items() if v is not None and k in Plan.__dataclass_fields__}
    if args.labels:
        given["labels"] = tuple(int(n) for n in args.labels.split(","))
    plan = replace(plan, **given)
    os.environ.setdefault("VITRAY_PROGRESS_INTERVAL", "30")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # as the CLI: no load report per new head

    paths = render(args.out, plan)
    pre = pretrain_once(os.path.join(args.out, "pretrain"), paths["unlabelled"], plan)
    print(f"pre-trained: {pre}", flush=True)
    runs = []
    for labels in plan.labels:
        for seed in range(plan.seeds):
            for arm, model in (("scratch", plan.model), ("mae", pre["model"])):
                folder = os.path.join(args.out, "runs", f"{labels}-labels", f"{arm}-seed{seed}")
                figures = fine_tune(folder, paths[f"labelled-{labels}"], paths["test"], model, seed, plan)
                runs.append({"labels": labels, "arm": arm, "seed": seed, **figures})
                print(f"{labels} labels, {arm}, seed {seed}: {figures}", flush=True)
    result = {"plan": {**plan.__dict__, "labels": list(plan.labels)}, "pretrain": pre, "runs": runs,
              "summary": summary(runs), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                    "python": sys.version.split()[0]}}
    with open(os.path.join(args.out, "pretrain_benchmark.json"), "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
