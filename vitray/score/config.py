"""The options of a scoring run: each field once, with its default, its flag and its docs (`vitray.options`)."""
from __future__ import annotations

from dataclasses import dataclass

from vitray.errors import VitrayError
from vitray.inference import ATTENTION_MODES
from vitray.lease import STALE_S
from vitray.options import fraction, option, positive_int
from vitray.rollout import check_map_options, discard_ratio_option, head_fusion_option, method_option
from vitray.runtime import IN_PROCESS_MAX

SCORE_FORMATS = ("images", "imagefolder", "parquet", "csv")
ENGINES = ("torch", "onnx")


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring run; every default lives here (the CLI and docs/cli.md read them) and goes into the manifest."""

    model: str = option(
        help="trained model folder or s3:// prefix", metavar="URI", required=True,
        doc="a trained model folder or `s3://` prefix (an `s3://` model is cached locally, see `VITRAY_MODEL_CACHE`)")
    input: str = option(
        help="folder or s3:// prefix of images (recursive), or an image folder / parquet / digit CSV data set",
        metavar="URI", required=True,
        doc="a folder or `s3://` prefix of images (recursive), one image file, or an image folder / Parquet / digit "
            "CSV data set")
    output: str = option(help="output folder or s3:// prefix", metavar="URI", required=True,
                         doc="output folder or `s3://` prefix; must not lie inside `--input`")
    format: str | None = option(None, "input format", choices=SCORE_FORMATS, default_text="detected",
                                doc="`images`, `imagefolder`, `parquet` or `csv`")
    attention: str = option(
        "defects", "which images get an attention map and overlay (defects: those not predicted 'passed')",
        choices=ATTENTION_MODES,
        doc="which images get an attention map and an overlay: `all`, `defects` (those not predicted `passed`), "
            "`none`")
    method: str = method_option()
    head_fusion: str = head_fusion_option()
    discard_ratio: float = discard_ratio_option()
    batch_size: int = option(
        256, "images per model call", parse=positive_int, metavar="N",
        doc="images per call to an inference actor (each call costs Ray a few ms besides the model: "
            "[benchmarks](benchmarks.md)); on a CPU the model takes them 64 at a time (32 when making maps), on a "
            "GPU all at once")
    workers: int = option(
        1, "inference actors, each loads the model once", parse=positive_int, metavar="N",
        doc="inference actors; each loads the model once and holds a CPU (and its GPUs), and decoding needs one "
            "more CPU: more than the cluster holds is refused before any work")
    gpus_per_worker: float = option(
        0.0, "GPUs per inference actor (0: CPU)", metavar="N",
        doc="GPUs per inference actor (bf16 on GPU). With an embedded Ray, more than this machine has is refused")
    piece_rows: int = option(
        512, "rows committed together; a crash redoes at most the pieces in flight", parse=positive_int, metavar="N",
        doc="rows committed together; a kill redoes at most the pieces in flight. After its pieces commit, the run "
            "rewrites them into files of about 50,000 rows, one per 50,000 images (see Outputs)")
    in_process_max: int = option(
        IN_PROCESS_MAX, "with no Ray cluster given, a run of at most N images is done in this process, without "
                        "starting Ray (faster for small runs); 0: always Ray", metavar="N",
        doc="with no Ray cluster given (no `--ray-address`, no `RAY_ADDRESS`), a run with at most N images to "
            "score runs its stages in this process, without starting Ray: the same pieces, commits, lease and "
            "outputs, in seconds rather than Ray's start-up (the manifest says `\"in_process\": true`). 0: always Ray")
    submission: str | None = option(None, "also write a Kaggle ImageId,Label CSV here (digit CSV input)",
                                    metavar="FILE",
                                    doc="with digit-recognizer CSV input, also write Kaggle's `ImageId,Label` CSV")
    max_error_rate: float = option(
        1.0, "fail (exit 1) when a larger share of the images cannot be read", parse=fraction, metavar="F",
        default_text="1.0: never", doc="fail the run (exit 1) when a larger share of the images cannot be read")
    engine: str = option(
        "torch", "torch, or onnx: onnxruntime over the model's ONNX export (made once per run, or --model "
                 "FILE.onnx from `vitray export`)", choices=ENGINES,
        doc="`onnx`: the actors run onnxruntime over the model's ONNX export (made once per run on the driver, or "
            "`--model FILE.onnx` from `vitray export`); default maps only (rollout, head fusion mean, no discard). "
            "See [export](export.md)")
    lease_timeout: float = option(
        STALE_S, "one run per --output: a run whose lease was not renewed for this long is gone, and its lease is "
                 "taken over", metavar="SECONDS", default_text=f"{STALE_S:.0f}",
        doc="one run per output: a run whose lease was not renewed for this long is gone, and its lease is taken "
            "over (see [reliability](reliability.md#one-score-run-per-output))")
    fail_on_drift: bool = option(
        False, "with a calibrated model (vitray calibrate): exit 3 when tonight's images drifted from the "
               "calibration's (without it, one line says so)",
        doc="with a calibrated model: exit 3 when the night's images drifted from the calibration's "
            "([decisions](decisions.md#drift)); without it, one warning line. The manifest's `decisions` holds the "
            "counts per decision, the drift test (`p_value`, `drifted`, the feature that moved most, `psi`) and the "
            "review table's place")
    anomaly: str | None = option(
        None, "an anomaly bank (vitray anomaly): each image's anomaly score and map, overlays under OUT/anomaly/ as "
              "--attention says (defects: the anomalous images); with a calibrated model an anomalous image is "
              "never decided OK", metavar="BANK",
        doc="an anomaly bank of `vitray anomaly`: every image also gets its `anomaly_score`, `anomalous` and "
            "`anomaly_map`, and an overlay under `anomaly/` as `--attention` says (`defects`: the anomalous images; "
            "`all`; `none`); with a calibrated model an anomalous image is never decided OK (REVIEW, reason "
            "`anomaly`). The bank's encoder must take the model's input size. See "
            "[anomaly](anomaly.md#scoring-with-the-bank)")
    # Every command's Ray options (`vitray.cli.options.ray_options`).
    ray_address: str | None = None
    shared_fs: bool = False  # a local --output that every Ray node mounts (else s3:// on a multi-node cluster)
    verbose: bool = False

    def check(self) -> None:
        """One-line errors for option values, before anything is read."""
        if self.attention not in ATTENTION_MODES:
            raise VitrayError(f"--attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        check_map_options(self.method, self.head_fusion, self.discard_ratio)
        if self.format is not None and self.format not in SCORE_FORMATS:
            raise VitrayError(f"--format must be one of {', '.join(SCORE_FORMATS)}, got {self.format!r}")
        for name in ("batch_size", "workers", "piece_rows"):
            if int(getattr(self, name)) < 1:
                raise VitrayError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_worker < 0:
            raise VitrayError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.engine not in ENGINES:
            raise VitrayError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "onnx" and self.attention != "none" and \
                (self.method, self.head_fusion, self.discard_ratio) != ("rollout", "mean", 0.0):
            raise VitrayError("--engine onnx draws the default maps only (rollout, --head-fusion mean, no discard); "
                              "use --engine torch for others")
        if self.model.endswith(".onnx") and self.engine != "onnx":
            raise VitrayError(f"--model {self.model} is an ONNX export: score it with --engine onnx")
        if self.in_process_max < 0:
            raise VitrayError(f"--in-process-max must be >= 0, got {self.in_process_max}")
        if self.lease_timeout <= 0:
            raise VitrayError(f"--lease-timeout must be positive, got {self.lease_timeout}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise VitrayError(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate}")

