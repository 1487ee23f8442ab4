"""`vitray score` (bulk, with Ray Data) and `vitray explain` (a few images, no Ray)."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from vitray.cli.options import ray_options, summary


def add_score(sub: Any) -> None:
    from vitray.options import add_options
    from vitray.score.config import ScoreConfig

    p = sub.add_parser("score", help="score images in bulk with Ray Data",
                       description="Score every image under --input not yet scored under --output: "
                                   "predictions/, errors/, attention/ overlays, runs/<run_id>.json and "
                                   "report.html. Rerunning scores only what is new or unfinished.")
    add_options(p, ScoreConfig)
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
    from vitray.options import config_from
    from vitray.score import ScoreConfig, score

    config = config_from(ScoreConfig, args, shared_fs=bool(args.shared_fs), ray_address=args.ray_address,
                         verbose=args.verbose)
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
    from vitray.explain import ExplainConfig
    from vitray.options import add_options

    p = sub.add_parser("explain", help="attention maps for a few images",
                       description="Where the model looked: for each IMAGE, OUT/<name>.png (overlay), "
                                   "OUT/<name>_input.png (the image as the model saw it) and OUT/<name>.npy "
                                   "(the map on the patch grid). No Ray needed.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local, file:// or s3://)")
    add_options(p, ExplainConfig)
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    from vitray.explain import ExplainConfig, explain_images
    from vitray.options import config_from

    results = explain_images(config_from(ExplainConfig, args, images=tuple(args.images)))
    width = max(len(r["image"]) for r in results)
    for r in results:
        print(f"{r['image']:<{width}}  {r['label']}  {r['score']:.3f}")
    print(f"maps written to {args.out} (per image: <name>.png overlay, <name>_input.png, <name>.npy map)")
    return 0
