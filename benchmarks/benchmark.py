"""Throughput of vitray's Ray paths against plain PyTorch, as ratios measured side by side in one run.

`python benchmarks/benchmark.py --out DIR [--quick] [--startup] [--gpu]` writes DIR/benchmark.json and prints a table.
The model is the from-scratch preset that `vitray train` builds by default (vit-tiny, here on
64 px synthetic inspection images), untrained: throughput does not depend on the weights.
Every ratio compares two figures taken in this run, on this machine, with the same batch size
and thread count. `--startup` adds `benchmarks/startup.py`'s start-up figures (small runs from the
command to their exit, against plain scripts); `--gpu` adds `benchmarks/gpu_benchmark.py`'s bf16
ViT-B/16 sweep when CUDA is there.

This file is the run and its table; the scoring side is `scoring_speed.py`, the training side
`training_speed.py`, and how both measure (sizes, memory, rates) `measuring.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# benchmarks/ is first on sys.path when this file runs
from measuring import QUICK, Sizes, file_create_ms  # noqa: E402
from scoring_speed import (forward_rate, load_images, make_data, make_model, naive_rate,  # noqa: E402
                           score_run, scores_folder)
from training_speed import (alternate, pairs_detail, ray_pretrain_rate, ray_train_rate,  # noqa: E402
                            torch_pretrain_rate, torch_train_rate)

TARGETS = {  # ratio: (comparison, target) from the speed issue
    "train_ray_vs_torch": (">=", 0.9),
    "pretrain_ray_vs_torch": (">=", 0.9),  # the same bar for MAE pre-training
    "score_vs_forward": (">=", 0.9),
    "score_vs_naive": (">=", 3.0),
    "attention_overhead": ("<=", 1.15),
    "memory_growth": ("<=", 1.2),
}

# startup.py's scoring images, training images and rounds (a round runs every command once).
STARTUP = (2000, 300, 2)
STARTUP_QUICK = (200, 100, 1)
STARTUP_TARGETS = {"score_exit": 1.5, "score_first_piece_s": 8.0, "explain": 2.0}  # from the start-up issue


def cpu_benchmark(work: str, sizes: Sizes, scores: str) -> dict[str, Any]:
    """Every CPU figure and ratio; the plain-PyTorch side runs in this process, vitray's on the embedded Ray."""
    from vitray.runtime import RayOptions, init_ray

    # The thread budget: a scoring actor asks Ray for 1 CPU, and Ray gives it 1 intra-op thread
    # (OMP_NUM_THREADS); a train worker takes the machine's cores divided by the workers on the node.
    score_threads = 1
    train_threads = max(1, os.cpu_count() or 1)
    print("generating images ...", flush=True)
    data = make_data(work, sizes)
    model_dir = make_model(work, sizes)
    files, pixels, _ = load_images(data["small"])
    _, train_pixels, train_labels = load_images(data["train"])
    init_ray(RayOptions())  # before any figure, so that Ray's idle processes weigh on both sides alike

    print("plain forward pass ...", flush=True)
    forward = forward_rate(model_dir, pixels, sizes.score_batch, score_threads, sizes.forward_seconds)
    print("seed-style loop ...", flush=True)
    naive = naive_rate(model_dir, files[: sizes.naive_images], score_threads)
    # A first run starts Ray's task workers and pays their imports: not measured, so that the small
    # and the large run start equally warm.
    os.makedirs(scores, exist_ok=True)
    create_ms = {"work_folder": round(file_create_ms(work), 3), "scores_folder": round(file_create_ms(scores), 3)}
    if sizes.warm_up:
        score_run(model_dir, data["small"], os.path.join(scores, "warm-up"), "none", sizes)
    runs = {}
    plan = [("none_small", data["small"], "none")]
    suffixes = [""] + [f"_{p}" for p in range(2, sizes.overhead_pairs + 1)]  # one per pair
    for suffix in suffixes:
        plan += [(f"none_large{suffix}", data["large"], "none"), (f"all_large{suffix}", data["large"], "all")]
    for name, images, attention in plan:
        print(f"vitray score --attention {attention} on {os.path.basename(images)} ...", flush=True)
        runs[name] = score_run(model_dir, images, os.path.join(scores, name), attention, sizes)
        shutil.rmtree(os.path.join(scores, name), ignore_errors=True)  # tmpfs is memory
    pair_ratios = [runs[f"none_large{s}"]["steady_images_per_s"] / runs[f"all_large{s}"]["steady_images_per_s"]
                   for s in suffixes]
    train_pairs = alternate(sizes.train_pairs, "training", lambda: torch_train_rate(
        sizes, train_pixels, train_labels, train_threads, sizes.train_epochs), lambda: ray_train_rate(
        sizes, data["train"], os.path.join(work, "train-run")))
    pretrain_pairs = alternate(sizes.train_pairs, "MAE pre-training", lambda: torch_pretrain_rate(
        sizes, train_pixels, train_threads, sizes.train_epochs), lambda: ray_pretrain_rate(
        sizes, data["train"], os.path.join(work, "pretrain-run")))
    # The best large run of each kind, as the forward pass is the best of its windows.
    none = max(runs[f"none_large{s}"]["steady_images_per_s"] for s in suffixes)
    full = max(runs[f"all_large{s}"]["steady_images_per_s"] for s in suffixes)
    ratios = {
        "train_ray_vs_torch": statistics.median(p["ratio"] for p in train_pairs),
        "pretrain_ray_vs_torch": statistics.median(p["ratio"] for p in pretrain_pairs),
        "score_vs_forward": none / forward,
        "score_vs_naive": none / naive,
        "attention_overhead": statistics.median(pair_ratios),  # time per image with maps over time without
        "memory_growth": runs["none_large"]["peak_pss_mb"] / runs["none_small"]["peak_pss_mb"],
    }
    return {
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {k: f"{op} {t}" for k, (op, t) in TARGETS.items()},
        "met": {k: (ratios[k] >= t if op == ">=" else ratios[k] <= t) for k, (op, t) in TARGETS.items()},
        "figures": {
            "forward_images_per_s": round(forward, 1), "naive_images_per_s": round(naive, 1),
            "score_steady_images_per_s": {"none": round(none, 1), "all": round(full, 1)},
            "attention_overhead_pairs": [round(r, 3) for r in pair_ratios],
            "score": runs, "train_pairs": train_pairs, "pretrain_pairs": pretrain_pairs,
        },
        "threads": {"score_and_forward_and_naive": score_threads, "train_both": train_threads},
        "scores_folder": scores, "file_create_ms": create_ms,
    }


