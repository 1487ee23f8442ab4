"""What a training run reads: the classes, the preprocessing, and the training and validation Ray Datasets.

`load_training_data` checks the data and the cluster on the driver and builds the datasets
(cached in Ray's object store when small, streaming otherwise, or held in this process for
a run that trains here); `data_config` is how Ray Train hands them to the workers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitray import storage
from vitray.data.sampling import stratified_split
from vitray.errors import VitrayError
from vitray.train.config import TrainConfig

log = logging.getLogger(__name__)

# Data sets up to this size (resized uint8) are decoded once and kept in Ray's
# object store; larger ones stream from storage every epoch.
CACHE_BYTES = 2 * 1024**3
# A Train run leaves a CPU for Ray Data's tasks (reading, decoding) beside its workers:
# workers holding every CPU starve them and the run waits for ever.
DATA_CPUS = 1.0


@dataclass
class TrainingData:
    """What every run over the same data shares: classes, preprocessing and the Ray Datasets."""

    labels: list[str]
    prep: Any  # vitray.models.Preprocessing
    params: dict[str, Any]
    train_ds: Any
    val_ds: Any
    class_counts: list[int]
    n_train: int
    box_attention: float  # the box-attention term's weight, resolved for the data (0: off)
    in_process: bool = False  # trained in the driver's process (Ray Train's local mode), data in memory


def load_training_data(config: TrainConfig, workers_flag: str = "--workers", trial_cpus: float = 0.0,
                       in_process_max: int = 0) -> TrainingData:
    """Check the options, the output, the data and the cluster, then build the (cached or streaming) Ray Datasets.

    `trial_cpus`: what a Tune trial's own actor holds beside its Train run (tune passes it).
    `in_process_max`: a data set of at most this many images, with no cluster named, is read
    into this process's memory for a training here, without Ray (`vitray.runtime.runs_in_process`).
    """
    from vitray import cluster
    from vitray.data.sources import inspect_source
    from vitray.models import input_size_for, params_for, preprocessing_for
    from vitray.runtime import RayOptions, init_ray

    config.check()
    storage.check_output(config.out, "--out")
    storage.require(config.data, "training data")
    source = inspect_source(config.data, config.format)
    if not source.labelled:
        raise VitrayError(f"{config.data}: training needs labelled data (no labels found)")
    if len(source.labels) < 2:
        raise VitrayError(f"{config.data}: training needs at least 2 classes, found {source.labels}")
    box_attention = box_attention_weight(config, source.has_boxes)
    labels = source.labels
    if config.val:
        val_source = inspect_source(config.val, config.format, labels=labels)
        train_ids, val_ids = source.ids, val_source.ids
        counts = np.bincount(source.row_labels, minlength=len(labels))
    else:
        val_source = source
        train_ids, val_ids = stratified_split(source.ids, source.row_labels, config.val_fraction, config.seed)
        counts = np.bincount(source.row_labels[np.isin(source.ids, train_ids)], minlength=len(labels))
    channels, native_size = peek_shape(source)
    size = config.image_size or (None if config.model else input_size_for(native_size))
    # From the configs alone: the driver (a cluster's head node) never holds the weights.
    prep = preprocessing_for(config.model, size, channels)
    params = params_for(config.model, config.finetune, n_labels=len(labels), image_size=size, channels=channels)
    log.info("model: %s parameters, %s trainable", params["total"], params["trainable"])

    if trains_in_process(len(train_ids) + len(val_ids), config, in_process_max):
        log.info("training on %s images in this process (too few to start Ray for; --in-process-max 0 trains on "
                 "Ray)", f"{len(train_ids):,}")
        train_ds = memory_dataset(source, train_ids, prep.size, prep.channels, boxes=box_attention > 0)
        val_ds = memory_dataset(val_source, val_ids, prep.size, prep.channels)
        return TrainingData(labels, prep, params, train_ds, val_ds, counts.tolist(), len(train_ids), box_attention,
                            in_process=True)
    init_ray(RayOptions(address=config.ray_address))
    cluster.check_shared_output(config.out, config.shared_fs, "--out")
    cluster.check_fits(config.workers, 1.0, config.gpus_per_worker, workers_flag, extra_cpus=DATA_CPUS + trial_cpus,
                       extra_for="the trial and Ray Data" if trial_cpus else "Ray Data")
    log.info("reading %s training and %s validation images from %s", f"{len(train_ids):,}", f"{len(val_ids):,}",
             config.data if not config.val else f"{config.data} and {config.val}")
    train_ds = image_dataset(source, train_ids, prep.size, prep.channels, shuffle_seed=config.seed,
                             boxes=box_attention > 0)
    val_ds = image_dataset(val_source, val_ids, prep.size, prep.channels)
    return TrainingData(labels, prep, params, train_ds, val_ds, counts.tolist(), len(train_ids), box_attention)


def box_attention_weight(config: Any, has_boxes: bool) -> float:
    """--box-attention, else for data with boxes BOX_ATTENTION for a from-scratch preset,
    BOX_ATTENTION_PRETRAINED_HERE for an encoder `vitray pretrain` made, and 0 for the rest; a
    weight the run cannot use is refused (data without boxes, `--finetune head`, which trains
    no attention).

    Off by default for a model pre-trained elsewhere (a hub ViT): not measured there.
    """
    from vitray.models.specs import PRESETS, pretrained_here
    from vitray.train.config import BOX_ATTENTION, BOX_ATTENTION_PRETRAINED_HERE

    trains_attention = config.finetune != "head"
    if config.box_attention is None:
        if not (has_boxes and trains_attention):
            return 0.0
        if config.model is None or config.model in PRESETS:
            return BOX_ATTENTION
        return BOX_ATTENTION_PRETRAINED_HERE if pretrained_here(config.model) else 0.0
    if config.box_attention > 0 and not has_boxes:
        raise VitrayError(f"--box-attention needs images with boxes (a FRAMEimages parquet's `response`); "
                          f"{config.data} has none: leave it out or give 0")
    if config.box_attention > 0 and not trains_attention:
        raise VitrayError("--box-attention trains the attention, and --finetune head trains only the classifier: "
                          "give 0 or another --finetune")
    return float(config.box_attention)


def trains_in_process(images: int, config: TrainConfig, limit: int) -> bool:
    """Whether a training of `images` runs in this process: `runs_in_process`, and on a GPU only for one
    worker (more are a data-parallel run across GPUs, which only Ray gives)."""
    from vitray.runtime import runs_in_process

    if config.gpus_per_worker > 0 and config.workers > 1:
        return False
    return runs_in_process(images, limit, config.ray_address, config.gpus_per_worker)


def peek_shape(source: Any) -> tuple[int, int]:
    """Channels (1 or 3) and side of the data's first decodable image."""
    from vitray.data.readers import first_image

    image = first_image(source)
    return int(image.shape[2]), int(max(image.shape[:2]))


