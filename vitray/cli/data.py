"""`vitray synth`: render a synthetic inspection data set."""
from __future__ import annotations

import argparse
from typing import Any

from vitray.cli.options import fraction, positive_int


def add_synth(sub: Any) -> None:
    p = sub.add_parser("synth", help="render a synthetic inspection data set",
                       description="Render parts seen from above: passed, or shifted out of their "
                                   "seat (Xplus, Xminus, Yplus, Yminus).")
    p.add_argument("out", help="output folder or s3:// prefix")
    p.add_argument("--n", type=positive_int, required=True, help="number of images")
    p.add_argument("--passed-fraction", type=fraction, default=0.02,
                   help="share of passed parts (default 0.02, as in the real data)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("parquet", "imagefolder"), default="parquet")
    p.add_argument("--style", choices=("synth", "alt"), default="synth",
                   help="renderer: 'alt' draws the same task differently (for evaluation)")
    p.add_argument("--defects", choices=("shifted", "novel"), default="shifted",
                   help="shifted: the inspection classes; novel: seated parts with defects no training sees "
                        "(scratch, empty, foreign, chipped, second), for measuring, never for training "
                        "(default shifted)")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from vitray.data import synth

    summary = synth.write(args.out, n=args.n, passed_fraction=args.passed_fraction, size=args.size,
                          seed=args.seed, fmt=args.format, style=args.style, defects=args.defects)
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    print(f"wrote {summary['n']} images ({counts}) as {args.format} to {args.out}")
    if args.defects == "novel":
        print(f"next: vitray score --model MODEL --input {args.out} --output SCORES "
              "(novel defects are for measuring a model, never for training one)")
    else:
        print(f"next: vitray train --data {args.out} --out RUN")
    return 0
