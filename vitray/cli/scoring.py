"""`vitray score` (bulk, with Ray Data) and `vitray explain` (a few images, no Ray)."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from vitray.cli.options import fraction, in_process_option, option_default, positive_int, ray_options, summary


def add_score(sub: Any) -> None:
    from vitray.attention import HEAD_FUSIONS
    from vitray.inference import ATTENTION_MODES
    from vitray.rollout import METHODS
    from vitray.score import SCORE_FORMATS, ScoreConfig
    from vitray.score.pipeline import ENGINES

    d = lambda name: option_default(ScoreConfig, name)  # noqa: E731
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
    p.add_argument("--batch-size", type=positive_int, default=d("batch_size"),
                   help=f"images per model call (default {d('batch_size')})")
    p.add_argument("--workers", type=positive_int, default=d("workers"),
                   help=f"inference actors, each loads the model once (default {d('workers')})")
    p.add_argument("--gpus-per-worker", type=float, default=d("gpus_per_worker"),
                   help="GPUs per inference actor (default 0: CPU)")
    p.add_argument("--piece-rows", type=positive_int, default=d("piece_rows"),
                   help=f"rows committed together; a crash redoes at most the pieces in flight "
                        f"(default {d('piece_rows')})")
    in_process_option(p, d("in_process_max"))
    p.add_argument("--submission", help="also write a Kaggle ImageId,Label CSV here (digit CSV input)")
    p.add_argument("--max-error-rate", type=fraction, default=d("max_error_rate"),
                   help="fail (exit 1) when a larger share of the images cannot be read (default 1.0: never)")
    p.add_argument("--engine", choices=ENGINES, default=d("engine"),
                   help="torch, or onnx: onnxruntime over the model's ONNX export (made once per run, or "
                        f"--model FILE.onnx from `vitray export`) (default {d('engine')})")
    p.add_argument("--lease-timeout", type=float, default=d("lease_timeout"), metavar="SECONDS",
                   help="one run per --output: a run whose lease was not renewed for this long is gone, "
                        f"and its lease is taken over (default {d('lease_timeout'):.0f})")
    p.add_argument("--fail-on-drift", action="store_true", default=d("fail_on_drift"),
                   help="with a calibrated model (vitray calibrate): exit 3 when tonight's images drifted from the "
                        "calibration's (without it, one line says so)")
    p.add_argument("--anomaly", metavar="BANK",
                   help="an anomaly bank (vitray anomaly): each image's anomaly score and map, overlays under "
                        "OUT/anomaly/ as --attention says (defects: the anomalous images); with a calibrated "
                        "model an anomalous image is never decided OK")
    ray_options(p)
    p.set_defaults(func=run_score)


def _score_progress() -> tuple[Callable[[dict[str, int]], None], Callable[[], None]]:
    """A progress callback for `score` (a bar on a terminal, lines elsewhere) and its close."""
    from vitray.progress import Progress

    bar: list[Progress] = []

    def show(state: dict[str, int]) -> None:
        if not bar:
            bar.append(Progress("scoring", state["total"], unit="img"))
        bar[0].set(state["scored"] + state["errors"], errors=state["errors"])

    return show, lambda: bar and bar[0].close()


def run_score(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.score import ScoreConfig, score

    config = ScoreConfig(model=args.model, input=args.input, output=args.output, format=args.format,
                         attention=args.attention, method=args.method, head_fusion=args.head_fusion,
                         discard_ratio=args.discard_ratio, batch_size=args.batch_size,
                         workers=args.workers, gpus_per_worker=args.gpus_per_worker, piece_rows=args.piece_rows,
                         in_process_max=args.in_process_max,
                         submission=args.submission, max_error_rate=args.max_error_rate,
                         lease_timeout=args.lease_timeout, shared_fs=bool(args.shared_fs), engine=args.engine,
                         ray_address=args.ray_address, verbose=args.verbose,
                         fail_on_drift=bool(args.fail_on_drift), anomaly=args.anomaly)
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
    decisions = manifest.get("decisions")
    if decisions:
        labels = ", ".join(f"{name.upper()} {n}" for name, n in decisions["counts"].items())
        if decisions["review"].get("csv"):
            outputs["review"] = decisions["review"]["csv"]
    if manifest.get("anomaly"):
        labels += f"; {manifest['anomaly']['anomalous']:,} anomalous"
    print(summary(f"scored {counts['scored']:,} images ({counts['skipped']:,} already done, {counts['errors']:,} "
                   "errors)" + (f" at {rate:,.0f} img/s" if rate else "") + (f": {labels}" if labels else ""),
                   outputs, f"open {manifest['report']}" if not storage.is_s3(args.output) else
                   f"python -c \"import pyarrow.dataset as d; print(d.dataset('{outputs['predictions']}').head(5))\""))
    return 0



def add_explain(sub: Any) -> None:
    from vitray.attention import HEAD_FUSIONS
    from vitray.rollout import METHODS

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
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    from vitray.explain import explain_images

    results = explain_images(args.model, args.images, args.out, method=args.method, head_fusion=args.head_fusion,
                             discard_ratio=args.discard_ratio)
    width = max(len(r["image"]) for r in results)
    for r in results:
        print(f"{r['image']:<{width}}  {r['label']}  {r['score']:.3f}")
    print(f"maps written to {args.out} (per image: <name>.png overlay, <name>_input.png, <name>.npy map)")
    return 0
