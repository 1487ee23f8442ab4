"""The scoring engines side by side: `Predictor` (PyTorch) against `OnnxPredictor` (onnxruntime).

    python benchmarks/engine_benchmark.py [--quick] [--threads N] [--out engines.json]

Same threads (torch.set_num_threads / the ONNX session's intra-op threads), same batch,
the same uint8 images; calls alternate between the engines and the median of each is
kept. Models: the default preset at 64 px and a ViT-B/16-shaped one at 224 px (random
weights: only the shapes matter for speed). Maps off (`--attention none`) and on (`all`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np


def _model(folder: str, spec: str | None, size: int) -> str:
    from vitray.models import build_model, export_model

    model, prep = build_model(spec, ["passed", "Xplus", "Xminus", "Yplus", "Yminus"], size)
    export_model(model, prep, folder)
    return folder


def measure(model: str, size: int, batch: int, attention: str, rounds: int) -> dict:
    from vitray.export import ExportConfig, export_onnx
    from vitray.inference import OnnxPredictor, PredictOptions, Predictor

    onnx_path = os.path.join(os.path.dirname(model), f"{os.path.basename(model)}-{attention}.onnx")
    export_onnx(ExportConfig(model, onnx_path, attention=attention != "none"))
    options = PredictOptions(attention=attention)
    engines = {"torch": Predictor(model, options), "onnx": OnnxPredictor(open(onnx_path, "rb").read(), options)}
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds + 1):  # the first round warms up
        for name, engine in engines.items():
            start = time.perf_counter()
            engine({"image": images})
            times[name].append(time.perf_counter() - start)
    rates = {name: round(batch / statistics.median(t[1:]), 1) for name, t in times.items()}
    return {"images_per_s": rates, "onnx_vs_torch": round(rates["onnx"] / rates["torch"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few rounds, default preset only")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None, help="also write the figures here (JSON)")
    args = parser.parse_args()
    import torch

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # OnnxPredictor's intra-op threads
    torch.set_num_threads(args.threads)
    cases = [("default preset, 64 px", None, 64, 64 if args.quick else 256)]
    if not args.quick:
        cases.append(("ViT-B/16 shape, 224 px", "vit-base", 224, 16))
    results = {"threads": args.threads, "cases": []}
    with tempfile.TemporaryDirectory() as d:
        for name, spec, size, batch in cases:
            model = _model(os.path.join(d, (spec or "default")), spec, size)
            for attention in ("none", "all"):
                row = {"model": name, "batch": batch, "attention": attention,
                       **measure(model, size, batch, attention, rounds=2 if args.quick else 5)}
                results["cases"].append(row)
                print(f"{name:24s} batch {batch:4d} attention {attention:4s}  torch "
                      f"{row['images_per_s']['torch']:8.1f} img/s  onnx {row['images_per_s']['onnx']:8.1f} img/s  "
                      f"onnx/torch {row['onnx_vs_torch']:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