def startup_table(up: dict[str, Any]) -> list[str]:
    """startup.py's medians: each command's wall time against its plain script's, and the targets."""
    lines = ["| start-up: from the command to its exit | vitray | plain script | ratio | target |", "|---|---|---|---|---|"]
    if up.get("images"):
        t = STARTUP_TARGETS
        lines += [f"| `vitray score`, {up['images']:,} PNGs, in its own process | {up['vitray']['exit_s']:.1f} s "
                  f"| {up['plain_s']:.1f} s | {up['ratio']:.2f} | <= {t['score_exit']} |",
                  f"| the same, first committed piece | {up['vitray']['first_piece_s']:.1f} s | | "
                  f"| <= {t['score_first_piece_s']:g} s |",
                  f"| the same on an embedded Ray | {up['vitray_on_ray']['exit_s']:.1f} s | {up['plain_s']:.1f} s "
                  f"| {up['ratio_on_ray']:.2f} | |",
                  f"| `vitray explain`, 3 images | {up['explain_3_images']['vitray_s']:.1f} s "
                  f"| {up['explain_3_images']['plain_s']:.1f} s | {up['explain_3_images']['ratio']:.2f} "
                  f"| <= {t['explain']:g} |"]
    if "train" in up:
        train = up["train"]
        lines += [f"| `vitray train`, {train['images']:,} images, 1 epoch, in its own process "
                  f"| {train['vitray']['exit_s']:.1f} s | {train['plain']['exit_s']:.1f} s | {train['ratio']:.2f} | |",
                  f"| the same on an embedded Ray | {train['on_ray']['exit_s']:.1f} s "
                  f"| {train['plain']['exit_s']:.1f} s | {train['ratio_on_ray']:.2f} | |"]
    return lines


