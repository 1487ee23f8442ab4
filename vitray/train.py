"""Data-parallel ViT training on Ray Train (Train V2), with validation, checkpoints and export.

`train(TrainConfig(...))` reads the data with Ray Data (decode, resize and
augmentation stream in Ray tasks), runs `train_loop_per_worker` on N workers,
keeps the best checkpoint by validation macro-F1 and exports it as a plain
transformers model with its metrics, history and plots beside it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import numpy as np

from vitray import storage
from vitray.checkpoints import (STATE_FILE, check_resume, complete_checkpoints, load_state, prune_checkpoints,
                                write_history)
from vitray.data.preprocess import AugmentConfig
from vitray.data.sampling import balanced_rates, class_weights, stratified_split
from vitray.errors import VitrayError

log = logging.getLogger(__name__)

# Data sets up to this size (resized uint8) are decoded once and kept in Ray's
# object store; larger ones stream from storage every epoch.
CACHE_BYTES = 2 * 1024**3
CLASS_WEIGHTS = ("auto", "loss", "none")
RUN_NAME = "train"
OUTPUT_FILES = ("metrics.json", "history.csv", "args.json", "curves.png", "confusion_matrix.png")
# A Train run leaves a CPU for Ray Data's tasks (balancing, augmentation) beside its workers:
# workers holding every CPU starve them and the run waits for ever.
DATA_CPUS = 1.0
ABORT_S = 30.0  # how long Ctrl-C waits for Ray Train to stop the workers


@dataclass
class TrainConfig:
    """Every option of a training run, with its one default."""

    data: str
    out: str
    val: str | None = None
    val_fraction: float = 0.1
    format: str | None = None
    model: str | None = None  # preset, folder, s3:// prefix or hub id; None: a preset sized for the data
    image_size: int | None = None
    epochs: int = 30
    lr: float | None = None  # None: 1e-3 from scratch / head / LoRA, 1e-4 for full fine-tuning
    batch_size: int = 32  # per worker; 32 beat 64 on both digits and inspection images (see README)
    workers: int = 1
    gpus_per_worker: float = 0.0
    finetune: str = "full"
    class_weights: str = "auto"  # auto: class-balanced sampling; loss: inverse-frequency loss weights; none
    augment: str = "auto"  # auto: label-aware flips where safe, shifts, lighting; none
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    max_failures: int = 3
    seed: int = 0
    ray_address: str | None = None
    shared_fs: bool = False  # a local --out that every node of a multi-node cluster mounts
    mlflow: str | None = None  # MLflow tracking URI (else $MLFLOW_TRACKING_URI; neither: untracked)
    mlflow_experiment: str | None = None  # default "vitray"

    def check(self) -> None:
        """Refuse bad values before any work starts."""
        from vitray.models import parse_finetune

        if self.epochs < 1 or self.batch_size < 1 or self.workers < 1:
            raise VitrayError("--epochs, --batch-size and --workers must be at least 1")
        if not 0.0 < self.val_fraction < 1.0 and self.val is None:
            raise VitrayError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.gpus_per_worker < 0:
            raise VitrayError("--gpus-per-worker cannot be negative")
        if self.lr is not None and not 0 < self.lr < 1:
            raise VitrayError(f"--lr must be between 0 and 1, got {self.lr}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise VitrayError(f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights}")
        if self.augment not in ("auto", "none"):
            raise VitrayError(f"--augment must be auto or none, got {self.augment}")
        if self.image_size is not None and self.image_size < 4:
            raise VitrayError(f"--image-size must be at least 4, got {self.image_size}")
        parse_finetune(self.finetune)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        from vitray.models import PRESETS

        pretrained = self.model is not None and self.model not in PRESETS
        return 1e-4 if pretrained and self.finetune == "full" else 1e-3


@dataclass
class TrainResult:
    out: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0


# --------------------------------------------------------------------------- driver


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


def train(config: TrainConfig) -> TrainResult:
    """Run a training job end to end; outputs land under `config.out`.

    Re-running with the same `out` after a crash or Ctrl-C resumes from the newest complete
    checkpoint; Ctrl-C raises a VitrayError with exit code 130 that says after which epoch.
    """
    from vitray import tracking

    config.check()
    storage.check_output(config.out, "--out")
    run = storage.join(config.out, RUN_NAME)
    tracked = None
    try:
        check_resume(run)
        data = load_training_data(config)
        tracked = tracking.start(tracking.resolve(config.mlflow, config.mlflow_experiment),
                                 name=f"train {config.out}", params={**asdict(config), "lr": config.resolved_lr()})
        with TrainingProgress(config.epochs) as progress:
            result = fit(make_trainer(config, data, progress=progress.queue, tracked=tracked))
        done = finish(config, result, data)
    except KeyboardInterrupt:
        tracking.end(tracked, "KILLED")
        raise interrupted(run) from None
    except BaseException:
        tracking.end(tracked, "FAILED")
        raise
    prune_checkpoints(result, run)
    track_outputs(tracked, done)
    return done


def track_outputs(tracked: Any, result: TrainResult) -> None:
    """The final metrics, the run's files and its model as the tracked run's artifacts; then close it."""
    from vitray import tracking

    metrics = result.metrics
    tracking.log_metrics(tracked, {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                                   "best_epoch": result.best_epoch,
                                   **{f"recall_{k}": v["recall"] for k, v in metrics["per_class"].items()}})
    tracking.log_outputs(tracked, [storage.join(result.out, name) for name in OUTPUT_FILES])
    model = storage.resolve(storage.join(result.out, "model"))
    files = [model.child(storage.relative(model, f.path)).uri for f in storage.list_files(model.uri)]
    tracking.log_outputs(tracked, files, folder="model")
    tracking.end(tracked)


class TrainingProgress:
    """The driver's side of rank 0's progress: a bar per epoch, a line per finished epoch."""

    def __init__(self, epochs: int) -> None:
        from vitray.progress import Channel

        self.epochs = epochs
        self._bar: Any = None
        self._epoch = 0
        self._channel = Channel(self._show)
        self.queue = self._channel.queue

    def _show(self, message: dict[str, Any]) -> None:
        from vitray.progress import Progress, clock

        kind = message.get("kind")
        if kind == "log":
            log.info("%s", message["line"])
        elif kind == "batch":
            if message["epoch"] != self._epoch:
                self._close_bar()
                self._epoch = message["epoch"]
                self._bar = Progress(f"epoch {self._epoch}/{message['epochs']}", message["steps"], unit="batch",
                                     elapsed=message["seconds"])
            rate = message["images"] / max(1e-9, message["seconds"])
            left = (message["steps"] - message["step"]) + message["steps"] * (message["epochs"] - self._epoch)
            per_step = message["seconds"] / max(1, message["step"])
            self._bar.set(message["step"], img_s=f"{rate:,.0f}", run_eta=clock(left * per_step))
        elif kind == "epoch":
            self._close_bar()
            row = message["row"]
            recalls = " ".join(f"{k}={v:.2f}" for k, v in message["recall"].items())
            log.info("epoch %d/%d: loss %.4f, val_loss %.4f, acc %.4f, macro-F1 %.4f (%s img/s); recall %s",
                     row["epoch"], message["epochs"], row["train_loss"], row["val_loss"], row["val_accuracy"],
                     row["val_macro_f1"], f"{row['images_per_s']:,.0f}", recalls)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close(quiet=True)
            self._bar = None

    def __enter__(self) -> "TrainingProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._channel.close()
        self._close_bar()


def interrupted(run_uri: str) -> VitrayError:
    """The one line of a Ctrl-C (exit 130): the epoch that the same command resumes after."""
    saved = complete_checkpoints(run_uri)
    if not saved:
        return VitrayError("interrupted before the first checkpoint; the same command starts again", exit_code=130)
    return VitrayError(f"interrupted after epoch {saved[0][0]}; the same command resumes", exit_code=130)


def load_training_data(config: TrainConfig, workers_flag: str = "--workers", trial_cpus: float = 0.0) -> TrainingData:
    """Check the options, the output, the data and the cluster, then build the (cached or streaming) Ray Datasets.

    `trial_cpus`: what a Tune trial's own actor holds beside its Train run (tune passes it).
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

    init_ray(RayOptions(address=config.ray_address))
    cluster.check_shared_output(config.out, config.shared_fs, "--out")
    cluster.check_fits(config.workers, 1.0, config.gpus_per_worker, workers_flag, extra_cpus=DATA_CPUS + trial_cpus,
                       extra_for="the trial and Ray Data" if trial_cpus else "Ray Data")
    log.info("reading %s training and %s validation images from %s", f"{len(train_ids):,}", f"{len(val_ids):,}",
             config.data if not config.val else f"{config.data} and {config.val}")
    train_ds = image_dataset(source, train_ids, prep.size, prep.channels, shuffle_seed=config.seed)
    val_ds = image_dataset(val_source, val_ids, prep.size, prep.channels)
    return TrainingData(labels, prep, params, train_ds, val_ds, counts.tolist(), len(train_ids))


