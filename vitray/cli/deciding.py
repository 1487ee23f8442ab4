"""`vitray calibrate`: calibrated scores and OK / NG / REVIEW thresholds that travel with a model."""
from __future__ import annotations

import argparse
from typing import Any

from vitray.cli.options import fraction, given, in_process_option, option_default, positive_int, ray_options, summary
from vitray.runtime import IN_PROCESS_MAX


def add_calibrate(sub: Any) -> None:
    from vitray.decisions.calibrate import CalibrateConfig

    d = lambda name: option_default(CalibrateConfig, name)  # noqa: E731
    p = sub.add_parser("calibrate", help="calibrate a model's scores and set its OK / NG / REVIEW thresholds",
                       description="Fit temperature scaling, the out-of-distribution score and the drift reference on "
                                   "a labelled held-out set, and set the thresholds at the chosen escape and "
                                   "false-reject rates; the calibration is written into the model's folder (score "
                                   "then decides OK / NG / REVIEW) and into OUT with reliability.png.")
    p.add_argument("--model", help="trained model folder or s3:// prefix (the calibration is written into it)")
    p.add_argument("--data", help="labelled held-out images, not used in training (local, file:// or s3://)")
    p.add_argument("--out", help="output folder or s3:// prefix: calibration.json, reliability.png")
    p.add_argument("--format", choices=("imagefolder", "parquet", "csv"), help="data format (default: detected)")
    p.add_argument("--ok-class", metavar="NAME", help=f"the class a part ships as (default {d('ok_class')})")
    p.add_argument("--escape-rate", type=fraction, metavar="F",
                   help=f"at most this share of defective parts decided OK (default {d('escape_rate')})")
    p.add_argument("--false-reject-rate", type=fraction, metavar="F",
                   help=f"at most this share of OK parts decided NG; between the two thresholds parts go to "
                        f"review (default {d('false_reject_rate')})")
    p.add_argument("--confidence", type=fraction, metavar="F",
                   help=f"with this confidence over the draw of the calibration set (default {d('confidence')})")
    p.add_argument("--ood-method", choices=("mahalanobis", "energy"),
                   help=f"the out-of-distribution score (default {d('ood_method')})")
    p.add_argument("--ood-rate", type=fraction, metavar="F",
                   help=f"share of in-distribution parts sent to review as unlike the calibration images "
                        f"(default {d('ood_rate')})")
    p.add_argument("--drift-alpha", type=fraction, metavar="F",
                   help=f"chance that a stable night raises the drift alarm (default {d('drift_alpha')})")
    p.add_argument("--batch-size", type=positive_int, help=f"images per model call (default {d('batch_size')})")
    p.add_argument("--workers", type=positive_int, help=f"inference actors (default {d('workers')})")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per inference actor (default 0: CPU)")
    p.add_argument("--seed", type=int, help=f"the split into halves (default {d('seed')})")
    in_process_option(p, IN_PROCESS_MAX)
    ray_options(p)
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from vitray import storage
    from vitray.decisions.calibrate import CalibrateConfig, calibrate

    config = CalibrateConfig(**given(args, [f.name for f in fields(CalibrateConfig)],
                                     required=("model", "data", "out")))
    record = calibrate(config)
    measured, t = record["measured"], record["thresholds"]

    def rate(name: str) -> str:
        m = measured[name]
        return f"{m['rate']:.2%} [{m['low']:.2%}, {m['high']:.2%}]"

    print(f"temperature {record['temperature']:.3f}: ECE {record['ece']['before']:.3f} -> {record['ece']['after']:.3f}")
    print(f"OK at or below {t['ok']}, NG at or above {t['ng']} (defect score); on the held-out half: escape "
          f"{rate('escape')}, false reject {rate('false_reject')}, review {rate('review')}")
    for note in record["notes"]:
        print(f"note: {note}")
    print(summary("calibrated: score with this model now decides OK / NG / REVIEW",
                  {"calibration": storage.join(config.out, "calibration.json"),
                   "reliability": storage.join(config.out, "reliability.png"),
                   "model": config.model},
                  f"vitray score --model {config.model} --input IMAGES --output SCORES"))
    return 0
