"""Experiment tracking in MLflow: params, per-epoch metrics, final metrics and artifacts of each run.

Tracking is on when `--mlflow URI` is given or `MLFLOW_TRACKING_URI` is set; nothing imports
mlflow otherwise. The driver opens the run (a search opens one for itself and each trial one
child run under it), rank 0 of the Ray Train workers logs each epoch to it (Train V2 takes no
Tune-level logger callbacks, and Ray's docs log from rank 0), and the driver logs the final
metrics and the outputs and closes it. Tracking never costs a run: a server that cannot be
reached gives one warning line, and the run goes on untracked.
"""
from __future__ import annotations

import hashlib
import logging
import math
import numbers
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Callable, Iterable, Iterator

from vitray import storage
from vitray.errors import VitrayError

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "vitray"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable, read when --mlflow-experiment is not given
# Set for the time of each call, where the user has not set them. An unreachable server costs
# seconds, not MLflow's minutes of retries (its default: 7 retries with backoff, a 120 s timeout);
# no retries also keeps urllib3's "Retrying ..." warnings away, so a failure is the one line of
# `_call`. Closing a run prints no "View run" line on stdout: `start` logs the run's address.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
RUN_KEY_TAG = "vitray.run_key"  # what `start(resume=True)` finds a run by: its name and parent
CHANGED_TAG = "vitray.changed_params"  # params given another value later (a resumed run's new --epochs)
MAX_PARAM_CHARS = 6000  # MLflow's limits (mlflow.utils.validation)
MAX_TAG_CHARS = 8000
MAX_KEY_CHARS = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_NOT_A_NAME = re.compile(r"[^\w.\- ]")  # MLflow names: letters, digits, _ . - space (and / :, left out)


@dataclass
class Tracking:
    """Where a run is tracked: plain data, so it travels in Ray Train's loop config and Tune's trials.

    `off` turns true in the process where a call to the server failed: that copy of the run
    makes no more calls (the copies in other processes, such as the driver's, still do).
    """

    uri: str
    experiment: str = DEFAULT_EXPERIMENT
    run_id: str | None = None
    parent_run_id: str | None = None
    off: bool = field(default=False, compare=False)