def loop_config(config: TrainConfig, data: TrainingData) -> dict[str, Any]:
    """What `train_loop_per_worker` needs, all plain data."""
    prep = data.prep
    return {
        "run": asdict(config),
        "labels": data.labels,
        "image_size": prep.size,
        "channels": prep.channels,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "lr": config.resolved_lr(),
        "class_weights": class_weights(np.array(data.class_counts)) if config.class_weights == "loss" else None,
        # Drawn in the workers, per window of rows (vitray.data.batches), seeded by epoch and rank.
        "balance_rates": balanced_rates(np.array(data.class_counts)) if config.class_weights == "auto" else None,
        "augment": AugmentConfig.for_labels(data.labels) if config.augment == "auto" else None,
        "n_train": data.n_train,
        "history_uri": storage.join(config.out, "history.csv"),
        "run_uri": storage.join(config.out, RUN_NAME),
    }




def peek_shape(source: Any) -> tuple[int, int]:
    """Channels (1 or 3) and side of the data's first decodable image."""
    from vitray.data.readers import first_image

    image = first_image(source)
    return int(image.shape[2]), int(max(image.shape[:2]))


def image_dataset(source: Any, ids: list[str], size: int, channels: int, shuffle_seed: int | None = None) -> Any:
    """Decoded, resized uint8 images as a Ray Dataset; cached in memory when small.

    With `shuffle_seed` (training data) the rows are put in a seeded random order first:
    sources list their images class by class (an image folder's sub-folders, a table
    sorted by label), and the per-epoch local shuffle buffer would otherwise feed the
    model one class after another, with the rare class in a burst at the end of each
    epoch. A cached set is shuffled row by row once; a streaming one reads its files in
    a shuffled order and its blocks in a seeded shuffled order.
    """
    from vitray.data.preprocess import resize_batch
    from vitray.data.readers import read_images

    if shuffle_seed is not None:
        ids = [ids[i] for i in np.random.default_rng(shuffle_seed).permutation(len(ids))]
    ds = read_images(source, ids).map_batches(
        resize_batch, fn_kwargs={"size": size, "channels": channels}, batch_format="numpy", batch_size=128)
    ds = ds.select_columns(["image", "label"])
    if len(ids) * size * size * channels <= CACHE_BYTES:
        if shuffle_seed is not None:
            ds = ds.random_shuffle(seed=shuffle_seed)
        return ds.materialize()
    return ds if shuffle_seed is None else ds.randomize_block_order(seed=shuffle_seed)


