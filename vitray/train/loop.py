"""What each Ray Train worker runs: its shard in, DDP steps, validation, a report and a checkpoint per epoch.

The shape of Ray's own examples: `train_loop_per_worker(cfg)` sets up the model, the
optimiser and the schedule, restores the newest complete checkpoint, then trains epoch by
epoch. Rank 0 sends its progress (batches, images per second, each epoch's figures) to the
driver through `vitray.progress`, which draws it: workers print nothing.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitray import storage, tracking
from vitray.data import batches as windows
from vitray.progress import send
from vitray.train.checkpoints import (STATE_FILE, checkpoint_name, complete_checkpoints, keep_best_and_newest,
                                      load_state, save_state, store_checkpoint, write_history)

PROGRESS_EVERY_S = 1.0  # how often rank 0 tells the driver how far an epoch is


def make_scheduler(optimizer: Any, total_steps: int, warmup_fraction: float) -> Any:
    """Linear warm-up over `warmup_fraction` of the steps, then cosine decay to zero (transformers')."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, max(1, int(warmup_fraction * total_steps)), total_steps)


@dataclass
class _Run:
    """One worker's training objects."""

    model: Any
    optimizer: Any
    scheduler: Any
    trainable: list
    loss_fn: Any
    device: Any
    amp: bool
    rank: int
    world: int
    steps_per_epoch: int
    box_grid: tuple[int, int] | None  # the patch grid when the box-attention term is on


def quiet_train_reports() -> None:
    """Ray Train logs every report (the whole metrics dict) at INFO; the epoch line rank 0 sends says what matters.

    Train V2 logs it under a logger named after the file of its execution context, a private
    module: found by name without importing it, so a release that moves it only brings the
    reports back to the log.
    """
    import importlib.util

    names = ["ray.train"]
    try:
        spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        names.append(spec.origin)
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


def check_trained(images: float, epoch: int) -> None:
    """An epoch in which no worker took a step fails the run: its model would be reported and exported as trained."""
    if images <= 0:
        raise RuntimeError(f"epoch {epoch} took no training step: each worker holds fewer images than a batch "
                           "(lower --batch-size or --workers)")


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train's per-worker function: set up, restore, then train, validate and checkpoint each epoch."""
    import ray.train

    run = cfg["run"]
    state = _set_up(cfg)
    start_epoch, history, resumes = restore_state(cfg, state)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch + 1, run["epochs"] + 1):
        seen, loss_sum, elapsed = _train_epoch(cfg, state, train_shard, epoch)
        totals = all_reduce(to_tensor([seen, loss_sum, elapsed], state.device))
        check_trained(float(totals[0]), epoch)
        val = _validate(state.model, val_shard, cfg, state.device, state.amp)
        row = {
            "epoch": epoch,
            "train_loss": round(float(totals[1] / max(1.0, totals[0])), 6),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "lr": float(state.scheduler.get_last_lr()[0]),
            # Images per second of the whole group: total images over the slowest worker's time.
            "images_per_s": round(float(totals[0] / max(1e-9, totals[2] / state.world)), 1),
        }
        history = [h for h in history if h["epoch"] < epoch] + [row]
        _report(cfg, state, row, val, history, resumes)


