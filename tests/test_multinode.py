"""vitray on a Ray cluster of several nodes (all on this machine), outputs on S3.

The cluster is `ray.cluster_utils.Cluster` in a process of its own (tests/multinode_cluster.py):
a head and three worker nodes with one logical CPU each, so that two Train workers or two
scoring actors cannot share a node. Token authentication is on with the cluster's own
token; every `vitray` runs as a subprocess that joins with RAY_ADDRESS, RAY_AUTH_MODE=token
and RAY_AUTH_TOKEN_PATH, as a user's driver would. Nodes are killed (SIGKILL, no drain)
in the middle of runs: training resumes from its last checkpoint on the nodes left,
scoring finishes with every image committed exactly once.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import INSPECTION_LABELS, S3_BUCKET, save_tiny_vit
from multinode_cluster import LOOPBACK, LocalCluster
from vitray import storage

pytestmark = [pytest.mark.slow, pytest.mark.s3]

VITRAY = [sys.executable, "-m", "vitray.cli"]
WORKER_NODES = 3  # besides the head; each with 1 CPU, the head too
# A killed node is declared dead after ~3 s instead of Ray's default ~15-30 s.
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                          "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
TRAIN_EPOCHS = 5
TRAIN_TIMEOUT_S = 300
SCORE_IMAGES = 1000
SCORE_SIZE = 64  # 16x16 patches: slow enough (with grad-rollout maps) that a node can go mid-run
SCORE_TIMEOUT_S = 240
SCORER = "MapWorker(MapBatches(Predictor))"  # Ray Data's actor class name for the Predictor pool


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster(s3) -> Iterator[LocalCluster]:
    """Head + WORKER_NODES nodes; the S3 variables are in os.environ before any node starts."""
    started = time.monotonic()
    with LocalCluster(head_cpus=1, system_config=FAST_FAILURE_DETECTION) as c:
        for i in range(WORKER_NODES):
            c.add_node(num_cpus=1, resources={f"vitray_test_node_{i}": 1})
        print(f"cluster of {WORKER_NODES + 1} nodes up in {time.monotonic() - started:.0f}s")
        yield c


@pytest.fixture
def worker_nodes(cluster: LocalCluster) -> set[str]:
    """WORKER_NODES live worker nodes: replacements for those an earlier test removed (as an autoscaler would)."""
    alive = cluster.alive_nodes() - {cluster.head_id}
    for _ in range(WORKER_NODES - len(alive)):
        alive.add(cluster.add_node(num_cpus=1, resources={f"vitray_test_spare_{uuid.uuid4().hex[:6]}": 1}))
    return alive


@pytest.fixture(scope="module")
def s3_root(s3) -> str:
    return f"s3://{S3_BUCKET}/multinode-{uuid.uuid4().hex[:8]}"


def synth_to_s3(s3, tmp: Path, uri: str, **kwargs) -> list[str]:
    """`vitray synth` image folder rendered locally, then uploaded to `uri` 16 PUTs at a time; its keys.

    (synth.write straight to s3:// works too, one PUT after another: 20 s for 1,000 images on a busy machine.)
    """
    from concurrent.futures import ThreadPoolExecutor

    from vitray.data import synth

    synth.write(str(tmp), fmt="imagefolder", **kwargs)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = s3.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(tmp).as_posix()}"),
                      files))
    return [p.relative_to(tmp).as_posix() for p in files]


@pytest.fixture(scope="module")
def train_data(s3, s3_root: str, tmp_path_factory) -> str:
    uri = f"{s3_root}/train-data"
    synth_to_s3(s3, tmp_path_factory.mktemp("train-data") / "data", uri, n=200, size=32, seed=5, passed_fraction=0.2)
    return uri


@pytest.fixture(scope="module")
def score_model(s3_root: str) -> str:
    return save_tiny_vit(f"{s3_root}/model", INSPECTION_LABELS, size=SCORE_SIZE)


@pytest.fixture(scope="module")
def score_input(s3, s3_root: str, tmp_path_factory) -> tuple[str, list[str]]:
    """SCORE_IMAGES small PNGs under an s3:// prefix, and their ids (relative keys)."""
    uri = f"{s3_root}/night"
    keys = synth_to_s3(s3, tmp_path_factory.mktemp("night") / "data", uri, n=SCORE_IMAGES, size=SCORE_SIZE, seed=7,
                       passed_fraction=0.3)
    ids = sorted(k for k in keys if k.endswith(".png"))
    assert len(ids) == SCORE_IMAGES
    return uri, ids


# --------------------------------------------------------------------------- helpers


class Run:
    """A `vitray` subprocess joined to the cluster, its output in a log file."""

    def __init__(self, cluster: LocalCluster, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(VITRAY + args, env={**cluster.driver_env(), **(env or {})}, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"vitray ran past {timeout:.0f}s:\n{self.tail()}")
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 60) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._log.close()


def wait_for(what: str, condition, run: Run, timeout: float, every: float = 0.5):
    """Poll `condition()` until it returns something truthy; fail if the run ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if not run.running():
            pytest.fail(f"vitray exited ({run.proc.returncode}) before {what}:\n{run.tail()}")
        time.sleep(every)
    pytest.fail(f"no {what} within {timeout:.0f}s:\n{run.tail()}")


def relative_keys(uri: str) -> list[str]:
    root = storage.resolve(uri)
    return [storage.relative(root, f.path) for f in storage.list_files(uri)]


def checkpoint_epochs(out: str) -> list[int]:
    """Epochs whose Ray Train checkpoint (OUT/train/epoch-NNNN/state.pt) is in storage."""
    found = (re.fullmatch(r"train/epoch-(\d+)/state\.pt", key) for key in relative_keys(out))
    return sorted(int(m.group(1)) for m in found if m)


def alive_actors(cluster: LocalCluster, class_part: str) -> list[dict]:
    return [a for a in cluster.actors() if class_part in a["class_name"] and a["state"] == "ALIVE"]


def read_history(out: str) -> list[dict]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(out, "history.csv")).decode())))


# --------------------------------------------------------------------------- the cluster itself


def test_cluster_listens_on_loopback_only_and_wants_its_token(cluster: LocalCluster, worker_nodes: set[str]):
    import psutil

    pattern = re.compile(re.escape(cluster.temp_dir) + r"(?![\w.-])")
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if pattern.search(" ".join(proc.info["cmdline"] or [])):
            pids.add(proc.info["pid"])
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.pid in pids and c.status == psutil.CONN_LISTEN]
    assert listening, "found none of the cluster's listening sockets"
    assert {c.laddr.ip.removeprefix("::ffff:") for c in listening} == {LOOPBACK}, listening
    # The nodes each see one CPU.
    nodes = {n["node_id"]: n for n in cluster.nodes() if n["alive"]}
    assert set(nodes) == worker_nodes | {cluster.head_id}
    assert all(n["resources"]["CPU"] == 1 for n in nodes.values())

    # A driver that names the cluster is refused without its token, and with another one.
    # (RAY_NUM_REDIS_GET_RETRIES: Ray retries the refused connection 20 times, once a second.)
    code = "import ray; ray.init(); print('joined', len(ray.nodes()))"
    no_token = cluster.driver_env()
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        no_token.pop(name, None)
    wrong_token = cluster.driver_env()
    wrong_token.pop("RAY_AUTH_TOKEN_PATH")
    wrong_token["RAY_AUTH_TOKEN"] = "0" * 64  # RAY_AUTH_TOKEN is the other way to give it
    for env in (no_token, wrong_token):
        refused = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_NUM_REDIS_GET_RETRIES": "2"},
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr, refused.stderr[-2000:]
    # vitray says what is missing, in one line.
    code = ("from vitray.errors import VitrayError\nfrom vitray.runtime import init_ray\n"
            "try:\n    init_ray()\nexcept VitrayError as exc:\n    print(exc)\n")
    said = subprocess.run([sys.executable, "-c", code], env={**no_token, "RAY_NUM_REDIS_GET_RETRIES": "2"},
                          capture_output=True, text=True, timeout=120)
    assert "wants its authentication token (new Ray clusters do), set RAY_AUTH_MODE=token" in said.stdout, said.stdout + said.stderr[-2000:]
    # (With cluster.driver_env() it joins: every vitray run below does.)


# --------------------------------------------------------------------------- training


def test_train_on_two_nodes_resumes_after_losing_one(cluster: LocalCluster, worker_nodes: set[str],
                                                     train_data: str, s3_root: str, tmp_path: Path):
    out = f"{s3_root}/train-run"
    args = ["train", "--data", train_data, "--out", out, "--workers", "2", "--epochs", str(TRAIN_EPOCHS),
            "--batch-size", "16", "--seed", "1"]
    started = time.monotonic()
    with Run(cluster, args, tmp_path / "train.log") as run:
        seen = wait_for("the first checkpoint on S3", lambda: checkpoint_epochs(out), run, TRAIN_TIMEOUT_S)
        workers = alive_actors(cluster, "RayTrainWorker")
        assert len(workers) == 2, workers
        placed = {a["node_id"] for a in workers}
        assert len(placed) == 2, f"both Train workers on one node: {workers}"
        victim = next(iter(sorted(placed - {cluster.head_id})))
        assert run.running(), "the run finished before a node could be removed: give it more epochs"
        removed_at_ms = time.time() * 1000
        cluster.remove_node(victim)
        print(f"removed node {victim[:8]} after checkpoint(s) {seen}, "
              f"{time.monotonic() - started:.0f}s into the run")
        rc = run.wait(TRAIN_TIMEOUT_S)
        log = run.tail(200)
    print(f"train: exit {rc} after {time.monotonic() - started:.0f}s")
    assert rc == 0, log

    metrics = storage.read_json(storage.join(out, "metrics.json"))
    resumed = metrics["resumed_after_epochs"]
    # One restart, from a checkpoint no older than the one seen when the node went: at most
    # the epoch that was running is done again.
    assert len(resumed) == 1 and max(seen) <= resumed[0] < TRAIN_EPOCHS, (resumed, seen, log)
    assert [int(r["epoch"]) for r in read_history(out)] == list(range(1, TRAIN_EPOCHS + 1))
    assert "model/config.json" in relative_keys(out)
    # The new worker group runs on the nodes left, two of them.
    restarted = [a for a in cluster.actors() if "RayTrainWorker" in a["class_name"]
                 and a["start_ms"] >= removed_at_ms]
    assert len(restarted) == 2 and victim not in {a["node_id"] for a in restarted}, restarted
    assert len({a["node_id"] for a in restarted}) == 2


# --------------------------------------------------------------------------- scoring


def test_score_on_several_nodes_commits_every_image_once_after_losing_one(
        cluster: LocalCluster, worker_nodes: set[str], score_model: str, score_input: tuple[str, list[str]],
        s3_root: str, tmp_path: Path):
    from vitray.score import read_predictions

    inp, ids = score_input
    out = f"{s3_root}/scored"
    args = ["score", "--model", score_model, "--input", inp, "--output", out, "--workers", "2",
            "--batch-size", "16", "--piece-rows", "32", "--attention", "all", "--method", "grad-rollout"]

    def committed() -> list[str]:
        return [k for k in relative_keys(out) if re.fullmatch(r"predictions/part-[^/]+\.parquet", k)]

    def both_scoring() -> list[dict]:
        actors = alive_actors(cluster, SCORER)
        return actors if len(actors) == 2 else []

    # The run waits for both actors before it reads (Ray Data otherwise drops one still starting
    # when the other has every input in flight). Then the actor on a worker node is frozen
    # (SIGSTOP): it keeps the batches it was given, in flight, whatever the machine's speed,
    # until its node goes, after the other actor committed a piece.
    both = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": str(SCORE_TIMEOUT_S)}
    started = time.monotonic()
    with Run(cluster, args, tmp_path / "score-1.log", both) as run:
        actors = wait_for("two scoring actors", both_scoring, run, SCORE_TIMEOUT_S, every=0.1)
        placed = {a["node_id"] for a in actors}
        assert len(placed) == 2, f"both scoring actors on one node: {actors}"  # 1 CPU a node: cannot be
        frozen = next(a for a in actors if a["node_id"] != cluster.head_id)
        os.kill(frozen["pid"], signal.SIGSTOP)  # the cluster's process: this test started it
        victim = frozen["node_id"]
        wait_for("a committed piece", committed, run, SCORE_TIMEOUT_S, every=0.25)
        assert frozen in alive_actors(cluster, SCORER), "the frozen actor was let go: it held no batch"
        pieces_before = len(committed())
        cluster.remove_node(victim)
        print(f"removed node {victim[:8]} after {pieces_before} committed pieces, "
              f"{time.monotonic() - started:.0f}s into the run")
        rc = run.wait(SCORE_TIMEOUT_S)
        first_log = run.tail(200)
    print(f"score, first run: exit {rc} after {time.monotonic() - started:.0f}s")
    if rc != 0:
        # A run that fails must leave what it committed usable: the same command finishes the job.
        with Run(cluster, args, tmp_path / "score-2.log") as rerun:
            rc2 = rerun.wait(SCORE_TIMEOUT_S)
            assert rc2 == 0, f"first run:\n{first_log}\n\nrerun:\n{rerun.tail()}"
        print(f"score, rerun: exit 0 after {time.monotonic() - started:.0f}s in all")

    table = read_predictions(out).to_table(columns=["id"])
    got = table.column("id").to_pylist()
    assert len(got) == len(set(got)) == len(ids), (len(got), len(set(got)), len(ids))
    assert sorted(got) == ids


# --------------------------------------------------------------------------- local outputs


@pytest.mark.parametrize("command", ["train", "score"])
def test_a_local_output_is_refused_on_several_nodes(command: str, cluster: LocalCluster, worker_nodes: set[str],
                                                    train_data: str, score_model: str,
                                                    score_input: tuple[str, list[str]], tmp_path: Path):
    """The workers write on their own nodes: a path only this machine has would scatter the outputs."""
    local = tmp_path / "out"
    if command == "train":
        args = ["train", "--data", train_data, "--out", str(local), "--workers", "2", "--epochs", "1"]
    else:
        args = ["score", "--model", score_model, "--input", score_input[0], "--output", str(local)]
    done = subprocess.run(VITRAY + args, env=cluster.driver_env(), capture_output=True, text=True, timeout=180)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in lines if line.startswith("vitray: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in done.stderr, done.stderr
    assert "s3://" in errors[0] and "--shared-fs" in errors[0], errors[0]
    assert not local.exists() or not any(local.iterdir()), "refused, yet it wrote"
