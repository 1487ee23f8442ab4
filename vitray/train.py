"""Data-parallel ViT training on Ray Train (Train V2), with validation, checkpoints and export.

`train(TrainConfig(...))` reads the data with Ray Data (decode, resize and
augmentation stream in Ray tasks), runs `train_loop_per_worker` on N workers,
keeps the best checkpoint by validation macro-F1 and exports it as a plain
transformers model with its metrics, history and plots beside it.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import numpy as np

from vitray import storage
from vitray.errors import VitrayError

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "images_per_s")
# Data sets up to this size (resized uint8) are decoded once and kept in Ray's
# object store; larger ones stream from storage every epoch.
CACHE_BYTES = 2 * 1024**3
CLASS_WEIGHTS = ("auto", "loss", "none")
RUN_NAME = "train"
# A checkpoint folder (RUN_NAME/epoch-NNNN) holds the training state, loaded without
# unpickling code (torch.load(weights_only=True)), and a record of it written beside it: a
# folder whose record is missing, or names another size, was cut short while being written.
STATE_FILE = "state.pt"
RECORD_FILE = "checkpoint.json"
CHECKPOINT_DIR = re.compile(r"^epoch-(\d+)$")
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
        pretrained = self.model is not None and not self.model.startswith("vit-")
        return 1e-4 if pretrained and self.finetune == "full" else 1e-3


@dataclass
class TrainResult:
    out: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0


# --------------------------------------------------------------------------- driver


@dataclass
class Prepared:
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
    config.check()
    storage.check_output(config.out, "--out")
    run = storage.join(config.out, RUN_NAME)
    try:
        check_resume(run)
        prepared = prepare(config)
        result = fit(make_trainer(config, prepared))
        done = finish(config, result, prepared)
    except KeyboardInterrupt:
        raise interrupted(run) from None
    prune_checkpoints(result, run)
    return done


def interrupted(run_uri: str) -> VitrayError:
    """The one line of a Ctrl-C (exit 130): the epoch that the same command resumes after."""
    saved = complete_checkpoints(run_uri)
    if not saved:
        return VitrayError("interrupted before the first checkpoint; the same command starts again", exit_code=130)
    return VitrayError(f"interrupted after epoch {saved[0][0]}; the same command resumes", exit_code=130)


def prepare(config: TrainConfig, workers_flag: str = "--workers", trial_cpus: float = 0.0) -> Prepared:
    """Check the options, the output, the data and the cluster, then build the (cached or streaming) Ray Datasets.

    `trial_cpus`: what a Tune trial's own actor holds beside its Train run (tune passes it).
    """
    from vitray import cluster
    from vitray.data.readers import inspect_source
    from vitray.models import apply_finetune, build_model, input_size_for, param_report
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
    model, prep = build_model(config.model, labels,
                              config.image_size or (None if config.model else input_size_for(native_size)),
                              channels=channels)
    params = param_report(apply_finetune(model, config.finetune)).to_dict()
    del model
    log.info("model: %s parameters, %s trainable", params["total"], params["trainable"])

    init_ray(RayOptions(address=config.ray_address))
    cluster.check_shared_output(config.out, config.shared_fs, "--out")
    cluster.check_fits(config.workers, 1.0, config.gpus_per_worker, workers_flag, extra_cpus=DATA_CPUS + trial_cpus,
                       extra_for="the trial and Ray Data" if trial_cpus else "Ray Data")
    train_ds = _prepared(source, train_ids, prep.size, prep.channels, shuffle_seed=config.seed)
    val_ds = _prepared(val_source, val_ids, prep.size, prep.channels)
    if config.class_weights == "auto":
        # Before augmentation: every repeat of a rare image gets its own flips and shifts.
        train_ds = train_ds.map_batches(balance_batch, fn_kwargs={"rates": balanced_rates(counts)},
                                        batch_format="numpy", batch_size=256)
    if config.augment == "auto":
        from vitray.data.preprocess import AugmentConfig, augment_batch

        train_ds = train_ds.map_batches(augment_batch, fn_kwargs={"config": AugmentConfig.for_labels(labels)},
                                        batch_format="numpy", batch_size=256)
    return Prepared(labels, prep, params, train_ds, val_ds, counts.tolist(), len(train_ids))


def loop_config(config: TrainConfig, prepared: Prepared) -> dict[str, Any]:
    """What `train_loop_per_worker` needs, all plain data."""
    prep = prepared.prep
    return {
        "run": asdict(config),
        "labels": prepared.labels,
        "image_size": prep.size,
        "channels": prep.channels,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "lr": config.resolved_lr(),
        "class_weights": class_weights(np.array(prepared.class_counts)) if config.class_weights == "loss" else None,
        "n_train": prepared.n_train,
        "history_uri": storage.join(config.out, "history.csv"),
        "run_uri": storage.join(config.out, RUN_NAME),
    }


def stratified_split(ids: list[str], labels: np.ndarray, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split ids so that every class keeps its share in validation (at least one image each)."""
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        k = int(round(fraction * len(members)))
        k = min(max(k, 1), len(members) - 1) if len(members) > 1 else 0
        val.extend(members[:k].tolist())
    chosen = np.zeros(len(ids), dtype=bool)
    chosen[val] = True
    return [i for i, v in zip(ids, chosen) if not v], [i for i, v in zip(ids, chosen) if v]


