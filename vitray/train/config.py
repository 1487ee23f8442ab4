"""Every option of a training run, with its one default, checked before any work starts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from vitray import storage
from vitray.errors import VitrayError
from vitray.options import option
from vitray.runs import fresh_option, mlflow_experiment_option, mlflow_option
from vitray.runtime import IN_PROCESS_MAX

CLASS_WEIGHTS = ("auto", "loss", "none")
EXPORTS = ("last", "best")
# The weight of the box-attention term (vitray.localisation.box_attention_loss) when the training
# data has boxes and --box-attention is not given: docs/attention-maps.md has the measurements.
BOX_ATTENTION = 1.0
# The same for an encoder `vitray pretrain` made: a lighter term moves its maps onto the part and
# raised its fine-tuned macro-F1, where the full weight cost some (docs/pretrain.md).
BOX_ATTENTION_PRETRAINED_HERE = 0.1


@dataclass
class TrainConfig:
    """Every option of a training run, with its one default."""

    data: str = option(help="training data: image folder, parquet, digit CSV (local, file:// or s3://)",
                       metavar="URI", required=True,
                       doc="labelled training data (see [Data formats](#data-formats))")
    out: str = option(help="output folder or s3:// prefix", metavar="URI", required=True,
                      doc="output folder or `s3://` prefix; the same `--out` resumes an interrupted run, with the "
                          "options it began with ([what a resume may change](reliability.md#resuming-a-training)); "
                          "one run per output at a time")
    val: str | None = option(None, "validation data (default: a stratified split of --data)", metavar="URI",
                             doc="validation data; without it, a stratified split of `--data`")
    val_fraction: float = option(0.1, "share of --data held out", metavar="F",
                                 doc="share of `--data` held out for validation")
    format: str | None = option(None, "data format", choices=("imagefolder", "parquet", "csv"),
                                default_text="detected")
    model: str | None = option(
        None, "preset (vit-tiny, vit-small, ...), folder, s3:// prefix or hub id", metavar="M",
        default_text="a preset sized for the data",
        doc="a preset (`vit-tiny`, `vit-small`, `vit-base`), a folder or `s3://` prefix in `save_pretrained` "
            "layout, or a Hugging Face hub id such as `google/vit-base-patch16-224` (a new head for the data's "
            "classes)")
    image_size: int | None = option(None, "input side in pixels", parse=int, metavar="N",
                                    default_text="the data's, or the model's")
    epochs: int = option(30, "passes over the training data (the schedule's length)", metavar="N")
    lr: float | None = option(
        None, "peak learning rate", parse=float, metavar="F",
        default_text="1e-3; 1e-4 for full fine-tuning of a pretrained model, unless vitray pretrain pre-trained it",
        doc="peak learning rate ([pretrain.md](pretrain.md) on the rate for a vitray encoder)")
    # The recipe exploration's choice (docs/benchmarks.md#inspection-images).
    batch_size: int = option(32, "per worker", metavar="N")
    workers: int = option(1, "Ray Train workers", metavar="N",
                          doc="Ray Train data-parallel workers (1 CPU each)")
    gpus_per_worker: float = option(
        0.0, "GPUs per worker; > 0 trains on GPU with bf16", metavar="N",
        doc="GPUs per worker; above 0 trains on GPU with bf16 autocast. A fraction packs workers onto one GPU")
    finetune: str = option(
        "full", "full | head | last:K | lora:R", metavar="POLICY",
        doc="`full`, `head` (classifier only), `last:K` (last K encoder layers, final norm and head), `lora:R` "
            "(LoRA rank R on the query and value projections, plus the head; merged into the exported model)")
    class_weights: str = option(
        "auto", "rare classes: auto draws every class equally often per epoch (class-balanced sampling); loss "
                "weights the loss by inverse class frequency", choices=CLASS_WEIGHTS,
        doc="`auto`: class-balanced sampling (every class drawn equally often per epoch, in each worker's windows "
            "of 8 batches, before augmentation, so each draw of a rare image is augmented its own way; an epoch "
            "keeps its length); `loss`: loss weighted by inverse class frequency; `none`")
    augment: str = option("auto", "label-aware flips, shifts, lighting", choices=("auto", "none"),
                          doc="`auto`: label-aware flips, shifts and lighting (below); `none`")
    export: str = option(
        "last", "the epoch exported as the model: the last, or the best by validation macro-F1", choices=EXPORTS,
        doc="the epoch exported as `model/`: `last`, or `best` (by validation macro-F1); `metrics.json` holds that "
            "epoch's validation figures")
    box_attention: float | None = option(
        None, "weight of a loss term that keeps the attention map on each image's box, for data with boxes "
              "(FRAMEimages parquet); 0 turns it off", parse=float, metavar="W",
        default_text="on data with boxes: 1 for a from-scratch preset, 0.1 for an encoder of `vitray pretrain`; "
                     "else 0",
        doc="for data with boxes (a FRAMEimages parquet's `response`): add W × max(0, log ½ − log e) to the loss, "
            "e being the share of the image's attention rollout inside its box, so that the default map keeps at "
            "least half its mass on the part ([attention maps](attention-maps.md#training-the-maps-onto-the-box)); "
            "0 turns it off; a vitray encoder gets a tenth (the full weight cost it macro-F1: "
            "[pretrain](pretrain.md#a-light-box-attention-term-on-the-encoder-the-default)); for a model "
            "pre-trained elsewhere it is opt-in; a weight for data without boxes or with `--finetune head` is "
            "refused")
    # Recipe fields without a flag: a --config may set them (`config_extra`).
    weight_decay: float = 0.05
    layer_decay: float = option(
        1.0, "layer-wise learning-rate decay: each encoder layer learns at F times the rate of the one above it, "
             "the head at --lr (1: one rate)", metavar="F",
        doc="layer-wise learning-rate decay: encoder layer k of L learns at `--lr` × F^(L+1−k), the embeddings at "
            "× F^(L+1), the final norm and the head at `--lr` (BEiT's and MAE's fine-tuning recipe); 1: one rate")
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    max_failures: int = 3
    seed: int = option(
        0, "seeds the split, the order, the initialisation and every draw", metavar="S",
        doc="seeds the validation split, the order of the training rows, the model's initialisation and every "
            "draw of the class balance and augmentation (per window of rows, from the seed, the epoch, the "
            "worker's rank and the rows): the same command on the same data and number of workers trains the "
            "same model, at no cost in throughput")
    ray_address: str | None = None
    shared_fs: bool = False  # a local --out that every node of a multi-node cluster mounts
    mlflow: str | None = mlflow_option("track the run in MLflow: params, per-epoch metrics (rank 0), final metrics, "
                                       "outputs and model ([tracking](tracking.md)); neither set: not tracked")
    mlflow_experiment: str | None = mlflow_experiment_option()
    # `vitray train` only (tune's trials run on Ray and resume by the search):
    in_process_max: int = option(
        IN_PROCESS_MAX, "with no Ray cluster given, a data set of at most N images trains in this process (Ray "
                        "Train's local mode), without starting Ray; 0: always on Ray", metavar="N",
        doc="with no Ray cluster given (no `--ray-address`, no `RAY_ADDRESS`), a data set of at most N images "
            "(training and validation) trains in this process, without starting Ray (below); 0: always on Ray")
    fresh: bool = fresh_option()

    def located(self) -> "TrainConfig":
        """The same config with local paths absolute: Ray's workers run in other folders than the driver."""
        from vitray.models.specs import portable

        return dataclasses.replace(self, data=storage.absolute(self.data), out=storage.absolute(self.out),
                                   val=storage.absolute(self.val), model=portable(self.model))

    def check(self) -> None:
        """Refuse bad values before any work starts."""
        from vitray.models.specs import parse_finetune

        if self.epochs < 1 or self.batch_size < 1 or self.workers < 1:
            raise VitrayError("--epochs, --batch-size and --workers must be at least 1")
        if not 0.0 < self.val_fraction < 1.0 and self.val is None:
            raise VitrayError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.in_process_max < 0:
            raise VitrayError(f"--in-process-max must be at least 0, got {self.in_process_max}")
        if self.gpus_per_worker < 0:
            raise VitrayError("--gpus-per-worker cannot be negative")
        if self.lr is not None and not 0 < self.lr < 1:
            raise VitrayError(f"--lr must be between 0 and 1, got {self.lr}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise VitrayError(f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights}")
        if self.export not in EXPORTS:
            raise VitrayError(f"--export must be one of {', '.join(EXPORTS)}, got {self.export}")
        if self.augment not in ("auto", "none"):
            raise VitrayError(f"--augment must be auto or none, got {self.augment}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise VitrayError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.box_attention is not None and not 0.0 <= self.box_attention <= 100.0:
            raise VitrayError(f"--box-attention must be between 0 and 100, got {self.box_attention}")
        if self.weight_decay < 0 or self.grad_clip <= 0 or self.max_failures < 0:
            raise VitrayError("weight_decay and max_failures cannot be negative, grad_clip must be above 0 "
                              f"(got {self.weight_decay}, {self.max_failures}, {self.grad_clip})")
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise VitrayError("warmup_fraction and label_smoothing must be in [0, 1), got "
                              f"{self.warmup_fraction} and {self.label_smoothing}")
        if self.image_size is not None and self.image_size < 4:
            raise VitrayError(f"--image-size must be at least 4, got {self.image_size}")
        parse_finetune(self.finetune)
        from vitray.runtime import check_address

        check_address(self.ray_address)

    def resolved_lr(self) -> float:
        """--lr, else the rule: 1e-4 for full fine-tuning of a model pre-trained elsewhere (the rate for
        a hub ViT such as ViT-B/16), 1e-3 for the rest: from scratch, head, last:K and LoRA, and a
        model that `vitray pretrain` pre-trained (its encoders fine-tune best at the rate they were
        pre-trained at: docs/pretrain.md, on two renderers)."""
        if self.lr is not None:
            return self.lr
        from vitray.models.specs import PRESETS, pretrained_here

        elsewhere = self.model is not None and self.model not in PRESETS and not pretrained_here(self.model)
        return 1e-4 if elsewhere and self.finetune == "full" else 1e-3


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
