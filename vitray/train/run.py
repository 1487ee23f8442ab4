"""Data-parallel ViT training on Ray Train (Train V2), with validation, checkpoints and export.

`train(TrainConfig(...))` reads the data with Ray Data (`vitray.train.data`: decode and
resize stream in Ray tasks), runs `train_loop_per_worker` (`vitray.train.loop`) on N
workers, keeps a checkpoint per epoch and exports the last (or best) as a plain
transformers model with its metrics, history and plots beside it. A small data set on no
cluster trains in this process instead (Ray Train's local mode), without starting Ray.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from vitray import runs, storage
from vitray.data.preprocess import AugmentConfig
from vitray.data.sampling import balanced_rates, class_weights
from vitray.errors import VitrayError
from vitray.runtime import verbose
from vitray.train.checkpoints import (CHECKPOINTS_KEPT, RECORD_FILE, STATE_FILE, check_resume, complete_checkpoints,
                                      load_state, prune_checkpoints, scored_checkpoints, write_history)
from vitray.train.config import TrainConfig
from vitray.train.data import TrainingData, data_config, load_training_data

log = logging.getLogger(__name__)

RUN_NAME = "train"
OUTPUT_FILES = ("metrics.json", "history.csv", "args.json", "curves.png", "confusion_matrix.png")
ABORT_S = 30.0  # how long Ctrl-C waits for Ray Train to stop the workers


@dataclass
class TrainResult:
    out: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0  # the epoch of the best validation macro-F1
    exported_epoch: int = 0  # the epoch whose weights were exported (--export)


# --------------------------------------------------------------------------- driver


def train(config: TrainConfig) -> TrainResult:
    """Run a training job end to end; outputs land under `config.out`.

    Re-running with the same `out` after a crash, Ctrl-C, SIGTERM or SIGHUP resumes from the newest
    complete checkpoint (with the options the run began with: vitray.runs); a stop raises a
    VitrayError with the signal's exit code (130, 143, 129) that says after which epoch. One run
    per output: a second one on the same `out` is refused while the first holds its lease.
    """
    config.check()
    config = config.located()
    storage.check_output(config.out, "--out")
    check_outside_data(config.out, config.data, config.val)
    config = replace(config, lr=config.resolved_lr())  # the rule reads the model's config once, here
    with runs.held(config.out):
        return _train(config)


def _train(config: TrainConfig) -> TrainResult:
    from vitray import tracking

    run = storage.join(config.out, RUN_NAME)
    tracked = None
    try:
        if config.fresh:
            runs.discard(run)
        resuming = check_resume(run) > 0
        runs.check_options(config.out, run, asdict(config), resuming)
        data = load_training_data(config, in_process_max=config.in_process_max)
        check_steps(data.n_train, config.workers, config.batch_size)
        runs.record_options(run, asdict(config), resuming)
        config = replace(config, box_attention=data.box_attention)  # resolved for the data, as recorded
        # A resumed training goes on in the MLflow run it began (found by its name: the --out it writes).
        tracked = tracking.start(tracking.resolve(config.mlflow, config.mlflow_experiment),
                                 name=f"train {storage.resolve(config.out).uri}",
                                 params=asdict(config), resume=resuming)
        with TrainingProgress(config.epochs, in_process=data.in_process) as progress:
            result = fit(make_trainer(config, data, progress=progress.queue, tracked=tracked))
        done = finish(config, result, data)
    except KeyboardInterrupt:
        tracking.end(tracked, "KILLED")
        raise interrupted(run) from None
    except BaseException:
        tracking.end(tracked, "FAILED")
        raise
    if not data.in_process:  # a run in this process kept its best and newest as it went
        prune_checkpoints(result, run)
    track_outputs(tracked, done)
    return done


def check_outside_data(out: str, *inputs: str | None) -> None:
    """Refuse an output inside (or at) the data it reads, by real location: the next run would read its files."""
    for given in inputs:
        if given is not None and storage.same_or_inside(out, given):
            raise VitrayError(f"--out {out} is inside the data {given}: the next run would read its outputs as "
                              "data; give an --out outside it")


def check_steps(n_train: int, workers: int, batch_size: int) -> None:
    """Refuse a training in which a worker would take no step: fewer images per worker than a batch."""
    per_worker = n_train // max(1, workers)
    if per_worker < batch_size:
        raise VitrayError(f"the training split has {n_train} images, {per_worker} per worker, fewer than "
                          f"--batch-size {batch_size}: no step could be taken; give --batch-size "
                          f"{max(1, per_worker)} or less, fewer --workers, or more data")


def track_outputs(tracked: Any, result: TrainResult) -> None:
    """The final metrics, the run's files and its model as the tracked run's artifacts; then close it."""
    from vitray import tracking

    metrics = result.metrics
    tracking.log_metrics(tracked, {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                                   "best_epoch": result.best_epoch, "exported_epoch": result.exported_epoch,
                                   **{f"recall_{k}": v["recall"] for k, v in metrics["per_class"].items()}})
    tracking.log_outputs(tracked, [storage.join(result.out, name) for name in OUTPUT_FILES])
    tracking.log_folder(tracked, storage.join(result.out, "model"), folder="model")
    tracking.end(tracked)


class TrainingProgress:
    """The driver's side of rank 0's progress: a bar per epoch, a line per finished epoch."""

    def __init__(self, epochs: int, in_process: bool = False) -> None:
        from vitray.progress import Channel, LocalChannel

        self.epochs = epochs
        self._bar: Any = None
        self._epoch = 0
        self._channel = LocalChannel(self._show) if in_process else Channel(self._show)
        self.queue = self._channel.queue

    def _show(self, message: dict[str, Any]) -> None:
        from vitray.progress import Progress, clock

        kind = message.get("kind")
        if kind == "log":  # a worker's line; a warning (its tracking failed) is shown as one
            log.log(logging.WARNING if message.get("level") == "warning" else logging.INFO, "%s", message["line"])
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
    """The one line of a stopped run (Ctrl-C: exit 130; SIGTERM: 143; SIGHUP: 129): the epoch it resumes after."""
    from vitray.interrupts import stop_error

    saved = complete_checkpoints(run_uri)
    if not saved:
        return stop_error("{stopped} before the first checkpoint; the same command starts again")
    return stop_error(f"{{stopped}} after epoch {saved[0][0]}; the same command resumes")


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
        "box_attention": data.box_attention,
        # One process takes the whole group's batch: the same steps, and the same mean gradient
        # per step, as `workers` data-parallel workers of `batch_size`.
        "batch_size": config.batch_size * (config.workers if data.in_process else 1),
        "in_process": data.in_process,
        "history_uri": storage.join(config.out, "history.csv"),
        "run_uri": storage.join(config.out, RUN_NAME),
    }




def make_trainer(config: TrainConfig, data: TrainingData, callbacks: Sequence[Any] = (), progress: Any = None,
                 tracked: Any = None) -> Any:
    """The TorchTrainer of a run, storing under `config.out` (the same out resumes); for data held in this
    process, one in Ray Train's local mode (`num_workers=0`: the loop runs here, no Ray started).

    `progress`: the queue of a `vitray.progress.Channel` that rank 0 reports its progress to;
    `tracked`: the MLflow run (`vitray.tracking.Tracking`) rank 0 logs each epoch to.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from vitray.train.loop import train_loop_per_worker

    out = storage.resolve(config.out)
    use_gpu = config.gpus_per_worker > 0
    resources = {"CPU": 1}
    if use_gpu:
        resources["GPU"] = config.gpus_per_worker
    if data.in_process and not verbose():
        # Local mode announces itself at INFO, and its report() logs every epoch's metrics dict.
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    scaling = ray.train.ScalingConfig(num_workers=0) if data.in_process else ray.train.ScalingConfig(
        num_workers=config.workers, use_gpu=use_gpu, resources_per_worker=resources)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config(config, data), "progress": progress, "tracking": tracked},
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=out.path,
            storage_filesystem=out.fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=CHECKPOINTS_KEPT, checkpoint_score_attribute="val_macro_f1",
                checkpoint_score_order="max"),
            callbacks=list(callbacks),
        ),
        datasets={"train": data.train_ds, "val": data.val_ds},
        dataset_config=data_config(),
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
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and exc.code in (signal.SIGTERM, signal.SIGHUP):
            from vitray.interrupts import note

            note(int(exc.code))  # Ray's own SIGTERM handler exits with the signal's number
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
    """Export the last epoch (--export last) or the best by validation macro-F1 (--export best), and
    write metrics, history and plots."""
    from vitray.figures import plot_confusion, plot_curves
    from vitray.models import apply_finetune, build_model, export_model

    labels, prep, params = data.labels, data.prep, data.params
    latest, chosen = _latest_checkpoint(result), None
    if config.export == "last" and latest is not None:
        state, chosen = latest
    else:
        kept = _stored_checkpoints(storage.join(config.out, RUN_NAME)) if data.in_process else result.best_checkpoints
        candidates = [(c, m) for c, m in (kept or []) if "val_macro_f1" in m]
        if candidates:
            best_ckpt, chosen = max(candidates, key=lambda cm: (cm[1]["val_macro_f1"], cm[1]["epoch"]))
            with best_ckpt.as_directory() as d:
                state = load_state(os.path.join(d, STATE_FILE), best_ckpt.path)
    if chosen is None:
        raise VitrayError("training finished without a checkpoint", exit_code=1)
    model, _ = build_model(config.model, labels, prep.size, channels=prep.channels)
    model = apply_finetune(model, config.finetune)
    model.load_state_dict(state["model"])
    export_model(model, prep, storage.join(config.out, "model"))

    newest = latest[0] if latest is not None else state  # it holds the whole run's history and resumes
    history = newest["history"]
    best = max(history, key=lambda row: (row["val_macro_f1"], row["epoch"]))
    metrics = dict(chosen["val"])
    metrics["params"] = params
    metrics["best_epoch"] = best["epoch"]
    metrics["exported_epoch"] = chosen["epoch"]
    metrics["resumed_after_epochs"] = newest.get("resumes", [])
    storage.write_json(storage.join(config.out, "metrics.json"), metrics)
    write_history(storage.join(config.out, "history.csv"), history)
    storage.write_json(storage.join(config.out, "args.json"), {**asdict(config), "labels": labels})
    plot_confusion(metrics, storage.join(config.out, "confusion_matrix.png"),
                   title=f"validation, epoch {chosen['epoch']}")
    plot_curves(history, storage.join(config.out, "curves.png"))
    return TrainResult(config.out, metrics, history, best["epoch"], chosen["epoch"])


def _stored_checkpoints(run_uri: str) -> list[tuple[Any, dict[str, Any]]]:
    """(checkpoint, metrics) of the complete checkpoints on storage: what a run in this process kept
    (Ray Train's local mode records none)."""
    import ray.train

    return [(ray.train.Checkpoint(path=(loc := storage.resolve(folder)).path, filesystem=loc.fs), metrics)
            for _, folder, metrics in scored_checkpoints(run_uri)]


def _latest_checkpoint(result: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint's state and the metrics reported with it, or None."""
    import json

    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as d:
        state = load_state(os.path.join(d, STATE_FILE), result.checkpoint.path)
        with open(os.path.join(d, RECORD_FILE)) as f:
            metrics = json.load(f).get("metrics") or {}
    return (state, metrics) if "val" in metrics else None


# --------------------------------------------------------------------------- checkpoints




