"""A scoring run: its options, the Ray Data pipeline and the run that commits every image once.

`score` streams images (any folder or s3:// prefix of images, or a data set) through
read → decode/resize (tasks) → `Predictor` actors → a writer stage that commits each
piece of rows to OUT (`vitray.score.outputs`); the driver sees one summary row per piece,
so memory stays flat. One run per OUT at a time: a run takes OUT's lease (`vitray.lease`)
before anything else, then recovers what killed runs left, skips the committed ids and
scores the rest. Images that fail to decode are not committed: each run tries them again
and adds an errors/ row, since a file may have been half-copied when it was listed; so
do files whose names are not UTF-8 (`bad-name`), which cannot be ids. A failed or
interrupted run marks its manifest and keeps every committed piece.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow.fs as pafs

from vitray import storage
from vitray.decisions.nightly import NightDecisions
from vitray.errors import VitrayError
from vitray.interrupts import STOP_EXIT_CODES, Interrupts, stop_error
from vitray.lease import Lease
from vitray.runtime import runs_in_process
from vitray.score import anomalies
from vitray.score.compaction import compact
from vitray.score.config import ScoreConfig
from vitray.score.outputs import PiecePlan, read_predictions, record_bad_names, recover, write_piece
from vitray.score.planning import plan_run

log = logging.getLogger(__name__)

@dataclass
class _Totals:
    scored: int = 0
    errors: int = 0
    pieces: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    in_process: bool = False  # scored in the driver's process, without Ray
    decide: bool = False  # a calibrated model: the model stage decides each image
    decisions: NightDecisions = field(default_factory=NightDecisions)
    anomalous: int = 0  # images above the anomaly bank's threshold (--anomaly)

    def add(self, summary: dict[str, Any]) -> None:
        self.decisions.add(summary.get("decisions") or "")
        self.anomalous += int(summary.get("anomalous", 0))
        self.scored += int(summary["scored"])
        self.errors += int(summary["errors"])
        self.pieces += 1
        for target, text in ((self.labels, summary["labels"]), (self.error_kinds, summary["error_kinds"])):
            for key, value in json.loads(text).items():
                target[key] = target.get(key, 0) + int(value)


def new_run_id() -> str:
    """Sortable by start time (UTC), unique across machines."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _check_model(config: ScoreConfig) -> tuple[list[str], Any, tuple[int, int], str | bytes]:
    """Labels, preprocessing, patch grid and what the actors load; one-line errors otherwise.

    The actors load a trained model from its URI (`--engine torch`), or the bytes of its ONNX
    export: made here, once per run, or read from an .onnx `--model`.
    """
    if config.engine == "onnx":
        from vitray.export import onnx_model

        return onnx_model(config.model, maps=config.attention != "none")
    from vitray.models import describe_trained

    labels, prep, patch = describe_trained(config.model)
    return labels, prep, (prep.size // patch, prep.size // patch), config.model


def _check_gpus(config: ScoreConfig) -> None:
    """An embedded Ray has only this machine's GPUs: asking for absent ones would wait forever."""
    if config.gpus_per_worker <= 0 or config.ray_address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster may have (or autoscale to) GPU nodes the driver cannot see
    if _local_gpus() < config.gpus_per_worker:
        raise VitrayError(f"--gpus-per-worker {config.gpus_per_worker}: this machine has "
                          f"{_local_gpus()} GPUs (join a GPU cluster with --ray-address)")


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _check_input(config: ScoreConfig) -> Any:
    from vitray.data.sources import detect_format, inspect_source

    fmt = config.format or detect_format(config.input)
    # An image folder is scored like any tree of images: its class folders are only part of the ids.
    fmt = "images" if fmt == "imagefolder" else fmt
    source = inspect_source(config.input, fmt)
    if config.submission and source.format != "csv":
        raise VitrayError("--submission needs digit-recognizer CSV input (pixel0..pixel783); "
                          f"{config.input} is {source.format}")
    if storage.same_or_inside(config.output, config.input):  # by real location: a link into the input counts
        raise VitrayError(f"--output {config.output} is inside --input {config.input}: "
                          "its overlays would be scored by the next run")
    storage.check_output(config.output, "--output")
    return source


def _check_cluster(config: ScoreConfig) -> None:
    """The actors fit the cluster; on a cluster, a local --output is a folder every node mounts."""
    from vitray.cluster import check_fits, check_shared_output, plan, shortfall

    # Each actor holds a CPU (and its GPUs); decoding needs a CPU of its own beside them.
    if not (config.ray_address or os.environ.get("RAY_ADDRESS")):  # an embedded Ray: this machine alone
        from vitray.runtime import embedded_cpus

        gpus = _local_gpus() if config.gpus_per_worker > 0 else 0
        worker = {"CPU": 1.0, "GPU": config.gpus_per_worker}
        fit = plan([{"CPU": float(embedded_cpus()), "GPU": float(gpus)}], config.workers, worker, {"CPU": 1.0})
        if not fit.fits:
            raise VitrayError(shortfall(fit, "--workers", config.workers, 1.0, config.gpus_per_worker, 1.0,
                                        "decoding"))
        return
    from vitray.runtime import RayOptions, init_ray

    init_ray(RayOptions(address=config.ray_address, quiet=not config.verbose, dashboard=False))
    check_shared_output(config.output, config.shared_fs, "--output")
    check_fits(config.workers, 1.0, config.gpus_per_worker, "--workers", extra_cpus=1.0, extra_for="decoding")


def score(config: ScoreConfig, progress: Callable[[dict[str, int]], None] | None = None) -> dict:
    """Score every image of `config.input` not yet committed under `config.output`; return the manifest.

    Raises VitrayError (exit 2) for a bad model, input or option, or an output another
    run holds, before any work; VitrayError with exit code 1 when the run fails (a full
    disk, an unreachable S3, the share of undecodable images above `max_error_rate`:
    what was committed stays) and with exit code 130 when interrupted (Ctrl-C).
    """
    wall_start = time.perf_counter()
    config.check()
    config = _located(config)
    labels, prep, grid, model = _check_model(config)
    policy = _policy(config, labels, model)
    bank = anomalies.plan_of(config.anomaly, config.attention, prep.size) if config.anomaly else None
    source = _check_input(config)
    _check_gpus(config)
    _check_cluster(config)

    run_id = new_run_id()
    out = storage.resolve(config.output).uri
    with Lease(out, run_id, stale_s=config.lease_timeout) as lease:
        manifest: dict[str, Any] = {
            "run_id": run_id, "status": "running", "started": _now(), "finished": None,
            "model": storage.resolve(config.model).uri, "input": storage.resolve(config.input).uri, "output": out,
            "format": source.format, "labels_of_model": labels, "arguments": dataclasses.asdict(config),
        }
        if bank is not None:
            manifest["anomaly"] = {"bank": storage.resolve(bank.bank).uri, "threshold": bank.threshold}
        if lease.took_over:
            manifest["took_over_lease_of"] = lease.took_over
        runs = storage.join(out, "runs", f"{run_id}.json")
        storage.write_json(runs, manifest)  # a run that never finishes stays visible as "running"
        manifest["recovered"] = recover(out, run_id)
        totals = _Totals(decide=policy is not None)
        try:
            skipped, scoring_s = _score_remaining(config, source, PiecePlan(
                out, run_id, manifest["model"], tuple(labels), grid, _ids_base(config.input), bank), model, prep,
                totals, lease, progress)
            lease.check()
            manifest["compacted"] = compact(out)  # this run's pieces, and any a killed run left
        except BaseException as exc:
            failure = _failure(exc, out, totals)
            _record_end(runs, manifest, failure, counts={"scored": totals.scored, "errors": totals.errors})
            raise failure from exc
    try:
        return _finish(config, manifest, source, totals, skipped, scoring_s, time.perf_counter() - wall_start,
                       policy)
    except KeyboardInterrupt:  # every image is committed; only the summary is left to write
        failure = stop_error("{stopped} while writing the run's summary; every image is scored and committed; "
                             "the same command writes the summary")
        _record_end(runs, manifest, failure)
        raise failure from None


def _record_end(runs_uri: str, manifest: dict[str, Any], failure: VitrayError, **extra: Any) -> None:
    """The manifest of a run that ended early: interrupted (exit 130) or failed, and why; best effort."""
    manifest.update(status="interrupted" if failure.exit_code in STOP_EXIT_CODES else "failed", finished=_now(),
                    failure=str(failure), **extra)
    try:
        storage.write_json(runs_uri, manifest)
    except Exception:  # noqa: BLE001 - the storage that failed may refuse this too
        pass


def _score_remaining(config: ScoreConfig, source: Any, plan: PiecePlan, model: str | bytes, prep: Any, totals: _Totals,
                     lease: Lease, progress: Callable[[dict[str, int]], None] | None) -> tuple[int, float]:
    """Score the ids not yet committed: (how many were committed before, seconds the scoring took)."""
    record_bad_names(plan.output, plan.run_id, source)
    planned = plan_run(plan.output, source.ids)
    remaining, skipped = planned.remaining, planned.skipped
    totals.in_process = bool(remaining) and runs_in_process(len(remaining), config.in_process_max, config.ray_address,
                                                            config.gpus_per_worker)
    log.info("%s images in %s, %s already scored in %s: %s to score%s", f"{len(source):,}", config.input,
             f"{skipped:,}", plan.output, f"{len(remaining):,}",
             " in this process (too few to start Ray for)" if totals.in_process else "")
    if not remaining:
        return skipped, 0.0
    started = time.perf_counter()
    _run(config, source, remaining, model, prep, plan, totals, lease, progress, skipped)
    return skipped, time.perf_counter() - started


def _finish(config: ScoreConfig, manifest: dict[str, Any], source: Any, totals: _Totals, skipped: int,
            scoring_s: float, wall_s: float, policy: Any = None) -> dict[str, Any]:
    """The manifest of a run that scored what it could, the error-rate check, the submission, the decisions
    (a calibrated model: counts, the review table, the drift test) and the report."""
    out = manifest["output"]
    if policy is not None:
        manifest["decisions"] = totals.decisions.finish(policy, out, manifest["run_id"], read_predictions(out))
    if "anomaly" in manifest:
        manifest["anomaly"]["anomalous"] = totals.anomalous
    manifest.update({
        "status": "complete", "finished": _now(),
        "counts": {"scored": totals.scored, "skipped": skipped, "errors": totals.errors + len(source.bad_names),
                   "total": len(source) + len(source.bad_names)},
        "labels": totals.labels, "error_kinds": totals.error_kinds, "pieces": totals.pieces,
        "wall_s": round(wall_s, 3), "scoring_s": round(scoring_s, 3),
        "images_per_s": round(totals.scored / scoring_s, 2) if scoring_s > 0 else None,
        "in_process": totals.in_process,
    })
    if source.bad_names:
        manifest["error_kinds"]["bad-name"] = len(source.bad_names)
    attempted = totals.scored + totals.errors
    rate = totals.errors / attempted if attempted else 0.0
    failure = None
    if rate > config.max_error_rate:
        failure = VitrayError(f"{totals.errors} of {attempted} images could not be read "
                              f"(error rate {rate:.1%} > --max-error-rate {config.max_error_rate}); "
                              f"see {storage.join(out, 'errors')}", exit_code=1)
    elif config.submission:
        try:
            manifest["submission"] = write_submission(out, source.ids, config.submission)
        except VitrayError as exc:
            failure = exc
    if failure:
        manifest.update(status="failed", failure=str(failure))
    storage.write_json(storage.join(out, "runs", f"{manifest['run_id']}.json"), manifest)

    from vitray.score.report import write_report

    # What was scored is committed either way: the report and the manifest show it.
    manifest["report"] = write_report(out)
    if failure:
        raise failure
    drift = manifest.get("decisions", {}).get("drift", {})
    if drift.get("drifted"):
        line = (f"tonight's images drifted from the calibration's (p = {drift['p_value']:.2g} < {drift['alpha']}, "
                f"most in {drift['worst']['feature']}): check the camera, light and parts, and calibrate again "
                "if the line changed on purpose")
        if config.fail_on_drift:
            raise VitrayError(line, exit_code=3)
        log.warning("%s", line)
    return manifest


def _located(config: ScoreConfig) -> ScoreConfig:
    """Local paths absolute: Ray's actors run in other folders than the driver."""
    from vitray.models.specs import portable

    return dataclasses.replace(config, model=portable(config.model), input=storage.absolute(config.input),
                               output=storage.absolute(config.output), submission=storage.absolute(config.submission),
                               anomaly=storage.absolute(config.anomaly))


def _ids_base(input_uri: str) -> str:
    """Ids are relative to the input folder, or (one file given) to the folder holding it."""
    root = storage.resolve(input_uri).uri
    return posixpath.dirname(root) if storage.info(root).type == pafs.FileType.File else root


def _run(config: ScoreConfig, source: Any, remaining: list[str], model: str | bytes, prep: Any, plan: PiecePlan,
         totals: _Totals, lease: Lease, progress: Callable[[dict[str, int]], None] | None, skipped: int) -> None:

    if totals.in_process:
        batches = _in_process(config, source, remaining, model, prep, plan, totals.decide)
    else:
        from vitray.runtime import RayOptions, init_ray

        init_ray(RayOptions(address=config.ray_address, quiet=not config.verbose, dashboard=False))
        batches = _pipeline(config, source, remaining, model, prep, plan, totals.decide).iter_batches(batch_size=None,
                                                                                      batch_format="numpy")
    if progress:  # the clock starts now: Ray's start-up and the model's load count in the rate
        progress({"scored": 0, "errors": 0, "total": len(remaining), "skipped": skipped})
    with Interrupts() as ctrl_c:
        for batch in batches:
            for row in range(len(batch["piece"])):
                totals.add({k: v[row] for k, v in batch.items()})
            ctrl_c.check()  # a Ctrl-C that Ray's iterator took in stops the run here
            lease.check()  # taken over: stop taking new pieces (the pieces in flight are this run's own)
            if progress:
                progress({"scored": totals.scored, "errors": totals.errors, "total": len(remaining),
                          "skipped": skipped})


def _failure(exc: BaseException, out: str, totals: _Totals) -> VitrayError:
    """What a failed or interrupted run tells the user: one line, what failed and what to do."""
    from vitray.faults import describe

    kept = f"the {totals.scored} images committed by this run are kept" if totals.scored else \
        "the images committed before are kept"
    if isinstance(exc, KeyboardInterrupt):
        return stop_error(f"{{stopped}}; {kept}; the same command scores the rest")
    if isinstance(exc, VitrayError):
        return exc
    return VitrayError(f"{describe(exc, out)}; {kept}; rerun the same command to score the rest", exit_code=1)


def _pipeline(config: ScoreConfig, source: Any, remaining: list[str], model: str | bytes, prep: Any,
              plan: PiecePlan, decide: bool = False) -> Any:
    """read → decode/resize (tasks) → model (actor pool) → commit pieces (tasks) → one row per piece."""
    from vitray.data.readers import read_encoded
    from vitray.inference import predict

    return (predict(read_encoded(source, ids=remaining), model, prep, _options(config, decide), config.batch_size,
                    config.workers, config.gpus_per_worker)
            .map_batches(write_piece, fn_kwargs={"plan": plan}, batch_size=config.piece_rows,
                         batch_format="numpy"))


def _in_process(config: ScoreConfig, source: Any, remaining: list[str], model: str | bytes, prep: Any,
                plan: PiecePlan, decide: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """The pipeline's stages in this process: read, decode, model, commit a piece at a time; a summary per piece."""
    from vitray.inference import predict_in_process

    scored: list[dict[str, np.ndarray]] = []
    rows = 0  # in `scored`
    for batch in predict_in_process(source, remaining, model, prep, _options(config, decide), config.batch_size):
        scored.append(batch)
        rows += len(batch["id"])
        while rows >= config.piece_rows:
            joined = {k: np.concatenate([b[k] for b in scored]) for k in scored[0]}
            yield write_piece({k: v[:config.piece_rows] for k, v in joined.items()}, plan)
            scored = [{k: v[config.piece_rows:] for k, v in joined.items()}]
            rows -= config.piece_rows
    if rows:
        yield write_piece({k: np.concatenate([b[k] for b in scored]) for k in scored[0]}, plan)


def _options(config: ScoreConfig, decide: bool = False) -> Any:
    from vitray.inference import PredictOptions

    return PredictOptions(attention=config.attention, method=config.method, head_fusion=config.head_fusion,
                          discard_ratio=config.discard_ratio, decisions=decide, anomaly=config.anomaly)


def _policy(config: ScoreConfig, labels: list[str], model: str | bytes) -> Any:
    """The model's calibration (vitray calibrate), checked on the driver; None for a model without one."""
    from vitray.decisions.policy import load_policy

    if isinstance(model, bytes):
        from vitray.inference import policy_of_export

        return policy_of_export(model, labels)
    from vitray.models.building import local_model_dir

    return load_policy(local_model_dir(config.model), labels)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_submission(output: str, ids: Sequence[str], uri: str) -> dict:
    """Kaggle `ImageId,Label` (ImageId 1..N in the input's row order) from the committed predictions."""
    wanted = {image_id: n for n, image_id in enumerate(ids)}
    labels: list[str | None] = [None] * len(ids)
    for batch in read_predictions(output).to_batches(columns=["id", "label"]):
        for image_id, label in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if image_id in wanted:
                labels[wanted[image_id]] = label
    missing = sum(label is None for label in labels)
    if missing:
        raise VitrayError(f"--submission: {missing} of {len(ids)} rows have no prediction under {output}",
                          exit_code=1)
    text = "ImageId,Label\n" + "".join(f"{n},{label}\n" for n, label in enumerate(labels, start=1))
    storage.write_bytes(uri, text.encode())
    return {"uri": uri, "rows": len(ids)}
