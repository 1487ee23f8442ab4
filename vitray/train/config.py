"""Every option of a training run, with its one default, checked before any work starts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from vitray import storage
from vitray.errors import VitrayError
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

    data: str
    out: str
    val: str | None = None
    val_fraction: float = 0.1
    format: str | None = None
    model: str | None = None  # preset, folder, s3:// prefix or hub id; None: a preset sized for the data
    image_size: int | None = None
    epochs: int = 30
    lr: float | None = None  # None: resolved_lr()'s rule
    batch_size: int = 32  # per worker; the recipe exploration's choice (docs/benchmarks.md#inspection-images)
    workers: int = 1
    gpus_per_worker: float = 0.0
    finetune: str = "full"
    class_weights: str = "auto"  # auto: class-balanced sampling; loss: inverse-frequency loss weights; none
    augment: str = "auto"  # auto: label-aware flips where safe, shifts, lighting; none
    export: str = "last"  # the epoch exported: last, or best (by validation macro-F1)
    box_attention: float | None = None  # weight of the box-attention term; None: BOX_ATTENTION for data with boxes
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # each encoder layer's rate times this per layer below the head (1: one rate)
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    max_failures: int = 3
    seed: int = 0
    ray_address: str | None = None
    shared_fs: bool = False  # a local --out that every node of a multi-node cluster mounts
    # `vitray train` with no cluster named trains a data set of at most this many images in its own
    # process (Ray Train's local mode), without starting Ray; 0: always on Ray. Tune's trials run on Ray.
    in_process_max: int = IN_PROCESS_MAX
    mlflow: str | None = None  # MLflow tracking URI (else $MLFLOW_TRACKING_URI; neither: untracked)
    mlflow_experiment: str | None = None  # default "vitray"
    fresh: bool = False  # discard the checkpoints under `out` and start from the first epoch

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