def balanced_rates(counts: np.ndarray) -> list[float]:
    """How many times per epoch, on average, each image of a class is drawn so that every
    class present gets an equal share of an epoch of the same length (`--class-weights auto`).

    A class at 1/50 of the data is drawn ~10x per epoch (5 classes), each time with its own
    augmentation, and the common ones ~0.8x. Measured against inverse-frequency loss weights
    on the inspection images (README, "Measured"): the few rare images, each seen once an
    epoch at ten times the weight, gave noisy steps and a passed recall of 0.5 to 0.95 from
    run to run.
    """
    # The inverse-frequency numbers of the loss weights, used as rates: N / (classes · count).
    return class_weights(counts)


def balance_batch(batch: dict[str, np.ndarray], rates: Sequence[float], seed: int | None = None) -> dict[str, np.ndarray]:
    """Ray Data UDF: each row repeated a random number of times whose mean is its class's rate
    (the floor of the rate, plus one with the probability of its fraction); drawn anew each epoch."""
    rng = np.random.default_rng(seed)
    rate = np.asarray(rates, dtype=np.float64)[np.asarray(batch["label"], dtype=np.int64)]
    repeats = np.floor(rate).astype(np.int64) + (rng.random(len(rate)) < rate - np.floor(rate))
    index = np.repeat(np.arange(len(rate)), repeats)
    return {k: v[index] for k, v in batch.items()}


def class_weights(counts: np.ndarray) -> list[float]:
    """Inverse-frequency loss weights (`--class-weights loss`), normalised so that the average image weighs 1.

    A class at 1/50 of the data then weighs ~10x a common one, which is what
    lets the rare `passed` class be learned instead of ignored.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights.round(6).tolist()


def peek_shape(source: Any) -> tuple[int, int]:
    """Channels (1 or 3) and side of the data's first decodable image."""
    from vitray.data.readers import first_image

    image = first_image(source)
    return int(image.shape[2]), int(max(image.shape[:2]))