def make_trainer(config: TrainConfig, data: TrainingData, callbacks: Sequence[Any] = (), progress: Any = None,
                 tracked: Any = None) -> Any:
    """The TorchTrainer of a run, storing under `config.out` (the same out resumes).

    `progress`: the queue of a `vitray.progress.Channel` that rank 0 reports its progress to;
    `tracked`: the MLflow run (`vitray.tracking.Tracking`) rank 0 logs each epoch to.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from vitray.train_loop import train_loop_per_worker

    out = storage.resolve(config.out)
    use_gpu = config.gpus_per_worker > 0
    resources = {"CPU": 1}
    if use_gpu:
        resources["GPU"] = config.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config(config, data), "progress": progress, "tracking": tracked},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=out.path,
            storage_filesystem=out.fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_macro_f1", checkpoint_score_order="max"),
            callbacks=list(callbacks),
        ),
        datasets={"train": data.train_ds, "val": data.val_ds},
        dataset_config=data_config(),
    )


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


def fit(trainer: Any) -> Any:
    """trainer.fit(), with a worker failure reported as one line (exit 1) and Ctrl-C as KeyboardInterrupt.

    In the main thread, Train V2 puts its own Ctrl-C handler in place: it kills the run's
    controller and exits the process (code 1, no word said). Here Ctrl-C raises
    KeyboardInterrupt instead, after the controller has stopped the workers, so that the
    caller can say which epoch the same command resumes after.
    """
    import signal
    import threading

    import ray

    controllers: list[Any] = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None

    def hold(controller: Any) -> None:
        controllers.append(controller)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    # Train V2 (DataParallelTrainer._initialize_and_run_controller) hands the controller to this
    # private method, in the main thread only, to install its handler. Should a later Ray rename
    # it, its own handler runs again, and its SystemExit is taken for the Ctrl-C below.
    trainer._register_sigint_handler = hold
    try:
        return trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        for controller in controllers:
            try:  # aborting ends the controller actor: an actor error is its normal answer
                ray.get(controller.abort.remote(), timeout=ABORT_S)
            except Exception:  # noqa: BLE001
                pass
        raise KeyboardInterrupt from None
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; show the cause in one line
        from vitray.faults import innermost_line

        raise VitrayError(f"training failed: {innermost_line(exc)}", exit_code=1) from exc
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def finish(config: TrainConfig, result: Any, data: TrainingData) -> TrainResult:
    """Export the best checkpoint (by validation macro-F1) and write metrics, history and plots."""
    from vitray.evaluate import plot_confusion, plot_curves
    from vitray.models import apply_finetune, build_model, export_model

    labels, prep, params = data.labels, data.prep, data.params
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if "val_macro_f1" in m]
    if not candidates:
        raise VitrayError("training finished without a checkpoint", exit_code=1)
    best_ckpt, best = max(candidates, key=lambda cm: (cm[1]["val_macro_f1"], cm[1]["epoch"]))
    with best_ckpt.as_directory() as d:
        state = load_state(os.path.join(d, STATE_FILE), best_ckpt.path)
    model, _ = build_model(config.model, labels, prep.size, channels=prep.channels)
    model = apply_finetune(model, config.finetune)
    model.load_state_dict(state["model"])
    export_model(model, prep, storage.join(config.out, "model"))

    latest = state
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            latest = load_state(os.path.join(d, STATE_FILE), result.checkpoint.path)
    history = latest["history"]
    metrics = dict(best["val"])
    metrics["params"] = params
    metrics["best_epoch"] = best["epoch"]
    metrics["resumed_after_epochs"] = latest.get("resumes", [])
    storage.write_json(storage.join(config.out, "metrics.json"), metrics)
    write_history(storage.join(config.out, "history.csv"), history)
    storage.write_json(storage.join(config.out, "args.json"), {**asdict(config), "lr": config.resolved_lr(),
                                                               "labels": labels})
    plot_confusion(metrics, storage.join(config.out, "confusion_matrix.png"),
                   title=f"validation, epoch {best['epoch']}")
    plot_curves(history, storage.join(config.out, "curves.png"))
    return TrainResult(config.out, metrics, history, best["epoch"])


# --------------------------------------------------------------------------- checkpoints




def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