def resolve(uri: str | None, experiment: str | None = None) -> Tracking | None:
    """The tracking of a command: `--mlflow`, else $MLFLOW_TRACKING_URI, else none (not tracked).

    The experiment: `--mlflow-experiment`, else $MLFLOW_EXPERIMENT_NAME, else "vitray".
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    return Tracking(uri, experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT)


def start(tracking: Tracking | None, name: str, params: Any = None, parent: Tracking | None = None,
          tags: dict[str, Any] | None = None, resume: bool = False) -> Tracking | None:
    """Open a run named `name` in `tracking`'s experiment and log its params; None when untracked.

    `parent`: an open run (a search) that this run (a trial) is a child of. `resume`: go on with
    the newest run of the same name under the same parent, when there is one (a training that
    resumes from its checkpoints), rather than open another; params it was given other values
    for keep their first values, and the new ones are listed in its `vitray.changed_params` tag.
    """
    if tracking is None or tracking.off:
        return None
    parent_id = None
    if parent is not None:
        if parent.run_id is None or parent.off:
            return None
        parent_id = parent.run_id
    key = hashlib.sha256(f"{parent_id or ''}\n{name}".encode()).hexdigest()[:32]

    def open_run(client: Any) -> tuple[Tracking, str, bool]:
        experiment_id = _experiment_id(client, tracking.experiment)
        found = _newest_run(client, experiment_id, key) if resume else None
        if found is None:
            run_tags = {**_context_tags(), **_tags(tags), RUN_KEY_TAG: key}
            if parent_id:
                run_tags["mlflow.parentRunId"] = parent_id
            run_id, old_params = client.create_run(experiment_id, run_name=name, tags=run_tags).info.run_id, {}
        else:
            run_id, old_params = found.info.run_id, found.data.params
            client.update_run(run_id, status="RUNNING")
            if tags:
                _log_tags(client, run_id, _tags(tags))
        opened = Tracking(tracking.uri, tracking.experiment, run_id, parent_id)
        if params is not None:
            _log_params(client, run_id, params, old_params)
        return opened, experiment_id, found is not None

    done = _call(tracking, open_run)
    if done is None:
        return None
    opened, experiment_id, resumed = done
    if parent is None:  # a trial's run is found under its search's
        log.info("mlflow: %s run %r at %s", "resuming" if resumed else "tracking", name,
                 _run_address(tracking.uri, experiment_id, opened.run_id))
    return opened


def log_params(tracking: Tracking | None, params: Any) -> None:
    """More params of an open run (a dataclass or a dict; nested ones flattened as `a.b`).

    A param the run has already keeps its value (MLflow refuses a second one), as on resuming.
    """
    if _open(tracking):
        _call(tracking, lambda client: _log_params(client, tracking.run_id, params,
                                                   client.get_run(tracking.run_id).data.params))


def log_metrics(tracking: Tracking | None, metrics: dict[str, Any], step: int | None = None) -> None:
    """The numbers of `metrics` (nested dicts flattened as `a.b`; lists, text, NaN left out), at `step` (an epoch)."""
    if not _open(tracking):
        return
    now = int(time.time() * 1000)
    values = [(_key(k), float(v)) for k, v in flatten(metrics).items() if _is_number(v)]
    if not values:
        return

    def send(client: Any) -> None:
        from mlflow.entities import Metric

        rows = [Metric(key, value, now, step or 0) for key, value in values]
        for first in range(0, len(rows), METRICS_PER_BATCH):
            client.log_batch(tracking.run_id, metrics=rows[first:first + METRICS_PER_BATCH])

    _call(tracking, send)


def set_tags(tracking: Tracking | None, tags: dict[str, Any]) -> None:
    """Tags of an open run (values as text)."""
    if _open(tracking) and tags:
        _call(tracking, lambda client: _log_tags(client, tracking.run_id, _tags(tags)))


def log_outputs(tracking: Tracking | None, uris: Iterable[str], folder: str | None = None) -> None:
    """Files (local, file:// or s3://) as artifacts of the run, under `folder`; missing ones are passed over.

    Files on S3 are copied to a temporary folder first (through vitray.storage, so with the
    same endpoint and credentials as the run's own outputs).
    """
    if not _open(tracking):
        return
    with tempfile.TemporaryDirectory(prefix="vitray-mlflow-") as scratch:
        files = [path for i, uri in enumerate(uris)
                 if (path := _local_copy(uri, os.path.join(scratch, str(i)), want_dir=False)) is not None]
        if files:
            _call(tracking, lambda client: [client.log_artifact(tracking.run_id, f, artifact_path=folder)
                                            for f in files])


def log_folder(tracking: Tracking | None, uri: str, folder: str | None = None) -> None:
    """Every file under a local folder or s3:// prefix as artifacts under `folder`, subfolders kept."""
    if not _open(tracking):
        return
    with tempfile.TemporaryDirectory(prefix="vitray-mlflow-") as scratch:
        local = _local_copy(uri, os.path.join(scratch, "folder"), want_dir=True)
        if local is not None:
            _call(tracking, lambda client: client.log_artifacts(tracking.run_id, local, artifact_path=folder))


def end(tracking: Tracking | None, status: str = "FINISHED") -> None:
    """Close the run: FINISHED, FAILED or KILLED."""
    if _open(tracking):
        _call(tracking, lambda client: client.set_terminated(tracking.run_id, status))


@contextmanager
def warnings_to(show: Callable[[str], None]) -> Iterator[None]:
    """Hand this module's warnings to `show` rather than to this process's log, for the time of the block.

    A Ray worker's log is out of the user's sight (quiet runs keep it in Ray's log files): rank 0
    shows its tracking warning through the driver instead (vitray.progress).
    """
    handler = _Forward(show)
    propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


class _Forward(logging.Handler):
    def __init__(self, show: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self._show = show

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._show(record.getMessage())
        except Exception:  # noqa: BLE001 - a lost warning must not stop training
            self.handleError(record)


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass or dict as one level of `a.b` keys; other values as they are."""
    if is_dataclass(values) and not isinstance(values, type):
        values = asdict(values)
    flat: dict[str, Any] = {}
    for key, value in dict(values).items():
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------- inside


def _open(tracking: Tracking | None) -> bool:
    return tracking is not None and tracking.run_id is not None and not tracking.off


def _call(tracking: Tracking, action: Callable[[Any], Any]) -> Any:
    """`action(client)`; a failure is one warning, and this copy of the run makes no more calls."""
    if tracking.off:
        return None
    try:
        from mlflow import MlflowClient
    except ImportError:
        tracking.off = True
        log.warning("mlflow is not installed (pip install 'vitray[track]'); the run goes on untracked")
        return None
    try:
        with _client_defaults():
            return action(MlflowClient(tracking_uri=tracking.uri))
    except Exception as exc:  # noqa: BLE001 - tracking must never end a run
        tracking.off = True
        log.warning("mlflow: cannot track at %s (%s); the run goes on untracked", _hidden(tracking.uri),
                    _reason(exc))
    return None


@contextmanager
def _client_defaults() -> Iterator[None]:
    """CLIENT_ENV for the time of a call, where the user has not set the variables (MLflow reads them per call)."""
    added = [k for k in CLIENT_ENV if k not in os.environ]
    os.environ.update({k: CLIENT_ENV[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another process made it just now
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise VitrayError(f"experiment {name!r} is deleted (restore it with `mlflow experiments restore`, "
                          f"or pick another with --mlflow-experiment)")
    return experiment.experiment_id


def _newest_run(client: Any, experiment_id: str, key: str) -> Any:
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def _context_tags() -> dict[str, str]:
    """MLflow's own run tags (user, source, git commit), as `mlflow.start_run` sets them."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags()


def _log_params(client: Any, run_id: str, params: Any, old: dict[str, str]) -> None:
    from mlflow.entities import Param

    values = {_key(k): str(v)[:MAX_PARAM_CHARS] for k, v in flatten(params).items()}
    changed = {k: v for k, v in values.items() if k in old and old[k] != v}
    rows = [Param(k, v) for k, v in sorted(values.items()) if k not in old]
    for first in range(0, len(rows), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=rows[first:first + PARAMS_PER_BATCH])
    if changed:  # MLflow keeps a param's first value; say what this resume was run with
        _log_tags(client, run_id, {CHANGED_TAG: "; ".join(f"{k}={v}" for k, v in sorted(changed.items()))})


def _log_tags(client: Any, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    rows = [RunTag(k, v) for k, v in tags.items()]
    for first in range(0, len(rows), PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=rows[first:first + PARAMS_PER_BATCH])


def _tags(tags: dict[str, Any] | None) -> dict[str, str]:
    return {_key(k): str(v)[:MAX_TAG_CHARS] for k, v in (tags or {}).items()}


def _key(name: Any) -> str:
    """A param, metric or tag name that MLflow takes: `recall_bad+part` becomes `recall_bad_part`."""
    key = _NOT_A_NAME.sub("_", str(name))[:MAX_KEY_CHARS]
    return "_" + key[1:] if key in ("", ".") or key.startswith("..") else key


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _local_copy(uri: str, scratch: str, want_dir: bool) -> str | None:
    """A local path of a file (or folder) to upload: itself when local, a copy from S3; None when missing."""
    import pyarrow.fs as pafs

    kind = pafs.FileType.Directory if want_dir else pafs.FileType.File
    try:
        loc = storage.resolve(uri)
        found = loc.fs.get_file_info(loc.path).type
        if found != kind:
            if found != pafs.FileType.NotFound:
                log.warning("mlflow: %s is not a %s; not logged", uri, "folder" if want_dir else "file")
            return None
        if not loc.is_s3:
            return loc.path
        target = scratch if want_dir else os.path.join(scratch, os.path.basename(loc.path))
        os.makedirs(scratch, exist_ok=True)
        pafs.copy_files(loc.path, target, source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem())
        return target
    except VitrayError as exc:
        log.warning("mlflow: %s not logged: %s", uri, exc)
    except OSError as exc:
        log.warning("mlflow: not logged: %s", storage.describe_error(uri, exc))
    return None


def _run_address(uri: str, experiment_id: str, run_id: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"{_hidden(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{_hidden(uri)} (run {run_id})"


_USER_INFO = re.compile(r"(\w[\w+.-]*://)[^/@\s]+@")


def _hidden(text: str) -> str:
    """Text with the user and password of any URL in it (`https://user:token@host`) replaced by ***."""
    return _USER_INFO.sub(r"\1***@", text)


_REASONS = (
    re.compile(r"\[Errno -?\d+\][^'\")]*"),  # Connection refused, Name or service not known, ...
    re.compile(r"(?:Read|Connect)[^'\"(]*?timed out[^'\")]*\)?"),
    re.compile(r"error code \d+[^.]*"),  # the server answered, with an HTTP error
)


def _reason(exc: BaseException) -> str:
    """The telling part of an MLflow error (its text holds the whole request and urllib3's chain)."""
    text = _hidden(" ".join(str(exc).split())) or type(exc).__name__
    for pattern in _REASONS:
        found = pattern.search(text)
        if found:
            return found.group(0).strip()
    return text if len(text) <= 200 else text[:197] + "..."
