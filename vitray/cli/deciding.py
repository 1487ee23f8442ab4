"""`vitray calibrate`: calibrated scores and OK / NG / REVIEW thresholds that travel with a model."""
from __future__ import annotations

import argparse
from typing import Any

from vitray.cli.options import ray_options, summary


def add_calibrate(sub: Any) -> None:
    from vitray.decisions.calibrate import CalibrateConfig
    from vitray.options import add_options

    p = sub.add_parser("calibrate", help="calibrate a model's scores and set its OK / NG / REVIEW thresholds",
                       description="Fit temperature scaling, the out-of-distribution score and the drift reference on "
                                   "a labelled held-out set, and set the thresholds at the chosen escape and "
                                   "false-reject rates; the calibration is written into the model's folder (score "
                                   "then decides OK / NG / REVIEW) and into OUT with reliability.png.")
    add_options(p, CalibrateConfig)
    ray_options(p)
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from vitray import storage
    from vitray.decisions.calibrate import CalibrateConfig, calibrate
    from vitray.options import config_from

    config = config_from(CalibrateConfig, args, ray_address=args.ray_address)
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
