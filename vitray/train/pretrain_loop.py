"""What each Ray Train worker runs for MAE pre-training: its shard in, reconstruction steps, a checkpoint per epoch.

The shape of `vitray.train.loop`, whose pieces it takes as they are: the windows of rows
(shuffled and lightly augmented, seeded), the warm-up and cosine schedule, the restore from the
newest complete checkpoint. What differs is the model (transformers' `ViTMAEForPreTraining`),
the loss (its own: mean squared error on the masked patches) and the masks, drawn from the
run's seed, the epoch and the rank so that a resumed run masks as an unbroken one would.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitray.data import batches as windows
from vitray.progress import send
from vitray.train.checkpoints import checkpoint_name, save_state, write_history
from vitray.train.loop import (PROGRESS_EVERY_S, all_reduce, check_trained, make_scheduler, quiet_train_reports,
                               restore_state, to_tensor, track_epoch, worker_batches)

HISTORY_COLUMNS = ("epoch", "loss", "val_loss", "lr", "images_per_s")
VAL_BATCH = 256
# Not weight-decayed, as in MAE (and timm): biases, norms, and the learned tokens.
NO_DECAY = ("cls_token", "mask_token")


@dataclass
class _Run:
    """One worker's pre-training objects (among them what `vitray.train.loop.restore_state` and `worker_batches` use)."""

    rank: int
    world: int
    device: Any
    model: Any
    optimizer: Any
    scheduler: Any
    steps_per_epoch: int
    patches: int  # of an image: the masks' length

    @property
    def amp(self) -> bool:  # bf16 autocast on GPU
        return self.device.type == "cuda"


def pretrain_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train's per-worker function: set up and restore, then each epoch pre-train, validate, checkpoint."""
    import ray.train

    state = _set_up(cfg)
    done, history, resumes = restore_state(cfg, state)
    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val")}
    for epoch in range(done + 1, cfg["run"]["epochs"] + 1):
        images, loss_sum, seconds = _pretrain_epoch(cfg, state, shards["train"], epoch)
        counts = all_reduce(to_tensor([images, loss_sum, seconds], state.device)).tolist()
        check_trained(counts[0], epoch)
        row = {"epoch": epoch, "loss": round(counts[1] / max(1.0, counts[0]), 6),
               "val_loss": _val_loss(state, shards["val"], cfg), "lr": float(state.scheduler.get_last_lr()[0]),
               # The group's rate: every image over the workers' mean time (train's figure too).
               "images_per_s": round(counts[0] / max(1e-9, counts[2] / state.world), 1)}
        history = [h for h in history if h["epoch"] < epoch] + [row]
        _checkpoint(cfg, state, row, history, resumes)


def build_mae(mae_config: dict[str, Any], start_from: str | None = None) -> Any:
    """transformers' `ViTMAEForPreTraining` for a config dict, with MAE's initialisation really applied;
    with `start_from` (a ViT's folder, s3:// prefix or hub id), its encoder holds that ViT's weights.

    transformers 5 initialises a model from its leaves up, and `ViTMAEEmbeddings.initialize_weights`
    returns early once the patch projection (a leaf) is marked done: built from a config, the model's
    fixed position embeddings, the encoder's and the decoder's, stay all zeros and its tokens too, so
    the decoder cannot tell one masked patch from another. The modules' own initialisers are run
    again here, which gives the 2-D sine-cosine tables, MAE's projection init and the tokens. The
    linear layers start Xavier-uniform, as MAE's own code starts them (transformers: std 0.02).
    """
    import torch
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from vitray.models import init_linear_layers

    model = ViTMAEForPreTraining(ViTMAEConfig.from_dict(mae_config))
    init_linear_layers(model)
    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False
    with torch.no_grad():
        embeddings.initialize_weights()
        model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    if start_from is not None:
        from vitray.models import build_model

        # The same names, tensor for tensor (vitray.train.pretrain.encoder_of maps them back); the ViT's
        # positions, learned or not, stay fixed while the MAE trains, as MAE's own are.
        model.vit.load_state_dict(build_model(start_from, ["image"])[0].vit.state_dict())
    return model


