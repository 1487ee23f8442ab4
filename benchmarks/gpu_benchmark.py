"""GPU throughput of vitray's own inference and training step for a ViT-B/16 at 224 px, bf16.

Runs without Ray (the GPU machines lent to development have none): it drives the
same `vitray.inference.Predictor` that `vitray score` puts on its actor pool, and
the same normalise + bf16 autocast step as the training loop, over batch sizes.
`python benchmarks/gpu_benchmark.py --out DIR` writes DIR/gpu_benchmark.json and prints a table;
`benchmarks/benchmark.py --gpu` runs the same sweep (`gpu_sweep`) beside its CPU ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_BATCH_SIZES = "64,128,256,512,1024"


def _timed(fn, warmup: int, iters: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def gpu_sweep(batch_sizes: list[int], iters: int = 20) -> dict:
    """The sweep itself: score (no maps / maps for all) and bf16 train step per batch size; needs CUDA."""
    import numpy as np
    import torch

    from vitray.data.preprocess import normalize
    from vitray.inference import PredictOptions, Predictor
    from vitray.models import build_model, export_model

    torch.backends.cuda.matmul.allow_tf32 = True
    labels = ["Xminus", "Xplus", "Yminus", "Yplus", "passed"]
    model, prep = build_model("vit-base", labels, image_size=224, channels=3)
    folder = tempfile.mkdtemp()
    export_model(model, prep, folder)
    rng = np.random.default_rng(0)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                     "python": platform.python_version(), "model": "ViT-B/16 (vit-base preset), 224 px, 5 classes",
                     "params": sum(p.numel() for p in model.parameters()), "score": [], "train": []}

    for attention in ("none", "all"):
        predictor = Predictor(folder, PredictOptions(attention=attention))
        for bs in batch_sizes if attention == "none" else batch_sizes[:3]:
            # uint8 images arrive from the CPU decode stage, as in `vitray score`.
            batch = {"image": rng.integers(0, 256, (bs, 224, 224, 3), dtype=np.uint8)}
            seconds = _timed(lambda: predictor(batch), warmup=3, iters=iters)
            row = {"attention": attention, "batch_size": bs, "images_per_s": round(bs / seconds, 1)}
            results["score"].append(row)
            print(f"score  attention={attention:4s} batch {bs:5d}: {row['images_per_s']:9.1f} img/s", flush=True)
        del predictor
        torch.cuda.empty_cache()

    device = torch.device("cuda")
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    for bs in [b for b in batch_sizes if b <= 512]:
        images = torch.randint(0, 256, (bs, 224, 224, 3), dtype=torch.uint8, device=device)
        target = torch.randint(0, len(labels), (bs,), device=device)

        def step() -> None:
            x = normalize(images, prep.mean, prep.std)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(pixel_values=x).logits
            loss = loss_fn(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        seconds = _timed(step, warmup=3, iters=max(5, iters // 2))
        row = {"batch_size": bs, "images_per_s": round(bs / seconds, 1)}
        results["train"].append(row)
        print(f"train  batch {bs:5d}: {row['images_per_s']:9.1f} img/s", flush=True)
    return results


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    results = gpu_sweep([int(b) for b in args.batch_sizes.split(",")], args.iters)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_benchmark.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