def _prepared(source: Any, ids: list[str], size: int, channels: int, shuffle_seed: int | None = None) -> Any:
    """Decoded, resized uint8 images as a Ray Dataset; cached in memory when small.

    With `shuffle_seed` (training data) the rows are put in a seeded random order first:
    sources list their images class by class (an image folder's sub-folders, a table
    sorted by label), and the per-epoch local shuffle buffer would otherwise feed the
    model one class after another, with the rare class in a burst at the end of each
    epoch. A cached set is shuffled row by row once; a streaming one reads its files in
    a shuffled order and its blocks in a new order every epoch.
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
    return ds if shuffle_seed is None else ds.randomize_block_order()


def make_trainer(config: TrainConfig, prepared: Prepared, callbacks: Sequence[Any] = ()) -> Any:
    """The TorchTrainer of a run, storing under `config.out` (the same out resumes)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    out = storage.resolve(config.out)
    use_gpu = config.gpus_per_worker > 0
    resources = {"CPU": 1}
    if use_gpu:
        resources["GPU"] = config.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(config, prepared),
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
        datasets={"train": prepared.train_ds, "val": prepared.val_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


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
        raise VitrayError(f"training failed: {failure_line(exc)}", exit_code=1) from exc
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def failure_line(exc: BaseException) -> str:
    """The innermost `SomeError: message` line of a (Ray-wrapped) worker failure."""
    import re

    lines = [line.strip() for line in str(exc).splitlines()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    return errors[-1] if errors else (lines[0] if lines else type(exc).__name__)


def finish(config: TrainConfig, result: Any, prepared: Prepared) -> TrainResult:
    """Export the best checkpoint (by validation macro-F1) and write metrics, history and plots."""
    from vitray.evaluate import plot_confusion, plot_curves
    from vitray.models import apply_finetune, build_model, export_model

    labels, prep, params = prepared.labels, prepared.prep, prepared.params
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


def save_state(folder: str, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """STATE_FILE and its RECORD_FILE (epoch, size, the epoch's metrics) into a local folder
    that Ray Train then uploads.

    Only tensors, dicts, lists, numbers, strings and None: what `load_state` accepts.
    """
    import json

    import torch

    path = os.path.join(folder, STATE_FILE)
    torch.save(state, path)
    with open(os.path.join(folder, RECORD_FILE), "w") as f:
        json.dump({"epoch": int(state["epoch"]), "state_bytes": os.path.getsize(path), "metrics": metrics}, f)


def read_record(folder_uri: str) -> dict[str, Any]:
    """The RECORD_FILE of a checkpoint folder (plain JSON)."""
    import json

    return json.loads(storage.read_bytes(storage.join(folder_uri, RECORD_FILE)))


def load_state(source: Any, shown: str, mmap: bool = False) -> dict[str, Any]:
    """A training state from a path or file object, without running code that a file may carry.

    A checkpoint under a shared --out is written by whoever can write there: only tensors and
    plain containers are read (weights_only), and anything else is refused in one line.
    """
    import pickle

    import torch

    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                   lines[0] if lines else type(exc).__name__)
        raise VitrayError(f"{shown}: not a vitray training state, refused without loading it ({why}); "
                          f"delete that checkpoint folder or use another --out") from None
    if not isinstance(state, dict) or not {"model", "epoch", "history"} <= set(state):
        raise VitrayError(f"{shown}: not a vitray training state; delete that checkpoint folder or use another --out")
    return state


def complete_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(epoch, folder URI) of the run's checkpoints that were written to their end, newest first.

    This and not Ray Train's own record is where a run resumes: Ray Train learns of a
    checkpoint when its controller next polls the workers, and a run stopped in between
    (Ctrl-C, a killed driver) leaves newer checkpoints on storage than its record names.
    """
    if not storage.exists(run_uri):
        return []
    root = storage.resolve(run_uri)
    sizes: dict[str, dict[str, int]] = {}
    for info in storage.list_files(run_uri):
        parts = storage.relative(root, info.path).split("/")
        if len(parts) == 2 and CHECKPOINT_DIR.match(parts[0]):
            sizes.setdefault(parts[0], {})[parts[1]] = info.size
    found = []
    for name, files in sizes.items():
        if STATE_FILE not in files or RECORD_FILE not in files:
            continue
        folder = storage.join(run_uri, name)
        try:
            record = read_record(folder)
            epoch, expected = int(record["epoch"]), int(record["state_bytes"])
        except (VitrayError, ValueError, KeyError, TypeError):
            continue
        if epoch == int(CHECKPOINT_DIR.match(name).group(1)) and files[STATE_FILE] == expected:
            found.append((epoch, folder))
    return sorted(found, reverse=True)


def check_resume(run_uri: str) -> int:
    """The epoch a run resumes after (0: none), its state checked to load safely before any work."""
    saved = complete_checkpoints(run_uri)
    if not saved:
        return 0
    epoch, folder = saved[0]
    uri = storage.join(folder, STATE_FILE)
    loc = storage.resolve(uri)
    if loc.is_s3:
        load_state(io.BytesIO(storage.read_bytes(uri)), uri)
    else:
        load_state(loc.path, uri, mmap=True)  # reads the structure, not the tensors
    return epoch


def prune_checkpoints(result: Any, run_uri: str) -> None:
    """Delete checkpoint folders that Ray Train does not keep (written but never registered)."""
    keep = {c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        keep.add(result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    root = storage.resolve(run_uri)
    names = {storage.relative(root, i.path).split("/")[0] for i in storage.list_files(run_uri)}
    for name in sorted(names):
        if CHECKPOINT_DIR.match(name) and name not in keep:
            try:
                root.fs.delete_dir(root.child(name).path)
            except OSError as exc:
                log.warning("could not delete the stale checkpoint %s: %s", name, exc)


def write_history(uri: str, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    storage.write_bytes(uri, buf.getvalue().encode())


# --------------------------------------------------------------------------- workers


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to zero."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """The per-worker loop: shard in, DDP steps, validation, report + checkpoint every epoch."""
    import ray.train
    import ray.train.torch
    import torch

    from vitray.data.preprocess import normalize
    from vitray.models import apply_finetune, build_model

    run = cfg["run"]
    # Ray Train logs every report (the whole metrics dict) at INFO under a logger named
    # after its file; the epoch line below says what matters.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(run["seed"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Logical CPUs are inflated on a small machine; share the real cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    model, _ = build_model(run["model"], cfg["labels"], cfg["image_size"], channels=cfg["channels"])
    model = apply_finetune(model, run["finetune"])
    steps_per_epoch = max(1, math.ceil(cfg["n_train"] / (run["batch_size"] * world)))
    total_steps = steps_per_epoch * run["epochs"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": run["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, max(1, int(run["warmup_fraction"] * total_steps))))
    start_epoch, history, resumes = 0, [], []
    saved = complete_checkpoints(cfg["run_uri"])  # newer than ray.train.get_checkpoint() after a Ctrl-C
    if saved:
        folder = storage.resolve(saved[0][1])
        with ray.train.Checkpoint(path=folder.path, filesystem=folder.fs).as_directory() as d:
            state = load_state(os.path.join(d, STATE_FILE), saved[0][1])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state["history"]
        # Recorded so that a user (and the tests) can see a run picked up where it stopped.
        resumes = state.get("resumes", []) + [start_epoch]
        if rank == 0:
            print(f"resuming after epoch {start_epoch} from {saved[0][1]}", flush=True)
    model = ray.train.torch.prepare_model(model)
    weights = torch.tensor(cfg["class_weights"], dtype=torch.float32, device=device) if cfg["class_weights"] else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=run["label_smoothing"])
    amp = device.type == "cuda"
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch + 1, run["epochs"] + 1):
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for batch in train_shard.iter_torch_batches(batch_size=run["batch_size"], local_shuffle_buffer_size=2048,
                                                    local_shuffle_seed=run["seed"] + epoch,
                                                    dtypes={"image": torch.uint8, "label": torch.long},
                                                    device=device):
            x = normalize(batch["image"], cfg["mean"], cfg["std"])
            y = batch["label"]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(pixel_values=x).logits
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if run["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(trainable, run["grad_clip"])
            optimizer.step()
            scheduler.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
        elapsed = time.perf_counter() - t0
        totals = _all_reduce(torch.tensor([seen, loss_sum, elapsed], dtype=torch.float64, device=device))
        val = _validate(model, val_data, cfg, device, rank, world, amp, loss_fn)
        row = {
            "epoch": epoch,
            "train_loss": round(float(totals[1] / max(1.0, totals[0])), 6),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "lr": float(scheduler.get_last_lr()[0]),
            # Images per second of the whole group: total images over the slowest worker's time.
            "images_per_s": round(float(totals[0] / max(1e-9, totals[2] / world)), 1),
        }
        history = [h for h in history if h["epoch"] < epoch] + [row]
        metrics = {**row, "val": val, "recall": {k: v["recall"] for k, v in val["per_class"].items()}}
        if rank == 0:
            recalls = " ".join(f"{k}={v['recall']:.2f}" for k, v in val["per_class"].items())
            print(f"epoch {epoch}/{run['epochs']}: loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
                  f"acc {row['val_accuracy']:.4f} macro-F1 {row['val_macro_f1']:.4f} "
                  f"({row['images_per_s']:.0f} img/s) recall: {recalls}", flush=True)
            with tempfile.TemporaryDirectory() as d:
                inner = model.module if hasattr(model, "module") else model
                save_state(d, {"model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                               "resumes": resumes}, metrics)
                write_history(cfg["history_uri"], history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"epoch-{epoch:04d}")
        else:
            ray.train.report(metrics, checkpoint=None)


def _all_reduce(t: Any) -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _validate(model: Any, val_data: Any, cfg: dict[str, Any], device: Any, rank: int, world: int,
              amp: bool, loss_fn: Any) -> dict[str, Any]:
    """Every worker sees the whole validation set and scores every world-th batch."""
    import torch

    from vitray.data.preprocess import normalize
    from vitray.evaluate import classification_metrics

    k = len(cfg["labels"])
    confusion = torch.zeros(k * k + 2, dtype=torch.float64, device=device)  # + loss sum, count
    model.eval()
    with torch.inference_mode():
        for i, batch in enumerate(val_data.iter_torch_batches(batch_size=256, dtypes={"image": torch.uint8,
                                                                                     "label": torch.long},
                                                              device=device)):
            if i % world != rank:
                continue
            x = normalize(batch["image"], cfg["mean"], cfg["std"])
            y = batch["label"]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(pixel_values=x).logits.float()
            pred = logits.argmax(-1)
            confusion[: k * k] += torch.bincount(y * k + pred, minlength=k * k).to(torch.float64)
            confusion[-2] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
            confusion[-1] += len(y)
    confusion = _all_reduce(confusion).cpu().numpy()
    cm = confusion[: k * k].reshape(k, k).astype(np.int64)
    y_true = np.repeat(np.arange(k), cm.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(k), cm[t]) for t in range(k)]) if cm.sum() else np.zeros(0, int)
    metrics = classification_metrics(y_true.tolist(), y_pred.tolist(), cfg["labels"])
    metrics["loss"] = round(float(confusion[-2] / max(1.0, confusion[-1])), 6)
    return metrics


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