def table(results: dict[str, Any]) -> str:
    """The ratios, their targets and the figures they divide, as a Markdown table."""
    cpu = results.get("cpu", {})
    lines = []
    if "ratios" in cpu:
        f, runs, steady = cpu["figures"], cpu["figures"]["score"], cpu["figures"]["score_steady_images_per_s"]
        detail = {
            "train_ray_vs_torch": pairs_detail(f["train_pairs"]),
            "pretrain_ray_vs_torch": pairs_detail(f.get("pretrain_pairs", [])),
            "score_vs_forward": f"{steady['none']:,.0f} / {f['forward_images_per_s']:,.0f} img/s",
            "score_vs_naive": f"{steady['none']:,.0f} / {f['naive_images_per_s']:,.0f} img/s",
            "attention_overhead": f"best {steady['none']:,.0f} / {steady['all']:,.0f} img/s (none / all)" + (
                "; median of pairs " + ", ".join(f"{r:.2f}" for r in f["attention_overhead_pairs"])
                if len(f.get("attention_overhead_pairs", [])) > 1 else ""),
            "memory_growth": f"{runs['none_large']['peak_pss_mb']:,.0f} / {runs['none_small']['peak_pss_mb']:,.0f} MB "
                             f"({runs['none_large']['images']:,} / {runs['none_small']['images']:,} images)",
        }
        lines += ["| ratio | measured | target | met | from |", "|---|---|---|---|---|"]
        for name, value in cpu["ratios"].items():
            lines.append(f"| {name} | {value:.2f} | {cpu['targets'][name]} | {'yes' if cpu['met'][name] else 'NO'} "
                         f"| {detail[name]} |")
        if "file_create_ms" in cpu:
            create = cpu["file_create_ms"]
            lines.append(f"\nScore outputs in {cpu['scores_folder']}: creating a file took {create['scores_folder']:.3f} ms "
                         f"there, {create['work_folder']:.3f} ms under --out.")
    elif cpu:
        lines.append(f"CPU part: {cpu.get('skipped')}")
    if "startup" in results:
        lines += ["", *startup_table(results["startup"])]
    gpu = results.get("gpu")
    if gpu and "score" in gpu:
        lines += ["", f"GPU: {gpu['device']}, {gpu['model']}", "| batch | score, no maps | score, maps for all | train step |",
                  "|---|---|---|---|"]
        score = {(r["attention"], r["batch_size"]): r["images_per_s"] for r in gpu["score"]}
        train = {r["batch_size"]: r["images_per_s"] for r in gpu["train"]}
        for bs in sorted({b for _, b in score}):
            cells = [score.get(("none", bs)), score.get(("all", bs)), train.get(bs)]
            lines.append(f"| {bs} | " + " | ".join("—" if c is None else f"{c:,.0f}" for c in cells) + " |")
    elif gpu:
        lines.append(f"GPU part: {gpu.get('skipped')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for benchmark.json (and the run's scratch data)")
    parser.add_argument("--quick", action="store_true", help="a smoke test (about a minute and a half on 2 cores); "
                        "its figures are too small to mean anything")
    parser.add_argument("--gpu", action="store_true", help="also run benchmarks/gpu_benchmark.py's sweep (needs CUDA)")
    parser.add_argument("--gpu-batch-sizes", default=None, help="for --gpu; default gpu_benchmark's")
    parser.add_argument("--startup", action="store_true", help="also benchmarks/startup.py's start-up figures "
                        "(fresh `vitray` processes against plain scripts; ~6 min, --quick: ~2)")
    parser.add_argument("--keep", action="store_true", help="keep the generated images, model and outputs")
    parser.add_argument("--scores-to", default="auto", metavar="auto|work|FOLDER",
                        help="where the score runs write: auto = /dev/shm when there is one (see scores_folder), "
                             "work = under --out")
    args = parser.parse_args()
    if args.scores_to not in ("auto", "work") and not (os.path.isdir(args.scores_to)
                                                        and os.access(args.scores_to, os.W_OK)):
        parser.error(f"--scores-to {args.scores_to}: not a writable folder")
    sizes = QUICK if args.quick else Sizes()
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "work")
    shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = environment(args, sizes)
    started = time.perf_counter()
    if args.startup:  # first: fresh processes, before this one starts a Ray whose idle processes would weigh
        import startup  # benchmarks/ is first on sys.path

        results["startup"] = startup.measure(*STARTUP_QUICK if args.quick else STARTUP)
    try:
        import ray  # noqa: F401 - only to know whether the Ray side can run here
    except ImportError:
        if not args.gpu:
            print("benchmark: error: ray is not installed (only --gpu runs without it)", file=sys.stderr)
            return 2
        results["cpu"] = {"skipped": "ray is not installed here"}
    else:
        scores = scores_folder(args.scores_to, work)
        try:
            results["cpu"] = cpu_benchmark(work, sizes, scores)
        finally:
            if not args.keep:
                shutil.rmtree(scores, ignore_errors=True)
    if args.gpu:
        results["gpu"] = gpu_benchmark(args.gpu_batch_sizes)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, "benchmark.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    print(f"\n{results['wall_s']:.0f} s; figures in {os.path.join(args.out, 'benchmark.json')}")
    return 0


def environment(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    import numpy
    import PIL
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__}
    try:
        import ray

        versions["ray"] = ray.__version__
    except ImportError:
        versions["ray"] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"machine": {"cores": os.cpu_count(), "cpu": cpu, "memory_gb": _memory_gb(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                        "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
            "versions": versions, "commit": _commit(), "arguments": vars(args), "sizes": asdict(sizes)}


def _memory_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def gpu_benchmark(batch_sizes: str | None) -> dict[str, Any]:
    """benchmarks/gpu_benchmark.py's sweep, or why it did not run."""
    import torch

    from gpu_benchmark import DEFAULT_BATCH_SIZES, gpu_sweep  # benchmarks/ is first on sys.path

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    return gpu_sweep([int(b) for b in (batch_sizes or DEFAULT_BATCH_SIZES).split(",")])


if __name__ == "__main__":
    sys.exit(main())