def _set_up(cfg: dict[str, Any]) -> _Run:
    import ray.train
    import ray.train.torch
    import torch

    from vitray.attention import register_weights_attention
    from vitray.models import apply_finetune, build_model
    from vitray.rollout import patch_grid

    run = cfg["run"]
    quiet_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(run["seed"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Logical CPUs are inflated on a small machine; share the real cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    boxed = cfg["box_attention"] > 0
    # The box-attention term needs every layer's attention weights (heads fused by their mean, as the maps').
    model, _ = build_model(run["model"], cfg["labels"], cfg["image_size"], channels=cfg["channels"],
                           attn_implementation=register_weights_attention("mean") if boxed else "sdpa")
    box_grid = patch_grid(model.config) if boxed else None
    # On the device before the optimizer exists, so that a restored optimizer state lands there too.
    model = apply_finetune(model, run["finetune"]).to(device)
    steps_per_epoch = windows.steps_per_epoch(cfg["n_train"], world, cfg["batch_size"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg["lr"], run["weight_decay"], run["layer_decay"]),
                                  lr=cfg["lr"])
    scheduler = make_scheduler(optimizer, steps_per_epoch * run["epochs"], run["warmup_fraction"])
    weights = torch.tensor(cfg["class_weights"], dtype=torch.float32, device=device) if cfg["class_weights"] else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=run["label_smoothing"])
    return _Run(model, optimizer, scheduler, trainable, loss_fn, device, device.type == "cuda", rank, world,
                steps_per_epoch, box_grid)


def parameter_groups(model: Any, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW's groups of the trainable parameters: weight decay on matrices only, and with `layer_decay`
    below 1 each encoder layer's rate scaled by layer_decay ** (layers + 1 - its depth): the
    embeddings (depth 0) learn slowest, the final norm and the head (depth layers + 1) at `lr`.
    Layer-wise rate decay is how BEiT and MAE fine-tune a pre-trained encoder."""
    import re

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    layer = re.compile(r"\.layers?\.(\d+)\.")
    depths = {name: int(m.group(1)) + 1 if (m := layer.search(name)) else None for name, _ in named}
    top = max((d for d in depths.values() if d is not None), default=0) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        depth = depths[name] if depths[name] is not None else (0 if ".embeddings." in f".{name}" else top)
        if layer_decay == 1.0:
            depth = top  # one rate: the two groups, decayed first, that a checkpoint of such a run holds
        decayed = p.ndim >= 2
        group = groups.setdefault((depth, not decayed), {"params": [], "lr": lr * layer_decay ** (top - depth),
                                                         "weight_decay": weight_decay if decayed else 0.0})
        group["params"].append(p)
    return [groups[key] for key in sorted(groups)]


def restore_state(cfg: dict[str, Any], state: _Run) -> tuple[int, list[dict], list[int]]:
    """Resume from the newest complete checkpoint (newer than ray.train.get_checkpoint() after a Ctrl-C)."""
    import ray.train
    import ray.train.torch

    start_epoch, history, resumes = 0, [], []
    saved = complete_checkpoints(cfg["run_uri"])
    if saved:
        folder = storage.resolve(saved[0][1])
        with ray.train.Checkpoint(path=folder.path, filesystem=folder.fs).as_directory() as d:
            loaded = load_state(os.path.join(d, STATE_FILE), saved[0][1])
        state.model.load_state_dict(loaded["model"])
        state.optimizer.load_state_dict(loaded["optimizer"])
        state.scheduler.load_state_dict(loaded["scheduler"])
        start_epoch, history = loaded["epoch"], loaded["history"]
        # Recorded so that a user (and the tests) can see a run picked up where it stopped.
        resumes = loaded.get("resumes", []) + [start_epoch]
        if state.rank == 0:
            send(cfg.get("progress"), {"kind": "log", "line": f"resuming after epoch {start_epoch} from {saved[0][1]}"})
    state.model = ray.train.torch.prepare_model(state.model)
    return start_epoch, history, resumes


def worker_batches(cfg: dict[str, Any], state: Any, shard: Any, epoch: int,
             box_grid: tuple[int, int] | None = None) -> Any:
    """This worker's training batches of an epoch: windows of rows balanced, augmented and cut into steps:
    (images, labels, each image's box overlaps with the `box_grid` patches, or None without it).

    The last batch of a few images is dropped: it makes a noisy step, and one of a single
    image gives DDP gradients whose strides differ from its buckets' (a warning every epoch).
    Every rank holds as many rows, hence takes as many steps.
    """
    run = cfg["run"]
    collate = windows.make_collate(cfg["balance_rates"], cfg["augment"], run["seed"], epoch, state.rank,
                                   box_grid=box_grid)
    size = cfg["batch_size"]
    for window in shard.iter_torch_batches(batch_size=size * windows.WINDOW_STEPS, collate_fn=collate,
                                           local_shuffle_buffer_size=2048, local_shuffle_seed=run["seed"] + epoch,
                                           device=state.device):
        for start in range(0, len(window["label"]) - size + 1, size):
            overlap = window["box_overlap"][start:start + size] if "box_overlap" in window else None
            yield window["image"][start:start + size], window["label"][start:start + size], overlap


def _train_epoch(cfg: dict[str, Any], state: _Run, shard: Any, epoch: int) -> tuple[int, float, float]:
    """One pass over this worker's shard; (images, loss sum, seconds).

    With the box-attention term on, the loss adds its weight times `box_attention_loss` of
    the attention rollout (the default map) on the images' boxes.
    """
    import torch

    from vitray.data.preprocess import normalize
    from vitray.localisation import box_attention_loss
    from vitray.rollout import rollout

    run = cfg["run"]
    state.model.train()
    started = last_sent = time.perf_counter()
    seen, loss_sum, step = 0, 0.0, 0
    for images, y, overlap in worker_batches(cfg, state, shard, epoch, state.box_grid):
        x = normalize(images, cfg["mean"], cfg["std"])
        with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=state.amp):
            out = state.model(pixel_values=x, output_attentions=overlap is not None)
        loss = state.loss_fn(out.logits.float(), y)
        if overlap is not None:
            loss = loss + cfg["box_attention"] * box_attention_loss(rollout(out.attentions), overlap)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(state.trainable, run["grad_clip"])
        state.optimizer.step()
        state.scheduler.step()
        seen += len(y)
        loss_sum += loss.item() * len(y)
        step += 1
        now = time.perf_counter()
        if state.rank == 0 and now - last_sent >= PROGRESS_EVERY_S:
            last_sent = now
            send(cfg.get("progress"), {"kind": "batch", "epoch": epoch, "epochs": run["epochs"], "step": step,
                                       "steps": state.steps_per_epoch, "images": seen * state.world,
                                       "seconds": now - started})
    return seen, loss_sum, time.perf_counter() - started


def _report(cfg: dict[str, Any], state: _Run, row: dict[str, Any], val: dict[str, Any], history: list[dict],
            resumes: list[int]) -> None:
    """Report the epoch to Ray Train; rank 0 also checkpoints it and tells the driver."""
    import ray.train

    metrics = {**row, "val": val, "recall": {k: v["recall"] for k, v in val["per_class"].items()}}
    if state.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    epoch = row["epoch"]
    send(cfg.get("progress"), {"kind": "epoch", "row": row, "epochs": cfg["run"]["epochs"],
                               "recall": metrics["recall"]})
    track_epoch(cfg, row, metrics["recall"])
    with tempfile.TemporaryDirectory() as d:
        inner = state.model.module if hasattr(state.model, "module") else state.model
        save_state(d, {"model": inner.state_dict(), "optimizer": state.optimizer.state_dict(),
                       "scheduler": state.scheduler.state_dict(), "epoch": epoch, "history": history,
                       "resumes": resumes}, metrics)
        write_history(cfg["history_uri"], history)
        if not cfg["in_process"]:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=checkpoint_name(epoch))
            return
        # Ray Train's local mode keeps no checkpoint: this process stores it where Train would.
        folder = storage.resolve(store_checkpoint(d, cfg["run_uri"], epoch))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint(path=folder.path, filesystem=folder.fs))
        keep_best_and_newest(cfg["run_uri"])


def track_epoch(cfg: dict[str, Any], row: dict[str, Any], recall: dict[str, float] | None = None) -> None:
    """Rank 0's MLflow logging of an epoch's row (and per-class recall), at step = epoch, to `cfg["tracking"]`.

    The driver opened that run (vitray.tracking). A worker's own log is out of the user's sight,
    so a tracking warning goes to the driver's channel, as a `log` message of level `warning`.
    """
    queue = cfg.get("progress")
    shown = nullcontext() if queue is None else tracking.warnings_to(
        lambda line: send(queue, {"kind": "log", "line": line, "level": "warning"}))
    with shown:
        tracking.log_metrics(cfg.get("tracking"),
                             {**row, **{f"val_recall_{k}": v for k, v in (recall or {}).items()}}, step=row["epoch"])


def to_tensor(values: list[float], device: Any) -> Any:
    import torch

    return torch.tensor(values, dtype=torch.float64, device=device)


def all_reduce(t: Any) -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _validate(model: Any, val_data: Any, cfg: dict[str, Any], device: Any, amp: bool) -> dict[str, Any]:
    """Every worker scores its share of the validation set (vitray.train.data.data_config); the counts are summed."""
    import torch

    from vitray.data.preprocess import normalize
    from vitray.metrics import metrics_from_confusion

    k = len(cfg["labels"])
    counts = torch.zeros(k * k, dtype=torch.float64, device=device)  # (true, predicted) pairs
    loss = torch.zeros(2, dtype=torch.float64, device=device)  # sum, images
    model.eval()
    with torch.inference_mode():
        batches = val_data.iter_torch_batches(batch_size=256, dtypes={"image": torch.uint8, "label": torch.long},
                                              device=device)
        for batch in batches:
            x = normalize(batch["image"], cfg["mean"], cfg["std"])
            y = batch["label"]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(pixel_values=x).logits.float()
            counts += torch.bincount(y * k + logits.argmax(-1), minlength=k * k).to(torch.float64)
            loss[0] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
            loss[1] += len(y)
    counts, loss = all_reduce(counts).cpu().numpy(), all_reduce(loss).cpu().numpy()
    metrics = metrics_from_confusion(counts.reshape(k, k).astype(np.int64), cfg["labels"])
    metrics["loss"] = round(float(loss[0] / max(1.0, loss[1])), 6)
    return metrics
