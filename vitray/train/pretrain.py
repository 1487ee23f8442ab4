"""Masked-autoencoder (MAE) pre-training of a ViT on a line's unlabelled images, with Ray Train.

`pretrain(PretrainConfig(...))` streams the images with Ray Data as `vitray train` does (any
labels are ignored), trains transformers' `ViTMAEForPreTraining` data-parallel (the workers run
`vitray.train.pretrain_loop`), keeps a checkpoint per epoch (the same command resumes), and exports the
encoder as a plain transformers ViT in OUT/model that `vitray train --model OUT/model` fine-tunes
on a few labelled images, with history.csv, curves.png and reconstructions.png beside it.
"""
from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from vitray import runs, storage
from vitray.errors import VitrayError
from vitray.options import fraction, option
from vitray.train.run import TrainingProgress, check_outside_data

log = logging.getLogger(__name__)

RUN_NAME = "pretrain"
OUTPUT_FILES = ("history.csv", "args.json", "curves.png", "reconstructions.png")
SHOWN = 6  # validation images in reconstructions.png
# The encoder's part of a ViT config: what the MAE and the exported ViT share, key for key.
ENCODER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
                "image_size", "patch_size", "num_channels", "qkv_bias")
FORMATS = ("imagefolder", "parquet", "csv", "images")


