"""The training side of the benchmark: `vitray train` and `vitray pretrain` on Ray Train against bare
PyTorch loops that take the same steps, in alternating pairs.
"""
from __future__ import annotations

import shutil
import time
from typing import Any, Callable

from measuring import LABELS, Sizes


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


def pairs_detail(pairs: list[dict]) -> str:
    """The best epoch rates of either loop over the pairs, and each pair's ratio."""
    if not pairs:
        return "not measured"
    best = [max(max(p[side][1:]) for p in pairs) for side in ("ray_epochs", "torch_epochs")]
    return f"best {best[0]:,.0f} / {best[1]:,.0f} img/s" + (
        "; median of pairs " + ", ".join(f"{p['ratio']:.2f}" for p in pairs) if len(pairs) > 1 else "")
