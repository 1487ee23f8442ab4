"""The scoring side of the benchmark: `vitray score` on Ray against the model's plain forward pass and
the seed's loop of one image at a time, on synthetic PNGs and an untrained model of the default preset.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any

from measuring import LABELS, PeakMemory, Sizes, committed, rate, steady_rate


def make_data(work: str, sizes: Sizes) -> dict[str, str]:
    """Synthetic images as PNG files: the large scoring set, and the small one as links to its first tenth."""
    from vitray.data import synth

    large = os.path.join(work, "images-large")
    small = os.path.join(work, "images-small")
    synth.write(large, n=10 * sizes.score_images, size=sizes.image_size, seed=7, fmt="imagefolder")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(large) for f in fs if f.endswith(".png"))
    for path in files[: sizes.score_images]:
        target = os.path.join(small, os.path.relpath(path, large))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.link(path, target)
    train = os.path.join(work, "train")
    synth.write(train, n=sizes.train_images, size=sizes.image_size, seed=8, fmt="imagefolder")
    return {"large": large, "small": small, "train": train}


def make_model(work: str, sizes: Sizes) -> str:
    from vitray.models import build_model, export_model

    model, prep = build_model(sizes.model, LABELS, image_size=sizes.image_size, channels=3)
    folder = os.path.join(work, "model")
    export_model(model, prep, folder)
    return folder


def load_images(root: str, limit: int | None = None) -> tuple[list[str], Any, Any]:
    """Files, their uint8 (N, S, S, C) pixels decoded as vitray does, and their class ids."""
    import numpy as np

    from vitray.data.decode import decode_image

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".png"))[:limit]
    pixels = np.stack([decode_image(open(f, "rb").read()) for f in files])
    labels = np.array([LABELS.index(os.path.basename(os.path.dirname(f))) for f in files])
    return files, pixels, labels


def forward_rate(model_dir: str, pixels: Any, batch: int, threads: int, seconds: float) -> float:
    """Images/s of the model's plain forward pass on already-normalised tensors.

    The batch runs in the scoring actor's CPU chunks: 64 images a pass is also the fastest
    plain loop here (256 at once ran 7% slower), so the baseline gets the same help.
    """
    import torch

    from vitray.data.preprocess import normalize
    from vitray.inference import FORWARD_CHUNK_CPU
    from vitray.models import load_trained

    torch.set_num_threads(threads)
    model, prep, _ = load_trained(model_dir)
    x = normalize(torch.from_numpy(pixels[:batch]), prep.mean, prep.std)

    def step() -> int:
        with torch.inference_mode():
            for part in x.split(FORWARD_CHUNK_CPU):
                model(pixel_values=part)
        return len(x)

    return rate(step, seconds)


def naive_rate(model_dir: str, files: list[str], threads: int) -> float:
    """Images/s of the seed's loop: PIL opens each file, the Hugging Face image processor prepares
    it, the model runs on that one image (what the project's starting notebook did)."""
    import torch
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor

    torch.set_num_threads(threads)
    processor = ViTImageProcessor.from_pretrained(model_dir)
    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    predictions = []

    def one(path: str) -> None:
        with Image.open(path) as image:
            inputs = processor(images=image.convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            predictions.append(int(model(**inputs).logits.argmax(-1)))

    one(files[0])
    best, chunk = 0.0, max(1, len(files) // 3)
    for first in range(0, len(files) - chunk + 1, chunk):  # best of three passes, as in `rate`
        start = time.perf_counter()
        for path in files[first:first + chunk]:
            one(path)
        best = max(best, chunk / (time.perf_counter() - start))
    return best


def score_run(model_dir: str, images: str, out: str, attention: str, sizes: Sizes) -> dict[str, Any]:
    """One `vitray score` run: its rate once images flow, its start-up, the manifest's end-to-end
    rate, and the peak memory of the process tree."""
    from vitray.score import ScoreConfig, score

    shutil.rmtree(out, ignore_errors=True)
    stamps: list[tuple[float, int]] = []
    started = time.perf_counter()
    with PeakMemory() as memory:
        # On Ray whatever the size (a small run on no cluster would score in this process).
        manifest = score(ScoreConfig(model=model_dir, input=images, output=out, attention=attention,
                                     batch_size=sizes.score_batch, piece_rows=sizes.piece_rows, in_process_max=0),
                         progress=lambda state: stamps.append((time.perf_counter(), state["scored"])))
    stamps = committed(stamps)
    # A run that hands back too few pieces to time (--quick's) gets its manifest's end-to-end rate.
    timed = len(stamps) >= 3
    return {"images": manifest["counts"]["scored"], "attention": attention, "batch_size": sizes.score_batch,
            "steady_images_per_s": round(steady_rate(stamps) if timed else manifest["images_per_s"], 1),
            "rate_from": "pieces" if timed else "manifest",
            "first_output_s": round(stamps[0][0] - started, 2), "scoring_s": manifest["scoring_s"],
            "manifest_images_per_s": manifest["images_per_s"], "pieces": manifest["pieces"],
            "peak_pss_mb": round(memory.peak / 2**20, 1)}


def scores_folder(choice: str, work: str) -> str:
    """Where the score runs write: `auto` is a fresh folder in /dev/shm (tmpfs) when there is one.

    With `--attention all` a run creates a file per image. On the VMs this was written on,
    creating a file on the ext4 disk cost 0.05 to 0.6 ms of kernel time, changing within minutes
    (tmpfs: 0.02 ms); a ratio over 10,000 overlays then measured the disk of the moment. Both
    creation costs are recorded beside the ratios.
    """
    if choice == "work":
        return os.path.join(work, "scores")
    if choice == "auto":
        if not (os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)):
            return os.path.join(work, "scores")
        choice = "/dev/shm"
    return os.path.join(choice, f"vitray-benchmark-scores-{os.getpid()}")