@dataclass
class PretrainConfig:
    """Every option of a pre-training run, with its one default."""

    data: str = option(
        help="images: a folder or prefix (recursive; labels ignored), parquet or digit CSV (local, file:// or s3://)",
        metavar="URI", required=True,
        doc="the images: a folder or prefix (recursively; sub-folder names are not read as labels), Parquet in the "
            "Hugging Face image layout, or the digit-recognizer CSV")
    out: str = option(
        help="output folder or s3:// prefix; the same --out resumes", metavar="URI", required=True,
        doc="output folder or `s3://` prefix; the same `--out` resumes, with the options it began with ([what a "
            "resume may change](reliability.md#resuming-a-training)); one run per output at a time")
    format: str | None = option(None, "data format", choices=FORMATS, default_text="detected",
                                doc="`imagefolder` or `images` (both read as plain images), `parquet`, `csv`")
    # A preset (a new ViT) or a ViT to go on from (folder, s3:// prefix, hub id: its encoder, a new decoder);
    # None: the preset `vitray train` would size for the data.
    model: str | None = option(
        None, "a preset (vit-tiny, vit-small, vit-base), or a ViT to go on from (folder, s3:// prefix, hub id)",
        metavar="M", default_text="the preset `vitray train` sizes for the data",
        doc="a preset (`vit-tiny`, `vit-small`, `vit-base`): a new ViT; or a ViT to go on from (a folder, `s3://` "
            "prefix or hub id, an earlier `OUT/model` too): its encoder and its preprocessing, a new decoder")
    image_size: int | None = option(
        None, "input side of a preset", parse=int, metavar="N",
        default_text="as `vitray train`: the data's side (under 16 px: 32)",
        doc="input side of a preset; the patch size follows (28 → 4, 32 → 4, 64 → 8, 224 → 16)")
    epochs: int = option(
        300, "passes over the images", metavar="N",
        doc="MAE wants many: the paper trains 800-1600 on ImageNet; here 300 gave the fine-tuned encoder 0.005 to "
            "0.028 more macro-F1 than 100 ([measured](#longer-pre-training-and-layer-wise-rate-decay))")
    mask_ratio: float = option(
        0.5, "share of patches hidden", metavar="F",
        doc="share of each image's patches hidden from the encoder; MAE's 0.75 fine-tuned 0.03 to 0.05 macro-F1 "
            "worse on 300 labels here ([measured](#the-mask-ratio)); a lower ratio costs time (the encoder sees "
            "more patches)")
    lr: float = option(1e-3, "peak learning rate", metavar="F", default_text="1e-3",
                       doc="peak learning rate; warm-up over 10% of the steps, then cosine to zero")
    batch_size: int = option(64, "per worker", metavar="N")
    workers: int = option(1, "Ray Train workers", metavar="N", doc="Ray Train data-parallel workers (1 CPU each)")
    gpus_per_worker: float = option(0.0, "GPUs per worker; > 0 trains on GPU with bf16", metavar="N",
                                    doc="above 0: on GPU, with bf16 autocast")
    augment: str = option(
        "auto", "auto: small shifts and lighting", choices=("auto", "none"),
        doc="`auto`: shifts of up to 1/16 of the side and a little brightness and contrast jitter; `none`")
    # Recipe fields without a flag: a --config may set them (`config_extra`).
    norm_pix_loss: bool = True  # MAE's target: each patch's pixels normalised by its own mean and variance
    val_fraction: float = option(
        0.05, "share held out", parse=fraction, metavar="F",
        doc="images held out (at random, seeded): the validation loss each epoch and the reconstructions figure")
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    seed: int = option(0, "the split, the order, the initialisation, the augmentation and the masks", metavar="S")
    mlflow: str | None = runs.mlflow_option("track the run: params, per-epoch losses (rank 0), final losses, outputs and "
                                       "model ([tracking](tracking.md))")
    mlflow_experiment: str | None = runs.mlflow_experiment_option()
    fresh: bool = runs.fresh_option()
    ray_address: str | None = None
    shared_fs: bool = False  # a local --out that every node of a multi-node cluster mounts
    max_failures: int = 3  # worker failures a run recovers from (from its newest checkpoint)

    def check(self) -> None:
        """One line for the first bad value, before any work starts."""
        rules = [
            (min(self.epochs, self.batch_size, self.workers) >= 1,
             "--epochs, --batch-size and --workers must be at least 1"),
            (0.0 < self.mask_ratio < 1.0, f"--mask-ratio must be between 0 and 1, got {self.mask_ratio}"),
            (0.0 < self.lr < 1.0, f"--lr must be between 0 and 1, got {self.lr}"),
            (0.0 < self.val_fraction < 1.0, f"--val-fraction must be between 0 and 1, got {self.val_fraction}"),
            (self.gpus_per_worker >= 0, "--gpus-per-worker cannot be negative"),
            (self.weight_decay >= 0 and 0.0 <= self.warmup_fraction < 1.0,
             "weight_decay cannot be negative, and warmup_fraction must be in [0, 1)"),
            (self.augment in ("auto", "none"), f"--augment must be auto or none, got {self.augment}"),
            (self.format in (None, *FORMATS), f"--format must be one of {', '.join(FORMATS)}, got {self.format}"),
            (self.image_size is None or self.image_size >= 4,
             f"--image-size must be at least 4, got {self.image_size}"),
        ]
        for holds, problem in rules:
            if not holds:
                raise VitrayError(problem)
        if self.model is not None:
            from vitray.models.specs import source_kind

            source_kind(self.model)  # a preset, an existing folder, an s3:// prefix or a hub id
        from vitray.runtime import check_address

        check_address(self.ray_address)


def config_fields() -> list[str]:
    return [f.name for f in fields(PretrainConfig)]


@dataclass
class PretrainResult:
    out: str
    history: list[dict[str, Any]]  # one row per epoch: epoch, loss, val_loss, lr, images_per_s
    resumed_after_epochs: list[int] = field(default_factory=list)


@dataclass
class PretrainingData:
    """The model's input and the Ray Datasets of a pre-training run."""

    prep: Any  # vitray.models.Preprocessing: what OUT/model's preprocessor_config.json says
    mae: dict[str, Any]  # the ViTMAEConfig, as a dict
    train_ds: Any
    val_ds: Any
    n_train: int


