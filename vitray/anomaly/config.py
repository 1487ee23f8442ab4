"""The options of an anomaly fit, with their one default each; plain Python, so that the CLI checks them fast."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vitray.errors import VitrayError
from vitray.options import fraction, option, positive_int
from vitray.runtime import IN_PROCESS_MAX


def parse_layers(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """`--layers 2,3` → (2, 3); None stays None (the default for the encoder)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return tuple(int(v) for v in text)
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise VitrayError(f"--layers {text!r}: give encoder layers as numbers, e.g. 2,3") from None


@dataclass
class AnomalyConfig:
    """`vitray anomaly --data GOOD --model ENCODER --out BANK` and the recipe behind it."""

    data: str = option(help="good images: a folder or prefix (recursive), or a labelled data set whose passed "
                            "images are taken (local, file:// or s3://)", metavar="URI", required=True,
                       doc="good images: a folder or prefix (recursive), or a labelled data set whose `passed` "
                           "images are taken (one without a `passed` class is refused)")
    model: str = option(help="the encoder: a `vitray pretrain` encoder, a trained vitray classifier (its backbone) "
                             "or a transformers ViT folder", metavar="URI", required=True,
                        doc="the encoder: a `vitray pretrain` encoder, a trained vitray classifier (its backbone; a "
                            "bank of the scoring model's own backbone scores on its forward pass) or a transformers "
                            "ViT folder; anything else is refused")
    out: str = option(help="output folder or s3:// prefix for the bank", metavar="URI", required=True,
                      doc="the bank's folder or `s3://` prefix; one fit per output (a lease)")
    format: str | None = option(None, "data format", choices=("imagefolder", "parquet", "csv", "images"),
                                default_text="detected")
    layers: tuple[int, ...] | None = option(
        None, "encoder layers whose patch tokens are used, e.g. 0,3 (0: the patch embeddings)",
        parse=parse_layers, metavar="L,L", default_text="0 and the layer a quarter up",
        doc="encoder layers whose patch tokens make the features; 0 is the patch embeddings ([choosing the "
            "layers](anomaly.md#choosing-the-layers))")
    neighbourhood: int | None = option(
        None, "patches a side averaged around each patch, odd", parse=positive_int, metavar="K",
        default_text="3 on a grid of 16 patches a side or more, else 1",
        doc="each patch's features are averaged over K x K patches around it (odd)")
    coreset: float = option(0.1, "share of each chunk's patches kept", metavar="F",
                            doc="share of each chunk's patch features kept by greedy k-centre selection")
    max_bank: int = option(16384, "rows the bank keeps at most, whatever the number of images", parse=positive_int,
                           metavar="N", doc="rows the bank keeps at most: its memory does not grow with the images")
    chunk_patches: int = option(16384, "patches per feature call, each reduced on its worker", parse=positive_int,
                                metavar="N", doc="patches per feature call (whole images); each call reduces its own "
                                                 "to a coreset on its worker")
    holdout: float = option(0.1, "share of the good images held out to set the threshold", parse=fraction,
                            metavar="F", doc="share of the good images held out (seeded) to set the threshold")
    false_reject_rate: float = option(0.01, "share of held-out good images above the threshold", parse=fraction,
                                      metavar="F", doc="share of the held-out good images above the threshold")
    workers: int = option(1, "feature actors on Ray", parse=positive_int, metavar="N")
    gpus_per_worker: float = option(0.0, "GPUs per feature actor", metavar="N")
    seed: int = option(0, "the hold-out split and the coreset draws", metavar="S")
    in_process_max: int = option(IN_PROCESS_MAX, "with no Ray cluster given, at most N good images are fitted in "
                                                 "this process, without starting Ray; 0: always Ray", metavar="N")
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

