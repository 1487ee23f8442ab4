"""Training: the driver (`run`: `train`, resume, export), what each Ray Train worker runs (`loop`),
the data it reads (`data`), its options (`config`, `TrainConfig`), the checkpoints of a run
(`checkpoints`), and masked-autoencoder pre-training (`pretrain`, `pretrain_loop`).

The names below load their module on first use (PEP 562), so that checking options does not
import PyTorch and Ray.
"""
from vitray.lazy import lazy_names

_HOMES = {
    "config": ("TrainConfig",),
    "run": ("TrainResult", "train"),
}
__all__, __getattr__ = lazy_names(__name__, globals(), _HOMES)
