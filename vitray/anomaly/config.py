"""The options of an anomaly fit, with their one default each; plain Python, so that the CLI checks them fast."""
from __future__ import annotations

from dataclasses import dataclass, fields

from vitray.errors import VitrayError
from vitray.runtime import IN_PROCESS_MAX


@dataclass
class AnomalyConfig:
    """`vitray anomaly --data GOOD --model ENCODER --out BANK` and the recipe behind it."""

    data: str
    model: str
    out: str
    format: str | None = None
    layers: tuple[int, ...] | None = None  # encoder layers; None: the patch embeddings and a quarter up
    neighbourhood: int | None = None  # patches a side averaged around each patch; None: by the patch grid
    coreset: float = 0.1  # share of each chunk's patch features kept (greedy k-centre)
    max_bank: int = 16384  # rows the bank keeps at most, whatever the number of images
    chunk_patches: int = 16384  # patches per feature call (whole images); each call reduces its own
    holdout: float = 0.1  # share of the good images held out to set the threshold
    false_reject_rate: float = 0.01  # share of held-out good images above the threshold
    workers: int = 1  # feature actors on Ray
    gpus_per_worker: float = 0.0
    seed: int = 0
    in_process_max: int = IN_PROCESS_MAX
    ray_address: str | None = None

    def check(self) -> None:
        """Every value in range, before any work (one line otherwise)."""
        if not 0 < self.coreset <= 1:
            raise VitrayError(f"--coreset {self.coreset}: a share of the patches, in (0, 1]")
        if self.max_bank < 1 or self.chunk_patches < 1 or self.workers < 1:
            raise VitrayError("--max-bank, --chunk-patches and --workers must be at least 1")
        if not 0 < self.holdout < 1:
            raise VitrayError(f"--holdout {self.holdout}: a share of the good images, in (0, 1)")
        if not 0 <= self.false_reject_rate < 1:
            raise VitrayError(f"--false-reject-rate {self.false_reject_rate}: a share, in [0, 1)")
        if self.neighbourhood is not None and (self.neighbourhood < 1 or self.neighbourhood % 2 == 0):
            raise VitrayError(f"--neighbourhood {self.neighbourhood}: an odd number of patches, at least 1")
        if self.gpus_per_worker < 0 or self.in_process_max < 0:
            raise VitrayError("--gpus-per-worker and --in-process-max must be at least 0")


def config_fields() -> list[str]:
    return [f.name for f in fields(AnomalyConfig)]