def make_optimizer(model: Any, lr: float, weight_decay: float) -> Any:
    """MAE's AdamW (beta2 0.95: He et al. 2022, after Chen et al.'s iGPT), weight decay on the
    trained matrices only: not on biases, norms, the learned tokens, nor the fixed positions."""
    import torch

    groups: dict[bool, list] = {True: [], False: []}  # decayed or not
    for name, p in model.named_parameters():
        if p.requires_grad:  # not the fixed positions
            groups[p.ndim >= 2 and not name.endswith(NO_DECAY)].append(p)
    return torch.optim.AdamW([{"params": groups[True], "weight_decay": weight_decay},
                              {"params": groups[False], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def mask_generator(seed: int, epoch: int, rank: int) -> Any:
    """The generator of MAE's per-image random scores (the lowest `1 - mask_ratio` share of patches stays
    visible): seeded by the run, the epoch and the rank, so a resumed epoch masks as an unbroken one."""
    import torch

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def _set_up(cfg: dict[str, Any]) -> _Run:
    import ray.train
    import ray.train.torch
    import torch

    run = cfg["run"]
    quiet_train_reports()
    context = ray.train.get_context()
    torch.manual_seed(run["seed"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # logical CPUs are inflated on a small machine: share the real cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    # On the device before the optimizer exists, so that a restored optimizer state lands there too.
    model = build_mae(cfg["mae"], cfg["start_from"]).to(device)
    optimizer = make_optimizer(model, cfg["lr"], run["weight_decay"])
    world = context.get_world_size()
    steps = windows.steps_per_epoch(cfg["n_train"], world, cfg["batch_size"])
    return _Run(context.get_world_rank(), world, device, model, optimizer,
                make_scheduler(optimizer, steps * run["epochs"], run["warmup_fraction"]), steps,
                model.vit.embeddings.patch_embeddings.num_patches)


def _pretrain_epoch(cfg: dict[str, Any], state: _Run, shard: Any, epoch: int) -> tuple[int, float, float]:
    """One pass over this worker's shard; (images, loss sum, seconds)."""
    import torch

    from vitray.data.preprocess import normalize

    state.model.train()
    started = time.perf_counter()
    tell = _progress(cfg, state, epoch, started)
    masks = mask_generator(cfg["run"]["seed"], epoch, state.rank)
    images, loss_sum = 0, 0.0
    for step, (batch, _, _) in enumerate(worker_batches(cfg, state, shard, epoch), start=1):
        x = normalize(batch, cfg["mean"], cfg["std"])
        loss_sum += _step(state, x, torch.rand(len(x), state.patches, generator=masks).to(state.device)) * len(x)
        images += len(x)
        tell(step, images)
    return images, loss_sum, time.perf_counter() - started


def _step(state: _Run, x: Any, scores: Any) -> float:
    """One optimizer step on a batch, masked by `scores`; its loss."""
    import torch

    with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=state.amp):
        loss = state.model(pixel_values=x, noise=scores).loss.float()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
    state.optimizer.step()
    state.scheduler.step()
    return loss.item()


def _progress(cfg: dict[str, Any], state: _Run, epoch: int, started: float) -> Any:
    """`tell(step, images)`: rank 0 tells the driver how far the epoch is, once a PROGRESS_EVERY_S at most."""
    last = started

    def tell(step: int, images: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if state.rank != 0 or now - last < PROGRESS_EVERY_S:
            return
        last = now
        send(cfg.get("progress"), {"kind": "batch", "epoch": epoch, "epochs": cfg["run"]["epochs"], "step": step,
                                   "steps": state.steps_per_epoch, "images": images * state.world,
                                   "seconds": now - started})

    return tell


def _val_loss(state: _Run, shard: Any, cfg: dict[str, Any]) -> float:
    """The masked-reconstruction loss on the held-out images, the same masks every epoch; summed over workers."""
    import torch

    from vitray.data.preprocess import normalize

    totals = torch.zeros(2, dtype=torch.float64, device=state.device)  # loss sum, images
    masks = mask_generator(cfg["run"]["seed"], 0, state.rank)
    state.model.eval()
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=VAL_BATCH, device=state.device,
                                              dtypes={"image": torch.uint8, "label": torch.long}):
            x = normalize(batch["image"], cfg["mean"], cfg["std"])
            scores = torch.rand(len(x), state.patches, generator=masks).to(state.device)
            with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=state.amp):
                loss = state.model(pixel_values=x, noise=scores).loss.float()
            totals += torch.stack([loss.double() * len(x), totals.new_tensor(float(len(x)))])
    loss_sum, count = all_reduce(totals).tolist()
    return round(loss_sum / max(1.0, count), 6)


def _checkpoint(cfg: dict[str, Any], state: _Run, row: dict[str, Any], history: list[dict],
                resumes: list[int]) -> None:
    """Report the epoch to Ray Train; rank 0 also saves the whole MAE state and tells the driver."""
    import ray.train

    if state.rank != 0:
        ray.train.report(row, checkpoint=None)
        return
    send(cfg.get("progress"), {"kind": "epoch", "row": row, "epochs": cfg["run"]["epochs"]})
    track_epoch(cfg, row)
    inner = getattr(state.model, "module", state.model)  # DDP wraps it on more than one worker
    with tempfile.TemporaryDirectory() as folder:
        save_state(folder, {"model": inner.state_dict(), "optimizer": state.optimizer.state_dict(),
                            "scheduler": state.scheduler.state_dict(), "epoch": row["epoch"], "history": history,
                            "resumes": resumes}, row)
        write_history(cfg["history_uri"], history, HISTORY_COLUMNS)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=checkpoint_name(row["epoch"]))

