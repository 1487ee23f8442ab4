"""Throughput of vitray's Ray paths against plain PyTorch, as ratios measured side by side in one run.

`python benchmarks/benchmark.py --out DIR [--quick] [--startup] [--gpu]` writes DIR/benchmark.json and prints a table.
The model is the from-scratch preset that `vitray train` builds by default (vit-tiny, here on
64 px synthetic inspection images), untrained: throughput does not depend on the weights.
Every ratio compares two figures taken in this run, on this machine, with the same batch size
and thread count. `--startup` adds `benchmarks/startup.py`'s start-up figures (small runs from the
command to their exit, against plain scripts); `--gpu` adds `benchmarks/gpu_benchmark.py`'s bf16
ViT-B/16 sweep when CUDA is there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LABELS = ["Xminus", "Xplus", "Yminus", "Yplus", "passed"]
TARGETS = {  # ratio: (comparison, target) from the speed issue
    "train_ray_vs_torch": (">=", 0.9),
    "pretrain_ray_vs_torch": (">=", 0.9),  # the same bar for MAE pre-training
    "score_vs_forward": (">=", 0.9),
    "score_vs_naive": (">=", 3.0),
    "attention_overhead": ("<=", 1.15),
    "memory_growth": ("<=", 1.2),
}


@dataclass(frozen=True)
class Sizes:
    """What one run measures; `--quick` shrinks it to a smoke test whose ratios mean little."""

    model: str = "vit-tiny"
    image_size: int = 64
    score_images: int = 1000  # the small scoring run; the large one has 10x as many
    score_batch: int = 256  # vitray score's default
    piece_rows: int = 512  # vitray score's default; a steady rate needs several pieces
    naive_images: int = 300
    train_images: int = 4000
    train_epochs: int = 3  # the first is warm-up and not counted
    train_batch: int = 32  # vitray train's default
    forward_seconds: float = 5.0
    # Large runs without and with maps, alternating: attention_overhead is the median of the
    # pairs' ratios, since this VM's speed drifts by ~20% from one minute to the next (three
    # pairs of one run have read 1.47, 1.30 and 1.00). Five: a pair is ~20 s.
    overhead_pairs: int = 5
    # Bare loop then Ray Train, alternating: train_ray_vs_torch is the median of the pairs'
    # ratios (one pair each way has read anything from 0.82 to 1.23 with no change to the loop).
    train_pairs: int = 3
    pretrain_batch: int = 64  # vitray pretrain's default
    warm_up: bool = True  # a first, unmeasured score run (see cpu_benchmark)


# startup.py's scoring images, training images and rounds (a round runs every command once).
STARTUP = (2000, 300, 2)
STARTUP_QUICK = (200, 100, 1)
STARTUP_TARGETS = {"score_exit": 1.5, "score_first_piece_s": 8.0, "explain": 2.0}  # from the start-up issue
QUICK = Sizes(score_images=60, piece_rows=32, naive_images=30, train_images=300, train_epochs=2, forward_seconds=1.0,
              overhead_pairs=1, train_pairs=1, warm_up=False)


# --------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak proportional set size (PSS) of this process and all its descendants (the embedded Ray).

    PSS shares each shared page (Ray's object store, libraries) among the processes that map it,
    so the sum is the memory the run holds, without counting shared pages once per process.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.sample())

    @staticmethod
    def sample() -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total


def rate(fn: Callable[[], int], seconds: float, windows: int = 5) -> float:
    """Images/s of calling `fn` (returns images done): the best of `windows` windows of `seconds` in all.

    The best, not the mean: on a shared machine other work only ever slows a window down.
    """
    fn()
    best = 0.0
    for _ in range(windows):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            done += fn()
        best = max(best, done / (time.perf_counter() - start))
    return best


# --------------------------------------------------------------------------- data and model


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


# --------------------------------------------------------------------------- the plain PyTorch side


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


def torch_train_rate(sizes: Sizes, pixels: Any, labels: Any, threads: int, epochs: int) -> list[float]:
    """Images/s per epoch of a bare PyTorch loop doing what vitray's training step does:
    the same model, AdamW groups, schedule, weighted label-smoothed loss, clipping and batch size."""
    import numpy as np
    import torch

    from vitray.models import build_model
    from vitray.data.sampling import class_weights
    from vitray.train.loop import make_scheduler

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, prep = build_model(sizes.model, LABELS, image_size=sizes.image_size, channels=3)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3)
    steps = epochs * -(-len(pixels) // sizes.train_batch)
    scheduler = make_scheduler(optimizer, steps, 0.1)
    weights = torch.tensor(class_weights(np.bincount(labels, minlength=len(LABELS))), dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1)
    images, targets = torch.from_numpy(pixels), torch.from_numpy(labels).long()
    return bare_epochs(model, prep, optimizer, scheduler, images, sizes.train_batch, epochs,
                       lambda x, idx: loss_fn(model(pixel_values=x).logits.float(), targets[idx]))


def torch_pretrain_rate(sizes: Sizes, pixels: Any, threads: int, epochs: int) -> list[float]:
    """Images/s per epoch of a bare PyTorch MAE loop doing what vitray's pre-training step does: the
    same ViTMAEForPreTraining, AdamW groups and betas, schedule, random masks, clipping and batch size."""
    import torch

    from vitray.models import build_model
    from vitray.train.loop import make_scheduler
    from vitray.train.pretrain import PretrainConfig, mae_config
    from vitray.train.pretrain_loop import build_mae, make_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with torch.device("meta"):
        prep = build_model(sizes.model, LABELS, image_size=sizes.image_size, channels=3)[1]
    model = build_mae(mae_config(PretrainConfig(data="", out="", model=sizes.model), prep))
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.05)
    scheduler = make_scheduler(optimizer, epochs * -(-len(pixels) // sizes.pretrain_batch), 0.1)
    patches = model.vit.embeddings.patch_embeddings.num_patches
    return bare_epochs(model, prep, optimizer, scheduler, torch.from_numpy(pixels), sizes.pretrain_batch, epochs,
                       lambda x, _: model(pixel_values=x, noise=torch.rand(len(x), patches)).loss.float())


def bare_epochs(model: Any, prep: Any, optimizer: Any, scheduler: Any, images: Any, batch: int, epochs: int,
                loss_of: Callable[[Any, Any], Any]) -> list[float]:
    """Images/s per epoch of the bare loop: shuffled batches, normalised, `loss_of(x, indices)`, and
    the step vitray's loops take (clipping, the schedule, the loss read back every step)."""
    import torch

    from vitray.data.preprocess import normalize

    model.train()
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        for idx in torch.randperm(len(images)).split(batch):
            loss = loss_of(normalize(images[idx], prep.mean, prep.std), idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            loss.item()
        rates.append(len(images) / (time.perf_counter() - start))
    return rates


# --------------------------------------------------------------------------- vitray's side


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


def committed(stamps: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """The stamps of committed pieces: a run also reports its start, before any image is scored."""
    return [(t, n) for t, n in stamps if n > 0]


def steady_rate(stamps: list[tuple[float, int]]) -> float:
    """Images/s from the first committed piece to the last, from (time, images committed) stamps.

    Start-up (Ray's workers, the actor importing torch and loading the model) is before the first
    piece and drops out; everything after it counts, including the time the model stage shares the
    cores with the decode stage that Ray Data runs ahead of it.
    """
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    if len(stamps) < 3 or t1 <= t0:
        raise RuntimeError(f"only {len(stamps)} pieces were committed: too few to time a steady rate "
                           "(score more images than --piece-rows times 3)")
    return (n1 - n0) / (t1 - t0)


def ray_train_rate(sizes: Sizes, data: str, out: str) -> list[float]:
    """Images/s per epoch of `vitray train` (Ray Train, 1 worker) as its history.csv records them.

    No augmentation and loss weights for the rare class (not the default class-balanced sampling, a
    Ray Data stage of its own): the data set is then decoded once and held in Ray's object store,
    both loops train from memory on the same images and the ratio is the cost of Ray's loop and
    data iterator.
    """
    from vitray.train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    result = train(TrainConfig(data=data, out=out, model=sizes.model, image_size=sizes.image_size,
                               epochs=sizes.train_epochs, batch_size=sizes.train_batch, workers=1,
                               augment="none", class_weights="loss", in_process_max=0))
    return [float(row["images_per_s"]) for row in result.history]


def ray_pretrain_rate(sizes: Sizes, data: str, out: str) -> list[float]:
    """Images/s per epoch of `vitray pretrain` (Ray Train, 1 worker) as its history.csv records them;
    without augmentation, as the bare loop (the images come from Ray's object store)."""
    from vitray.train.pretrain import PretrainConfig, pretrain

    shutil.rmtree(out, ignore_errors=True)
    result = pretrain(PretrainConfig(data=data, out=out, model=sizes.model, image_size=sizes.image_size,
                                     epochs=sizes.train_epochs, batch_size=sizes.pretrain_batch, workers=1,
                                     augment="none"))
    return [float(row["images_per_s"]) for row in result.history]


# --------------------------------------------------------------------------- the run


def environment(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    import numpy
    import PIL
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__}
    try:
        import ray

        versions["ray"] = ray.__version__
    except ImportError:
        versions["ray"] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"machine": {"cores": os.cpu_count(), "cpu": cpu, "memory_gb": _memory_gb(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                        "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
            "versions": versions, "commit": _commit(), "arguments": vars(args), "sizes": asdict(sizes)}


def _memory_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def file_create_ms(folder: str, files: int = 500, size: int = 9000) -> float:
    """Milliseconds to create and write one overlay-sized file in `folder` (the files are removed)."""
    scratch = os.path.join(folder, f"create-test-{os.getpid()}")
    os.makedirs(scratch)
    data = os.urandom(size)
    started = time.perf_counter()
    for i in range(files):
        with open(os.path.join(scratch, f"{i}.png"), "wb") as f:
            f.write(data)
    elapsed = time.perf_counter() - started
    shutil.rmtree(scratch)
    return elapsed / files * 1e3


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


def alternate(pairs: int, what: str, bare: Callable[[], list[float]], vitray: Callable[[], list[float]]) -> list[dict]:
    """`pairs` alternating runs of a bare PyTorch loop and vitray's Ray Train loop, each a list of epoch
    rates. The first epoch of either is warm-up (allocator, iterator start); each pair's ratio is
    that of the best of the rest."""
    out = []
    for _ in range(pairs):
        print(f"bare PyTorch {what} loop ...", flush=True)
        torch_epochs = bare()
        print(f"vitray {what} (Ray Train, 1 worker) ...", flush=True)
        ray_epochs = vitray()
        out.append({"ray_epochs": ray_epochs, "torch_epochs": [round(r, 1) for r in torch_epochs],
                    "ratio": round(max(ray_epochs[1:]) / max(torch_epochs[1:]), 3)})
    return out


def cpu_benchmark(work: str, sizes: Sizes, scores: str) -> dict[str, Any]:
    """Every CPU figure and ratio; the plain-PyTorch side runs in this process, vitray's on the embedded Ray."""
    from vitray.runtime import RayOptions, init_ray

    # The thread budget: a scoring actor asks Ray for 1 CPU, and Ray gives it 1 intra-op thread
    # (OMP_NUM_THREADS); a train worker takes the machine's cores divided by the workers on the node.
    score_threads = 1
    train_threads = max(1, os.cpu_count() or 1)
    print("generating images ...", flush=True)
    data = make_data(work, sizes)
    model_dir = make_model(work, sizes)
    files, pixels, _ = load_images(data["small"])
    _, train_pixels, train_labels = load_images(data["train"])
    init_ray(RayOptions())  # before any figure, so that Ray's idle processes weigh on both sides alike

    print("plain forward pass ...", flush=True)
    forward = forward_rate(model_dir, pixels, sizes.score_batch, score_threads, sizes.forward_seconds)
    print("seed-style loop ...", flush=True)
    naive = naive_rate(model_dir, files[: sizes.naive_images], score_threads)
    # A first run starts Ray's task workers and pays their imports: not measured, so that the small
    # and the large run start equally warm.
    os.makedirs(scores, exist_ok=True)
    create_ms = {"work_folder": round(file_create_ms(work), 3), "scores_folder": round(file_create_ms(scores), 3)}
    if sizes.warm_up:
        score_run(model_dir, data["small"], os.path.join(scores, "warm-up"), "none", sizes)
    runs = {}
    plan = [("none_small", data["small"], "none")]
    suffixes = [""] + [f"_{p}" for p in range(2, sizes.overhead_pairs + 1)]  # one per pair
    for suffix in suffixes:
        plan += [(f"none_large{suffix}", data["large"], "none"), (f"all_large{suffix}", data["large"], "all")]
    for name, images, attention in plan:
        print(f"vitray score --attention {attention} on {os.path.basename(images)} ...", flush=True)
        runs[name] = score_run(model_dir, images, os.path.join(scores, name), attention, sizes)
        shutil.rmtree(os.path.join(scores, name), ignore_errors=True)  # tmpfs is memory
    pair_ratios = [runs[f"none_large{s}"]["steady_images_per_s"] / runs[f"all_large{s}"]["steady_images_per_s"]
                   for s in suffixes]
    train_pairs = alternate(sizes.train_pairs, "training", lambda: torch_train_rate(
        sizes, train_pixels, train_labels, train_threads, sizes.train_epochs), lambda: ray_train_rate(
        sizes, data["train"], os.path.join(work, "train-run")))
    pretrain_pairs = alternate(sizes.train_pairs, "MAE pre-training", lambda: torch_pretrain_rate(
        sizes, train_pixels, train_threads, sizes.train_epochs), lambda: ray_pretrain_rate(
        sizes, data["train"], os.path.join(work, "pretrain-run")))
    # The best large run of each kind, as the forward pass is the best of its windows.
    none = max(runs[f"none_large{s}"]["steady_images_per_s"] for s in suffixes)
    full = max(runs[f"all_large{s}"]["steady_images_per_s"] for s in suffixes)
    ratios = {
        "train_ray_vs_torch": statistics.median(p["ratio"] for p in train_pairs),
        "pretrain_ray_vs_torch": statistics.median(p["ratio"] for p in pretrain_pairs),
        "score_vs_forward": none / forward,
        "score_vs_naive": none / naive,
        "attention_overhead": statistics.median(pair_ratios),  # time per image with maps over time without
        "memory_growth": runs["none_large"]["peak_pss_mb"] / runs["none_small"]["peak_pss_mb"],
    }
    return {
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {k: f"{op} {t}" for k, (op, t) in TARGETS.items()},
        "met": {k: (ratios[k] >= t if op == ">=" else ratios[k] <= t) for k, (op, t) in TARGETS.items()},
        "figures": {
            "forward_images_per_s": round(forward, 1), "naive_images_per_s": round(naive, 1),
            "score_steady_images_per_s": {"none": round(none, 1), "all": round(full, 1)},
            "attention_overhead_pairs": [round(r, 3) for r in pair_ratios],
            "score": runs, "train_pairs": train_pairs, "pretrain_pairs": pretrain_pairs,
        },
        "threads": {"score_and_forward_and_naive": score_threads, "train_both": train_threads},
        "scores_folder": scores, "file_create_ms": create_ms,
    }


def pairs_detail(pairs: list[dict]) -> str:
    """The best epoch rates of either loop over the pairs, and each pair's ratio."""
    if not pairs:
        return "not measured"
    best = [max(max(p[side][1:]) for p in pairs) for side in ("ray_epochs", "torch_epochs")]
    return f"best {best[0]:,.0f} / {best[1]:,.0f} img/s" + (
        "; median of pairs " + ", ".join(f"{p['ratio']:.2f}" for p in pairs) if len(pairs) > 1 else "")


def startup_table(up: dict[str, Any]) -> list[str]:
    """startup.py's medians: each command's wall time against its plain script's, and the targets."""
    lines = ["| start-up: from the command to its exit | vitray | plain script | ratio | target |", "|---|---|---|---|---|"]
    if up.get("images"):
        t = STARTUP_TARGETS
        lines += [f"| `vitray score`, {up['images']:,} PNGs, in its own process | {up['vitray']['exit_s']:.1f} s "
                  f"| {up['plain_s']:.1f} s | {up['ratio']:.2f} | <= {t['score_exit']} |",
                  f"| the same, first committed piece | {up['vitray']['first_piece_s']:.1f} s | | "
                  f"| <= {t['score_first_piece_s']:g} s |",
                  f"| the same on an embedded Ray | {up['vitray_on_ray']['exit_s']:.1f} s | {up['plain_s']:.1f} s "
                  f"| {up['ratio_on_ray']:.2f} | |",
                  f"| `vitray explain`, 3 images | {up['explain_3_images']['vitray_s']:.1f} s "
                  f"| {up['explain_3_images']['plain_s']:.1f} s | {up['explain_3_images']['ratio']:.2f} "
                  f"| <= {t['explain']:g} |"]
    if "train" in up:
        train = up["train"]
        lines += [f"| `vitray train`, {train['images']:,} images, 1 epoch, in its own process "
                  f"| {train['vitray']['exit_s']:.1f} s | {train['plain']['exit_s']:.1f} s | {train['ratio']:.2f} | |",
                  f"| the same on an embedded Ray | {train['on_ray']['exit_s']:.1f} s "
                  f"| {train['plain']['exit_s']:.1f} s | {train['ratio_on_ray']:.2f} | |"]
    return lines


def table(results: dict[str, Any]) -> str:
    """The ratios, their targets and the figures they divide, as a Markdown table."""
    cpu = results.get("cpu", {})
    lines = []
    if "ratios" in cpu:
        f, runs, steady = cpu["figures"], cpu["figures"]["score"], cpu["figures"]["score_steady_images_per_s"]
        detail = {
            "train_ray_vs_torch": pairs_detail(f["train_pairs"]),
            "pretrain_ray_vs_torch": pairs_detail(f.get("pretrain_pairs", [])),
            "score_vs_forward": f"{steady['none']:,.0f} / {f['forward_images_per_s']:,.0f} img/s",
            "score_vs_naive": f"{steady['none']:,.0f} / {f['naive_images_per_s']:,.0f} img/s",
            "attention_overhead": f"best {steady['none']:,.0f} / {steady['all']:,.0f} img/s (none / all)" + (
                "; median of pairs " + ", ".join(f"{r:.2f}" for r in f["attention_overhead_pairs"])
                if len(f.get("attention_overhead_pairs", [])) > 1 else ""),
            "memory_growth": f"{runs['none_large']['peak_pss_mb']:,.0f} / {runs['none_small']['peak_pss_mb']:,.0f} MB "
                             f"({runs['none_large']['images']:,} / {runs['none_small']['images']:,} images)",
        }
        lines += ["| ratio | measured | target | met | from |", "|---|---|---|---|---|"]
        for name, value in cpu["ratios"].items():
            lines.append(f"| {name} | {value:.2f} | {cpu['targets'][name]} | {'yes' if cpu['met'][name] else 'NO'} "
                         f"| {detail[name]} |")
        if "file_create_ms" in cpu:
            create = cpu["file_create_ms"]
            lines.append(f"\nScore outputs in {cpu['scores_folder']}: creating a file took {create['scores_folder']:.3f} ms "
                         f"there, {create['work_folder']:.3f} ms under --out.")
    elif cpu:
        lines.append(f"CPU part: {cpu.get('skipped')}")
    if "startup" in results:
        lines += ["", *startup_table(results["startup"])]
    gpu = results.get("gpu")
    if gpu and "score" in gpu:
        lines += ["", f"GPU: {gpu['device']}, {gpu['model']}", "| batch | score, no maps | score, maps for all | train step |",
                  "|---|---|---|---|"]
        score = {(r["attention"], r["batch_size"]): r["images_per_s"] for r in gpu["score"]}
        train = {r["batch_size"]: r["images_per_s"] for r in gpu["train"]}
        for bs in sorted({b for _, b in score}):
            cells = [score.get(("none", bs)), score.get(("all", bs)), train.get(bs)]
            lines.append(f"| {bs} | " + " | ".join("—" if c is None else f"{c:,.0f}" for c in cells) + " |")
    elif gpu:
        lines.append(f"GPU part: {gpu.get('skipped')}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for benchmark.json (and the run's scratch data)")
    parser.add_argument("--quick", action="store_true", help="a smoke test (about a minute and a half on 2 cores); "
                        "its figures are too small to mean anything")
    parser.add_argument("--gpu", action="store_true", help="also run benchmarks/gpu_benchmark.py's sweep (needs CUDA)")
    parser.add_argument("--gpu-batch-sizes", default=None, help="for --gpu; default gpu_benchmark's")
    parser.add_argument("--startup", action="store_true", help="also benchmarks/startup.py's start-up figures "
                        "(fresh `vitray` processes against plain scripts; ~6 min, --quick: ~2)")
    parser.add_argument("--keep", action="store_true", help="keep the generated images, model and outputs")
    parser.add_argument("--scores-to", default="auto", metavar="auto|work|FOLDER",
                        help="where the score runs write: auto = /dev/shm when there is one (see scores_folder), "
                             "work = under --out")
    args = parser.parse_args()
    if args.scores_to not in ("auto", "work") and not (os.path.isdir(args.scores_to)
                                                        and os.access(args.scores_to, os.W_OK)):
        parser.error(f"--scores-to {args.scores_to}: not a writable folder")
    sizes = QUICK if args.quick else Sizes()
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "work")
    shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = environment(args, sizes)
    started = time.perf_counter()
    if args.startup:  # first: fresh processes, before this one starts a Ray whose idle processes would weigh
        import startup  # benchmarks/ is first on sys.path

        results["startup"] = startup.measure(*STARTUP_QUICK if args.quick else STARTUP)
    try:
        import ray  # noqa: F401 - only to know whether the Ray side can run here
    except ImportError:
        if not args.gpu:
            print("benchmark: error: ray is not installed (only --gpu runs without it)", file=sys.stderr)
            return 2
        results["cpu"] = {"skipped": "ray is not installed here"}
    else:
        scores = scores_folder(args.scores_to, work)
        try:
            results["cpu"] = cpu_benchmark(work, sizes, scores)
        finally:
            if not args.keep:
                shutil.rmtree(scores, ignore_errors=True)
    if args.gpu:
        results["gpu"] = gpu_benchmark(args.gpu_batch_sizes)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, "benchmark.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    print(f"\n{results['wall_s']:.0f} s; figures in {os.path.join(args.out, 'benchmark.json')}")
    return 0


def gpu_benchmark(batch_sizes: str | None) -> dict[str, Any]:
    """benchmarks/gpu_benchmark.py's sweep, or why it did not run."""
    import torch

    from gpu_benchmark import DEFAULT_BATCH_SIZES, gpu_sweep  # benchmarks/ is first on sys.path

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    return gpu_sweep([int(b) for b in (batch_sizes or DEFAULT_BATCH_SIZES).split(",")])


if __name__ == "__main__":
    sys.exit(main())
