"""Experiment tracking in MLflow: params, per-epoch metrics, final metrics and artifacts of each run.

Tracking is on when `--mlflow URI` is given or `MLFLOW_TRACKING_URI` is set; nothing imports
mlflow otherwise. The driver opens the run (a search opens one for itself and each trial one
child run under it), rank 0 of the Ray Train workers logs each epoch to it (Train V2 takes no
Tune-level logger callbacks, and Ray's docs log from rank 0), and the driver logs the final
metrics and the outputs and closes it. Tracking never costs a run: a server that cannot be
reached gives one warning line, and the run goes on untracked.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import Any, Iterable

from vitray import storage

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "vitray"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value (8,000 on recent servers; 6,000 is safe)
# An unreachable server costs seconds, not MLflow's minutes of retries.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass(frozen=True)
class Tracking:
    """Where a run is tracked; plain data, so it travels in Ray Train's loop config."""

    uri: str
    experiment: str = DEFAULT_EXPERIMENT
    run_id: str | None = None


def resolve(uri: str | None, experiment: str | None = None) -> Tracking | None:
    """The tracking of a command: `--mlflow`, else $MLFLOW_TRACKING_URI, else none."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    return Tracking(uri, experiment or DEFAULT_EXPERIMENT) if uri else None


def start(tracking: Tracking | None, name: str, params: Any = None, parent: Tracking | None = None,
          tags: dict[str, str] | None = None) -> Tracking | None:
    """Open a run named `name` (a child of `parent`'s run when given) and log its params."""
    if tracking is None:
        return None

    def open_run(client: Any) -> Tracking:
        experiment = client.get_experiment_by_name(tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(tracking.experiment)
        run_tags = dict(tags or {})
        if parent is not None and parent.run_id:
            run_tags["mlflow.parentRunId"] = parent.run_id
        run = client.create_run(experiment_id, run_name=name, tags=run_tags)
        opened = replace(tracking, run_id=run.info.run_id)
        if params is not None:
            _log_params(client, opened.run_id, params)
        return opened

    return _call(tracking, open_run)


def log_metrics(tracking: Tracking | None, metrics: dict[str, Any], step: int | None = None) -> None:
    """The numbers of `metrics` (others, such as nested dicts, are left out), at `step` (an epoch)."""
    if tracking is None or tracking.run_id is None:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(key, float(value), now, step or 0) for key, value in _numbers(metrics)]
    if rows:
        _call(tracking, lambda client: client.log_batch(tracking.run_id, metrics=rows))


def log_outputs(tracking: Tracking | None, uris: Iterable[str], folder: str | None = None) -> None:
    """Files (local or s3://) as artifacts of the run, under `folder`; missing ones are passed over."""
    if tracking is None or tracking.run_id is None:
        return

    def upload(client: Any) -> None:
        with tempfile.TemporaryDirectory() as d:
            for uri in uris:
                if not storage.exists(uri):
                    continue
                local = os.path.join(d, os.path.basename(uri.rstrip("/")))
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(uri))
                client.log_artifact(tracking.run_id, local, artifact_path=folder)

    _call(tracking, upload)


def end(tracking: Tracking | None, status: str = "FINISHED") -> None:
    """Close the run: FINISHED, FAILED or KILLED."""
    if tracking is not None and tracking.run_id is not None:
        _call(tracking, lambda client: client.set_terminated(tracking.run_id, status))


def _log_params(client: Any, run_id: str, params: Any) -> None:
    from mlflow.entities import Param

    values = asdict(params) if is_dataclass(params) else dict(params)
    rows = [Param(str(k), str(v)[:MAX_PARAM_CHARS]) for k, v in sorted(values.items())]
    for start in range(0, len(rows), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=rows[start:start + 100])


def _numbers(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    found = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        found.append((key, float(value)))
    return found


_unreachable: set[str] = set()  # tracking URIs that failed in this process: tried no more


def _call(tracking: Tracking, action: Any) -> Any:
    """`action(client)`; any failure is one warning (once per URI and process) and tracking stops."""
    if tracking.uri in _unreachable:
        return None
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)
    try:
        from mlflow import MlflowClient

        return action(MlflowClient(tracking_uri=tracking.uri))
    except ImportError:
        _unreachable.add(tracking.uri)
        log.warning("mlflow is not installed (pip install 'vitray[track]'); the run goes on untracked")
    except Exception as exc:  # noqa: BLE001 - tracking must never end a run
        _unreachable.add(tracking.uri)
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        log.warning("mlflow: cannot track at %s (%s); the run goes on untracked", tracking.uri, reason)
    return None
