"""Every target of anomaly detection from good images, measured in one command.

    python benchmarks/anomaly_benchmark.py --out DIR [--encoder PATH] [--seeds 1,2,3] [--styles synth,alt] [--good 1000] [--test 400]
                                           [--scale 1000,3000,10000] [--pretrain-epochs 100] [--only quality,scale,cost,search]

- quality: per renderer and seed, a bank fitted on `--good` good images and measured on `--test`
  images half good, half novel defects (`vitray synth --defects novel`: scratch, empty seat,
  foreign object, chipped corner, second part; no fit ever sees one): image AUROC, pointing game
  and energy of the anomaly map in the defect's box, min and mean over seeds. `synth` is the
  renderer the recipe was chosen on; `alt` is held out (never used to choose anything).
- scale: a fit on 1k / 3k / 10k good images in a process of its own: wall time, time per image,
  peak resident memory (the process's, with the in-process fit), bank rows.
- cost: scoring with the anomaly head against the classifier alone, side by side in one run
  (pairs alternated, median ratio): the head as a second stage (its own encoder pass), and the
  head on the classifier's own forward pass (a bank fitted on the classifier's backbone).
- search: nearest-neighbour search, exact sliced matrix products in torch against faiss-cpu's
  exact index (IndexFlatL2), when faiss is importable.

The encoder is `--encoder` (any ViT folder), else one `vitray pretrain` makes on unlabelled
images of both renderers' inspection task (shifted parts only, never a novel defect).
Results: DIR/anomaly.json and a table on stdout; docs/anomaly.md keeps the measured table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
VITRAY = [PYTHON, "-m", "vitray.cli"]
RENDERERS = {"synth": "chosen on", "alt": "held out"}


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def synth(out: str, n: int, seed: int, style: str, extra: list[str]) -> str:
    if not os.path.exists(os.path.join(out, ".synth.json")):
        run([*VITRAY, "synth", out, "--n", str(n), "--seed", str(seed), "--style", style, *extra])
    return out


def encoder_for(args: argparse.Namespace) -> str:
    if args.encoder:
        return args.encoder
    out = os.path.join(args.out, "encoder")
    if os.path.exists(os.path.join(out, "model", "config.json")):
        return os.path.join(out, "model")
    pre = os.path.join(args.out, "unlabelled")
    for style, seed in (("synth", 101), ("alt", 102)):
        synth(os.path.join(pre, style), args.pretrain_images // 2, seed, style, ["--format", "imagefolder"])
    run([*VITRAY, "pretrain", "--data", pre, "--out", out, "--epochs", str(args.pretrain_epochs), "--model", "vit-tiny",
         "--image-size", "64"])
    return os.path.join(out, "model")


def quality(args: argparse.Namespace, encoder: str) -> dict:
    from vitray.anomaly import AnomalyConfig, fit_bank
    from vitray.evaluate import EvaluateConfig, evaluate_anomaly

    results: dict = {}
    for style in args.styles:
        runs = []
        for seed in args.seeds:
            root = os.path.join(args.out, "quality", f"{style}-{seed}")
            good = synth(os.path.join(root, "good"), args.good, 1000 + seed, style, ["--passed-fraction", "1.0"])
            test = synth(os.path.join(root, "test"), args.test, 2000 + seed, style,
                         ["--defects", "novel", "--passed-fraction", "0.5"])
            fit = fit_bank(AnomalyConfig(data=good, model=encoder.format(seed=seed, style=style),
                                         out=os.path.join(root, "bank"), seed=seed, in_process_max=10 ** 6))
            m = evaluate_anomaly(EvaluateConfig(test, os.path.join(root, "eval"), anomaly=os.path.join(root, "bank"),
                                                 in_process_max=10 ** 6))
            runs.append({"seed": seed, "auroc": m["auroc"], "pointing_game": m["localization"]["pointing_game"],
                         "energy_in_box": m["localization"]["energy_in_box"],
                         "false_reject_rate": m["false_reject_rate"], "detection_rate": m["detection_rate"],
                         "per_kind_auroc": {k: v["auroc"] for k, v in m["per_kind"].items()},
                         "bank_rows": fit.meta.rows, "fit_seconds": fit.summary["seconds"]})
            print(f"quality {style} seed {seed}: {json.dumps(runs[-1])}", flush=True)
        results[style] = {"renderer": RENDERERS[style], "runs": runs,
                          **{f"{key}_{stat}": round(fn(r[key] for r in runs), 4)
                             for key in ("auroc", "pointing_game", "energy_in_box")
                             for stat, fn in (("min", min), ("mean", lambda v: statistics.mean(list(v))))}}
    return results


FIT_CHILD = """
import json, resource, sys, time
from vitray.anomaly import AnomalyConfig, fit_bank
t = time.monotonic()
r = fit_bank(AnomalyConfig(data=sys.argv[1], model=sys.argv[2], out=sys.argv[3], in_process_max=10 ** 7))
print(json.dumps({"seconds": time.monotonic() - t, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bank_rows": r.meta.rows, "merges": r.summary["merges"], "images": r.summary["images"]}))
"""


def scale(args: argparse.Namespace, encoder: str) -> list[dict]:
    rows = []
    for n in args.scale:
        good = synth(os.path.join(args.out, "scale", f"good-{n}"), n, 3000 + n, "synth", ["--passed-fraction", "1.0"])
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        done = subprocess.run([PYTHON, "-c", FIT_CHILD, good, encoder, os.path.join(args.out, "scale", f"bank-{n}")],
                              check=True, capture_output=True, text=True, env=env)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["ms_per_image"] = round(1000 * row["seconds"] / n, 2)
        rows.append(row)
        print(f"scale {n}: {json.dumps(row)}", flush=True)
    return rows


def classifier_over(encoder: str, out: str) -> str:
    """A classifier whose backbone is `encoder` (its head new): what a line's scoring model is."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from transformers import ViTForImageClassification

    from vitray.models import Preprocessing, export_model

    labels = ["Xminus", "Xplus", "Yminus", "Yplus", "passed"]
    model = ViTForImageClassification.from_pretrained(encoder, num_labels=5, id2label=dict(enumerate(labels)),
                                                      ignore_mismatched_sizes=True,
                                                      label2id={n: i for i, n in enumerate(labels)})
    export_model(model.eval(), Preprocessing.load(encoder, channels=model.config.num_channels), out)
    return out


def cost(args: argparse.Namespace, encoder: str) -> dict:
    import numpy as np
    import torch

    from vitray.anomaly import AnomalyScorer
    from vitray.data.readers import iter_encoded
    from vitray.data.sources import inspect_source
    from vitray.inference import Predictor, PredictOptions, prepare_images

    torch.set_num_threads(1)  # as an inference actor holding one CPU
    model = classifier_over(encoder, os.path.join(args.out, "cost", "classifier"))
    root = os.path.join(args.out, "quality", f"{args.styles[0]}-{args.seeds[0]}")
    bank = os.path.join(root, "bank")  # fitted on the encoder = this classifier's backbone
    test = inspect_source(os.path.join(root, "test"))
    batch = prepare_images(next(iter_encoded(test)), 64, 3)
    images = {"id": batch["id"][:256], "image": batch["image"][:256], "error_kind": batch["error_kind"][:256]}
    predictor, scorer = Predictor(model, PredictOptions()), AnomalyScorer(bank)
    # The scoring stage of `vitray score --anomaly`: the bank read from the classifier's own pass.
    with_head = Predictor(model, PredictOptions(anomaly=bank))
    assert with_head.anomaly.shared

    def alone() -> None:
        predictor(dict(images))

    def two_stages() -> None:  # the predictor drops the pixels when it makes no maps: the head takes them first
        predictor(scorer(dict(images)))

    def one_pass() -> None:
        with_head(dict(images))

    timings: dict[str, list[float]] = {"alone": [], "two_stages": [], "one_pass": []}
    for fn in (alone, two_stages, one_pass):
        fn()  # warm-up
    for _ in range(args.cost_pairs):
        for name, fn in (("alone", alone), ("two_stages", two_stages), ("one_pass", one_pass)):
            t = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t)
    ratios = {name: round(statistics.median(b / a for a, b in zip(timings["alone"], timings[name])), 3)
              for name in ("two_stages", "one_pass")}
    result = {"images": len(images["id"]), "alone_ms": round(1000 * statistics.median(timings["alone"]), 1),
              **{f"{k}_ratio": v for k, v in ratios.items()}, "bank_rows": scorer.bank.meta.rows}
    print(f"cost: {json.dumps(result)}", flush=True)
    return result


def search(args: argparse.Namespace) -> dict:
    import torch

    from vitray.anomaly.bank import nearest_distances

    torch.manual_seed(0)
    bank, queries = torch.randn(16384, 128), torch.randn(256 * 64, 128)
    t = time.perf_counter()
    exact = nearest_distances(queries, bank)
    result: dict = {"bank_rows": 16384, "queries": len(queries), "torch_s": round(time.perf_counter() - t, 3)}
    try:
        import faiss
    except ImportError:
        result["faiss"] = "not installed"
    else:
        index = faiss.IndexFlatL2(128)
        index.add(bank.numpy())
        t = time.perf_counter()
        d, _ = index.search(queries.numpy(), 1)
        result["faiss_s"] = round(time.perf_counter() - t, 3)
        result["max_abs_diff"] = float((torch.from_numpy(d[:, 0]).clamp(min=0).sqrt() - exact).abs().max())
    print(f"search: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--encoder", help="a ViT folder; {seed} and {style} in it are replaced per quality run "
                                          "(e.g. the line's classifier trained on that renderer with that seed)")
    parser.add_argument("--styles", type=lambda s: s.split(","), default=list(RENDERERS))
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 3])
    parser.add_argument("--good", type=int, default=1000)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--scale", type=lambda s: [int(v) for v in s.split(",")], default=[1000, 3000, 10000])
    parser.add_argument("--pretrain-epochs", type=int, default=100)
    parser.add_argument("--pretrain-images", type=int, default=3000)
    parser.add_argument("--cost-pairs", type=int, default=7)
    parser.add_argument("--only", default="quality,scale,cost,search")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parts = set(args.only.split(","))
    path = os.path.join(args.out, "anomaly.json")
    report = json.load(open(path)) if os.path.exists(path) else {}
    encoder = encoder_for(args) if parts - {"search"} else None
    if parts & {"scale", "cost"} and encoder and "{" in encoder:
        parser.error("--encoder with {seed} or {style} serves --only quality")
    report["encoder"] = encoder
    for name, fn in (("quality", quality), ("scale", scale), ("cost", cost)):
        if name in parts:
            report[name] = fn(args, encoder)
            json.dump(report, open(path, "w"), indent=1)
    if "search" in parts:
        report["search"] = search(args)
    json.dump(report, open(path, "w"), indent=1)
    for style, q in report.get("quality", {}).items():
        print(f"{style} ({q['renderer']}): AUROC min/mean {q['auroc_min']}/{q['auroc_mean']}, pointing "
              f"{q['pointing_game_min']}/{q['pointing_game_mean']}, energy {q['energy_in_box_min']}/"
              f"{q['energy_in_box_mean']}")
    for row in report.get("scale", []):
        print(f"fit {row['images']} images: {row['seconds']:.1f} s ({row['ms_per_image']} ms/img), peak "
              f"{row['peak_rss_mib']:.0f} MiB, bank {row['bank_rows']} rows")
    if "cost" in report:
        c = report["cost"]
        print(f"scoring with the anomaly head / the classifier alone: {c['two_stages_ratio']} as a second stage, "
              f"{c['one_pass_ratio']} on the classifier's forward pass")


if __name__ == "__main__":
    main()
