"""`vitray export`: a trained model as one ONNX file for a PC beside the line (onnxruntime, no Ray or PyTorch)."""
from __future__ import annotations

import argparse
from typing import Any

from vitray.cli.options import summary


def add_export(sub: Any) -> None:
    from vitray.export import ExportConfig
    from vitray.options import add_options

    p = sub.add_parser("export", help="export a trained model to ONNX",
                       description="One ONNX graph that takes uint8 images (batch, size, size, channels) at the "
                                   "model's input size, normalises them inside and gives class probabilities "
                                   "(and with --attention the rollout map); labels and preprocessing in its "
                                   "metadata. See docs/export.md.")
    add_options(p, ExportConfig)
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from vitray.export import ExportConfig, export_onnx
    from vitray.options import config_from

    meta = export_onnx(config_from(ExportConfig, args))
    outputs = "probs" + (" and attention" if args.attention else "")
    print(summary(f"exported {args.model}: uint8 {meta['size']}x{meta['size']}x{meta['channels']} images in, "
                  f"{outputs} out ({len(meta['labels'])} classes: {', '.join(meta['labels'])})",
                  {"model": args.out},
                  f"vitray score --model {args.out} --engine onnx --input IMAGES --output SCORES"))
    return 0