def image_dataset(source: Any, ids: list[str], size: int, channels: int, shuffle_seed: int | None = None,
                  boxes: bool = False) -> Any:
    """Decoded, resized uint8 images as a Ray Dataset; cached in memory when small.

    With `shuffle_seed` (training data) the rows are put in a seeded random order first:
    sources list their images class by class (an image folder's sub-folders, a table
    sorted by label), and the per-epoch local shuffle buffer would otherwise feed the
    model one class after another, with the rare class in a burst at the end of each
    epoch. A cached set is shuffled row by row once; a streaming one reads its files in
    a shuffled order and its blocks in a seeded shuffled order. With `boxes` the rows keep
    their `bbox` (in the resized image's pixels; NaN where an image has none).
    """
    from vitray.data.preprocess import resize_batch
    from vitray.data.readers import read_images

    if shuffle_seed is not None:
        ids = [ids[i] for i in np.random.default_rng(shuffle_seed).permutation(len(ids))]
    ds = read_images(source, ids).map_batches(
        resize_batch, fn_kwargs={"size": size, "channels": channels}, batch_format="numpy", batch_size=128)
    ds = ds.select_columns(["image", "label", "bbox"] if boxes else ["image", "label"])
    if len(ids) * size * size * channels <= CACHE_BYTES:
        if shuffle_seed is not None:
            ds = ds.random_shuffle(seed=shuffle_seed)
        return ds.materialize()
    return ds if shuffle_seed is None else ds.randomize_block_order(seed=shuffle_seed)


def memory_dataset(source: Any, ids: list[str], size: int, channels: int, boxes: bool = False) -> Any:
    """`image_dataset`'s rows, read, decoded and resized in this process and held in memory
    (`vitray.data.memory.MemoryShard`); the training loop draws each epoch's order."""
    from vitray.data.memory import MemoryShard
    from vitray.data.preprocess import resize_batch
    from vitray.data.readers import iter_images

    names = ["image", "label", "bbox"] if boxes else ["image", "label"]
    parts = [resize_batch(batch, size, channels) for batch in iter_images(source, ids)]
    parts = [{k: part[k] for k in names} for part in parts if len(part["label"])]
    if not parts:
        raise VitrayError(f"{source.uri}: none of its {len(ids):,} images could be decoded")
    return MemoryShard({k: np.concatenate([part[k] for part in parts]) for k in names})


def data_config() -> Any:
    """Ray Train's DataConfig: training rows in the same order run after run, validation split whole.

    Ray Train splits a dataset into equal shards, dropping the rows that do not divide;
    the validation set is split here without dropping any, so that each worker scores its
    share and the summed counts cover every validation image once.
    """
    import ray.train
    from ray.data import ExecutionOptions

    class ValidationSplit(ray.train.DataConfig):
        # Train V2 configures one dataset at a time, as each is first asked for.
        def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any,
                      **kwargs: Any) -> list[dict[str, Any]]:
            shards = super().configure({k: v for k, v in datasets.items() if k != "val"}, world_size,
                                       worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                val = datasets["val"].copy(datasets["val"])
                val.context.execution_options = self._resolve_execution_options("val")
                for shard, split in zip(shards, val.streaming_split(world_size, equal=False)):
                    shard["val"] = split
            return shards

    # preserve_order: the seeded draws of each training window (vitray.data.batches) see the same rows.
    return ValidationSplit(datasets_to_split=["train", "val"], execution_options=ExecutionOptions(preserve_order=True))