# --------------------------------------------------------------------------- driver


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Pre-train end to end; outputs land under `config.out`.

    Re-running with the same `out` after a crash, Ctrl-C, SIGTERM or SIGHUP resumes from the
    newest complete checkpoint, with the options the run began with (vitray.runs); a run already
    done only writes its outputs again. A stop raises a VitrayError with the signal's exit code
    that says after which epoch. One run per output, by the output's lease.
    """
    from vitray.models.specs import portable

    config.check()
    # Ray's workers run in other folders than the driver: every local path they get is absolute.
    config = replace(config, data=storage.absolute(config.data), out=storage.absolute(config.out),
                     model=portable(config.model))
    storage.check_output(config.out, "--out")
    check_outside_data(config.out, config.data)
    with runs.held(config.out):
        return _pretrain(config)


def _pretrain(config: PretrainConfig) -> PretrainResult:
    from vitray import tracking
    from vitray.train.checkpoints import check_resume, prune_checkpoints
    from vitray.train.run import fit, interrupted

    run = storage.join(config.out, RUN_NAME)
    tracked, status = None, "FAILED"
    try:
        if config.fresh:
            runs.discard(run)
        done = check_resume(run)
        runs.check_options(config.out, run, asdict(config), done > 0)
        data = load_pretraining_data(config)  # refuses data of less than a batch per worker
        runs.record_options(run, asdict(config), done > 0)
        tracked = tracking.start(tracking.resolve(config.mlflow, config.mlflow_experiment),
                                 name=f"pretrain {storage.resolve(config.out).uri}", params=asdict(config),
                                 resume=done > 0)
        if done < config.epochs:
            with PretrainProgress(config.epochs) as progress:
                prune_checkpoints(fit(make_pretrainer(config, data, progress.queue, tracked)), run)
        result = finish(config, data)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise interrupted(run) from None
    finally:
        if status != "FINISHED":
            tracking.end(tracked, status)
    last = result.history[-1]
    tracking.log_metrics(tracked, {"loss": last["loss"], "val_loss": last["val_loss"]})
    tracking.log_outputs(tracked, [storage.join(config.out, name) for name in OUTPUT_FILES])
    tracking.log_folder(tracked, storage.join(config.out, "model"), folder="model")
    tracking.end(tracked)
    return result


def load_pretraining_data(config: PretrainConfig) -> PretrainingData:
    """Check the data, the model's size and the cluster, then build the Ray Datasets (as `vitray train` does)."""
    from vitray import cluster
    from vitray.data.sources import detect_format, inspect_source
    from vitray.models import input_size_for, preprocessing_for
    from vitray.runtime import RayOptions, init_ray
    from vitray.train.data import DATA_CPUS, image_dataset, peek_shape

    storage.require(config.data, "pre-training data")
    fmt = config.format or detect_format(config.data)
    # Labels play no part: an image folder is read as the images it holds, whatever its sub-folders.
    source = inspect_source(config.data, "images" if fmt == "imagefolder" else fmt)
    channels, native = peek_shape(source)
    size = config.image_size or (None if config.model else input_size_for(native))
    prep = preprocessing_for(config.model, size, channels)
    mae = mae_config(config, prep)
    order = np.random.default_rng(config.seed).permutation(len(source.ids))
    n_val = max(1, int(round(config.val_fraction * len(order))))
    val_ids = [source.ids[i] for i in sorted(order[:n_val])]
    train_ids = [source.ids[i] for i in sorted(order[n_val:])]
    if len(train_ids) < config.batch_size * config.workers:
        raise VitrayError(f"{config.data}: {len(train_ids)} images to pre-train on, fewer than one batch per worker "
                          f"({config.workers} x {config.batch_size}); lower --batch-size or add images")

    init_ray(RayOptions(address=config.ray_address))
    cluster.check_shared_output(config.out, config.shared_fs, "--out")
    cluster.check_fits(config.workers, 1.0, config.gpus_per_worker, "--workers", extra_cpus=DATA_CPUS,
                       extra_for="Ray Data")
    log.info("pre-training a %s-layer ViT (%d px, %d px patches) on %s images, %s held out, from %s",
             mae["num_hidden_layers"], prep.size, mae["patch_size"], f"{len(train_ids):,}", f"{len(val_ids):,}",
             config.data)
    return PretrainingData(prep, mae, image_dataset(source, train_ids, prep.size, prep.channels,
                                                    shuffle_seed=config.seed),
                           image_dataset(source, val_ids, prep.size, prep.channels), len(train_ids))


