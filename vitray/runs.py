"""One training output, one run: its lease, the options it began with, and starting it afresh.

`train`, `pretrain` and `tune` write checkpoints under their `--out` and resume from them when
the same command runs again. Three things keep that honest:

- the output's lease (`vitray.lease`, as scoring has): a second run on the same output is
  refused in one line instead of overwriting the first one's model and metrics;
- the options a run began with, kept beside its checkpoints (`RUN/options.json`): a resume
  that would change what the checkpoints were trained for (the data, the model, the schedule,
  the recipe) is refused before any work, naming the option; what only says where or how fast
  the run goes (GPUs, the cluster, tracking, which epoch is exported) may change;
- `--fresh`: the run's checkpoints are discarded and it starts again from the first epoch.
"""
from __future__ import annotations

import contextlib
import json
import secrets
import shutil
from typing import Any, Iterator

from vitray import storage
from vitray.errors import VitrayError
from vitray.lease import Lease

OPTIONS_FILE = "options.json"
# What a resume may change: where and how fast the run goes, and what is done with its epochs.
MAY_CHANGE = frozenset({"out", "gpus_per_worker", "max_failures", "ray_address", "shared_fs", "in_process_max",
                        "mlflow", "mlflow_experiment", "export", "fresh", "verbose"})


@contextlib.contextmanager
def held(out: str) -> Iterator[Lease]:
    """The output's lease for the length of the block: one run per output."""
    lease = Lease(out, run_id=secrets.token_hex(6)).acquire()
    try:
        yield lease
    finally:
        lease.release()


def discard(run_uri: str) -> None:
    """Delete a run's checkpoints and its record (`--fresh`)."""
    loc = storage.resolve(run_uri)
    try:
        if loc.is_s3:
            loc.fs.delete_dir(loc.path)
        else:
            shutil.rmtree(loc.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise VitrayError(storage.describe_error(run_uri, exc)) from None


def check_options(out: str, run_uri: str, options: dict[str, Any], resuming: bool) -> None:
    """Refuse a resume whose options differ from the run's own (exit 2), before any work.

    A run resumed from checkpoints written before options were recorded is taken as it is.
    """
    record = storage.join(run_uri, OPTIONS_FILE)
    now = json.loads(json.dumps(options))  # as they read back: tuples are lists
    if resuming:
        try:
            before = storage.read_json(record)
        except FileNotFoundError:
            before = None
        except (OSError, ValueError) as exc:
            raise VitrayError(f"{record}: cannot read the options the run began with ({exc}); "
                              "give --fresh to start it again") from None
        if isinstance(before, dict):
            for name in sorted(now):
                if name in MAY_CHANGE or name not in before or before[name] == now[name]:
                    continue
                flag = "--" + name.replace("_", "-")
                raise VitrayError(
                    f"{out} holds a run begun with {flag} {_shown(before[name])}; this "
                    f"command gives {_shown(now[name])}, which a resume cannot change (its checkpoints were "
                    f"trained for the first): give the same {flag} to resume, --fresh to start the output "
                    "afresh, or another --out")


def record_options(run_uri: str, options: dict[str, Any], resuming: bool) -> None:
    """Keep the options a run begins with beside its checkpoints (once its data were found good)."""
    record = storage.join(run_uri, OPTIONS_FILE)
    if not resuming or not storage.exists(record):
        storage.write_json(record, json.loads(json.dumps(options)))


def _shown(value: Any) -> str:
    return "(none)" if value is None else str(value)


def fresh_option() -> Any:
    """The `--fresh` option of the commands that resume (`vitray.options`)."""
    from vitray.options import option

    return option(False, "discard the checkpoints under --out and start from the first epoch (a resume keeps the "
                         "options the run began with)",
                  doc="discard the checkpoints under `--out` and start again from the first epoch")


def mlflow_option(doc: str) -> Any:
    """The `--mlflow URI` option of the tracked commands (`vitray.options`); `doc`: what it tracks."""
    from vitray.options import option

    return option(None, "track the run in MLflow at URI (neither it nor $MLFLOW_TRACKING_URI: not tracked)",
                  metavar="URI", default_text="$MLFLOW_TRACKING_URI", doc=doc)


def mlflow_experiment_option() -> Any:
    from vitray.options import option

    return option(None, "the MLflow experiment", metavar="NAME", default_text="vitray")
