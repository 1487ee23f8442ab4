"""What a training run keeps on storage: its checkpoints (`RUN/epoch-NNNN/`) and its history.

A checkpoint folder holds the training state, loaded without unpickling code
(`torch.load(weights_only=True)`: anyone who can write to a shared --out could otherwise
run code on the next resume), and a record of it written beside it: a folder whose record
is missing, or names another size, was cut short while being written. A run resumes from
the newest complete folder, not from Ray Train's own record, which learns of a checkpoint
only when its controller next polls the workers.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
from typing import Any, Sequence

from vitray import storage
from vitray.errors import VitrayError

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
RECORD_FILE = "checkpoint.json"
CHECKPOINT_DIR = re.compile(r"^epoch-(\d+)$")
CHECKPOINTS_KEPT = 2  # the best by validation macro-F1 (Ray Train's num_to_keep); the newest is kept too
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "images_per_s")


def save_state(folder: str, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """STATE_FILE and its RECORD_FILE (epoch, size, the epoch's metrics) into a local folder
    that Ray Train then uploads.

    Only tensors, dicts, lists, numbers, strings and None: what `load_state` accepts.
    """
    import json

    import torch

    path = os.path.join(folder, STATE_FILE)
    torch.save(state, path)
    with open(os.path.join(folder, RECORD_FILE), "w") as f:
        json.dump({"epoch": int(state["epoch"]), "state_bytes": os.path.getsize(path), "metrics": metrics}, f)


def checkpoint_name(epoch: int) -> str:
    """The folder of an epoch's checkpoint under RUN (what CHECKPOINT_DIR matches)."""
    return f"epoch-{epoch:04d}"


def store_checkpoint(folder: str, run_uri: str, epoch: int) -> str:
    """Copy a `save_state` folder to RUN/epoch-NNNN, its record last (a copy cut short is not complete);
    its URI. Ray Train does this with a reported folder; its local mode, which trains in the
    driver's process, keeps none, so a training there stores its own."""
    target = storage.join(run_uri, checkpoint_name(epoch))
    for name in (STATE_FILE, RECORD_FILE):
        with open(os.path.join(folder, name), "rb") as f:
            storage.write_bytes(storage.join(target, name), f.read())
    return target


def keep_best_and_newest(run_uri: str, keep: int = CHECKPOINTS_KEPT) -> None:
    """Delete the run's complete checkpoints other than the `keep` best by validation macro-F1 and the
    newest: what Ray Train's CheckpointConfig does for a run on Ray, for a run in this process."""
    saved = scored_checkpoints(run_uri)
    by_score = sorted(saved, key=lambda s: (s[2].get("val_macro_f1", float("-inf")), s[0]), reverse=True)
    kept = {folder for _, folder, _ in by_score[:keep] + saved[:1]}
    for _, folder, _ in saved:
        if folder not in kept:
            loc = storage.resolve(folder)
            try:
                loc.fs.delete_dir(loc.path)
            except OSError as exc:
                log.warning("could not delete the checkpoint %s: %s", folder, exc)


def scored_checkpoints(run_uri: str) -> list[tuple[int, str, dict[str, Any]]]:
    """(epoch, folder URI, the metrics reported with it) of the run's complete checkpoints, newest first."""
    return [(epoch, folder, read_record(folder).get("metrics") or {}) for epoch, folder in complete_checkpoints(run_uri)]


def read_record(folder_uri: str) -> dict[str, Any]:
    """The RECORD_FILE of a checkpoint folder (plain JSON)."""
    import json

    return json.loads(storage.read_bytes(storage.join(folder_uri, RECORD_FILE)))


def load_state(source: Any, shown: str, mmap: bool = False) -> dict[str, Any]:
    """A training state from a path or file object, without running code that a file may carry.

    A checkpoint under a shared --out is written by whoever can write there: only tensors and
    plain containers are read (weights_only), and anything else is refused in one line.
    """
    import pickle

    import torch

    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                   lines[0] if lines else type(exc).__name__)
        raise VitrayError(f"{shown}: not a vitray training state, refused without loading it ({why}); "
                          f"delete that checkpoint folder or use another --out") from None
    if not isinstance(state, dict) or not {"model", "epoch", "history"} <= set(state):
        raise VitrayError(f"{shown}: not a vitray training state; delete that checkpoint folder or use another --out")
    return state


def complete_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(epoch, folder URI) of the run's checkpoints that were written to their end, newest first.

    This and not Ray Train's own record is where a run resumes: Ray Train learns of a
    checkpoint when its controller next polls the workers, and a run stopped in between
    (Ctrl-C, a killed driver) leaves newer checkpoints on storage than its record names.
    """
    if not storage.exists(run_uri):
        return []
    root = storage.resolve(run_uri)
    sizes: dict[str, dict[str, int]] = {}
    for info in storage.list_files(run_uri):
        parts = storage.relative(root, info.path).split("/")
        if len(parts) == 2 and CHECKPOINT_DIR.match(parts[0]):
            sizes.setdefault(parts[0], {})[parts[1]] = info.size
    found = []
    for name, files in sizes.items():
        if STATE_FILE not in files or RECORD_FILE not in files:
            continue
        folder = storage.join(run_uri, name)
        try:
            record = read_record(folder)
            epoch, expected = int(record["epoch"]), int(record["state_bytes"])
        except (VitrayError, ValueError, KeyError, TypeError):
            continue
        if epoch == int(CHECKPOINT_DIR.match(name).group(1)) and files[STATE_FILE] == expected:
            found.append((epoch, folder))
    return sorted(found, reverse=True)


def check_resume(run_uri: str) -> int:
    """The epoch a run resumes after (0: none), its state checked to load safely before any work."""
    saved = complete_checkpoints(run_uri)
    if not saved:
        return 0
    epoch, folder = saved[0]
    uri = storage.join(folder, STATE_FILE)
    loc = storage.resolve(uri)
    if loc.is_s3:
        load_state(io.BytesIO(storage.read_bytes(uri)), uri)
    else:
        load_state(loc.path, uri, mmap=True)  # reads the structure, not the tensors
    return epoch


def prune_checkpoints(result: Any, run_uri: str) -> None:
    """Delete checkpoint folders that Ray Train does not keep (written but never registered)."""
    keep = {c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        keep.add(result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    root = storage.resolve(run_uri)
    names = {storage.relative(root, i.path).split("/")[0] for i in storage.list_files(run_uri)}
    for name in sorted(names):
        if CHECKPOINT_DIR.match(name) and name not in keep:
            try:
                root.fs.delete_dir(root.child(name).path)
            except OSError as exc:
                log.warning("could not delete the stale checkpoint %s: %s", name, exc)


def write_history(uri: str, history: list[dict[str, Any]], columns: Sequence[str] = HISTORY_COLUMNS) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    storage.write_bytes(uri, buf.getvalue().encode())