def mae_config(config: PretrainConfig, prep: Any) -> dict[str, Any]:
    """The ViTMAEConfig (as a dict): the encoder `vitray train` builds for the preset, and a light decoder.

    The encoder is the very ViT that train would build from scratch (`vitray.models.build_model`,
    on the meta device: no weights), or, going on from a ViT, that ViT's. The decoder is MAE's
    light one scaled to it: half the encoder's width in heads of the encoder's size, a third of
    its depth (at least one layer), the encoder's MLP ratio. He et al. (2022, Table 1) found
    fine-tuning insensitive to decoder depth (1 to 8 blocks) and width (256 to 512 for ViT-L),
    so a small one costs little.
    """
    import torch
    from transformers import ViTConfig, ViTMAEConfig

    from vitray.models import build_model
    from vitray.models.building import pretrained_config
    from vitray.models.specs import source_kind

    if source_kind(config.model) == "preset":
        with torch.device("meta"):
            vit = build_model(config.model, ["image"], prep.size, channels=prep.channels)[0].config
    else:
        vit = ViTConfig.from_dict(pretrained_config(config.model))
    head = vit.hidden_size // vit.num_attention_heads
    heads = max(1, vit.hidden_size // 2 // head)
    grid = vit.image_size // vit.patch_size
    if int(grid * grid * (1 - config.mask_ratio)) < 1:
        raise VitrayError(f"--mask-ratio {config.mask_ratio} leaves none of the {grid * grid} patches visible")
    decoder = dict(decoder_hidden_size=heads * head, decoder_num_attention_heads=heads,
                   decoder_num_hidden_layers=max(1, vit.num_hidden_layers // 3),
                   decoder_intermediate_size=heads * head * vit.intermediate_size // vit.hidden_size)
    return ViTMAEConfig(**{key: getattr(vit, key) for key in ENCODER_KEYS}, **decoder, mask_ratio=config.mask_ratio,
                        norm_pix_loss=config.norm_pix_loss).to_dict()


def loop_config(config: PretrainConfig, data: PretrainingData) -> dict[str, Any]:
    """What `pretrain_loop_per_worker` needs, all plain data (and the pieces of train's loop it reuses)."""
    from vitray.data.preprocess import AugmentConfig
    from vitray.models.specs import source_kind

    return {
        "run": asdict(config),
        "mae": data.mae,
        "start_from": None if source_kind(config.model) == "preset" else config.model,
        "mean": list(data.prep.mean),
        "std": list(data.prep.std),
        "lr": config.lr,
        "n_train": data.n_train,
        "batch_size": config.batch_size,  # per worker
        # Train's windows of rows: no class balance (no classes), and light augmentation: shifts and
        # lighting keep every image a picture of the line; MAE's own crops and flips are left out.
        "balance_rates": None,
        "augment": AugmentConfig(rotate=0.0, scale=0.0) if config.augment == "auto" else None,
        "history_uri": storage.join(config.out, "history.csv"),
        "run_uri": storage.join(config.out, RUN_NAME),
    }


def make_pretrainer(config: PretrainConfig, data: PretrainingData, progress: Any = None, tracked: Any = None) -> Any:
    """The TorchTrainer of a run, storing under `config.out` (the same out resumes)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from vitray.train.data import data_config
    from vitray.train.pretrain_loop import pretrain_loop_per_worker

    out = storage.resolve(config.out)
    gpu = {"GPU": config.gpus_per_worker} if config.gpus_per_worker > 0 else {}
    scaling = ray.train.ScalingConfig(num_workers=config.workers, use_gpu=bool(gpu),
                                      resources_per_worker={"CPU": 1, **gpu})
    # The newest two epochs are kept: MAE's encoder is the last one's, not the lowest loss's.
    keep = ray.train.RunConfig(name=RUN_NAME, storage_path=out.path, storage_filesystem=out.fs,
                               failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                               checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    return TorchTrainer(pretrain_loop_per_worker, scaling_config=scaling, run_config=keep,
                        train_loop_config={**loop_config(config, data), "progress": progress, "tracking": tracked},
                        datasets={"train": data.train_ds, "val": data.val_ds}, dataset_config=data_config())


class PretrainProgress(TrainingProgress):
    """Train's bars per epoch; the line per finished epoch says the reconstruction losses."""

    def _show(self, message: dict[str, Any]) -> None:
        if message.get("kind") != "epoch":
            super()._show(message)
            return
        self._close_bar()
        row = message["row"]
        log.info("epoch %d/%d: loss %.4f, val_loss %.4f (%s img/s)", row["epoch"], message["epochs"], row["loss"],
                 row["val_loss"], f"{row['images_per_s']:,.0f}")


def finish(config: PretrainConfig, data: PretrainingData) -> PretrainResult:
    """From the newest complete checkpoint: OUT/model, history.csv, curves.png, reconstructions.png, args.json."""
    from vitray.figures import plot_pretrain_curves, plot_reconstructions
    from vitray.models.specs import PRETRAINED_HERE
    from vitray.train.checkpoints import STATE_FILE, complete_checkpoints, load_state, write_history
    from vitray.train.pretrain_loop import HISTORY_COLUMNS, build_mae

    saved = complete_checkpoints(storage.join(config.out, RUN_NAME))
    if not saved:
        raise VitrayError("pre-training finished without a checkpoint", exit_code=1)
    state_uri = storage.join(saved[0][1], STATE_FILE)
    state = load_state(io.BytesIO(storage.read_bytes(state_uri)), state_uri)
    mae = build_mae(data.mae)
    mae.load_state_dict(state["model"])
    encoder = encoder_of(mae.eval())
    setattr(encoder.config, PRETRAINED_HERE, {"method": "mae", "epochs": config.epochs, "mask_ratio": config.mask_ratio,
                                              "lr": config.lr, "images": data.n_train})
    save_encoder(encoder, data.prep, storage.join(config.out, "model"))
    history = state["history"]
    write_history(storage.join(config.out, "history.csv"), history, HISTORY_COLUMNS)
    plot_pretrain_curves(history, storage.join(config.out, "curves.png"))
    shown = data.val_ds.take(SHOWN)
    plot_reconstructions(mae, np.stack([row["image"] for row in shown]), data.prep,
                         storage.join(config.out, "reconstructions.png"), config.seed)
    storage.write_json(storage.join(config.out, "args.json"), {**asdict(config), "mae": data.mae})
    return PretrainResult(config.out, history, state.get("resumes", []))


# --------------------------------------------------------------------------- the encoder as a ViT


def encoder_of(mae: Any) -> Any:
    """The MAE's encoder as a transformers `ViTModel`: embeddings (the fixed sine-cosine positions too),
    layers and final norm, tensor for tensor; `vitray train --model` puts a new head on it."""
    from transformers import ViTConfig, ViTModel

    encoder = ViTModel(ViTConfig(**{key: getattr(mae.config, key) for key in ENCODER_KEYS}), add_pooling_layer=False)
    try:
        encoder.load_state_dict(mae.vit.state_dict(), strict=True)
    except RuntimeError as exc:  # a transformers whose MAE and ViT no longer match, name for name
        raise VitrayError(f"the MAE encoder does not map onto a transformers ViT: {str(exc).splitlines()[0]}",
                          exit_code=1) from exc
    return encoder.eval()


def save_encoder(encoder: Any, prep: Any, uri: str) -> None:
    """`save_pretrained` layout plus train's preprocessor_config.json, to a folder or s3:// prefix.

    config.json goes last, so a reader never takes a half-written folder for a model.
    """
    import os
    import tempfile

    from vitray.models import CONFIG_FILE

    with tempfile.TemporaryDirectory(prefix="vitray-encoder-") as local:
        encoder.save_pretrained(local)
        prep.save(local)
        for name in sorted(os.listdir(local), key=lambda n: (n == CONFIG_FILE, n)):
            with open(os.path.join(local, name), "rb") as f:
                storage.write_bytes(storage.join(uri, name), f.read())
