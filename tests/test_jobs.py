"""The Ray job entrypoints in jobs/ and their configs.

Every config parses with the real CLI, the working-dir upload stays small, and a job
sent with `ray job submit` to a real Ray head on loopback trains and writes a model.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from procs import kill_processes_of
from s3server import LOOPBACK, free_ports
from vitray.cli import parse
from vitray.cli.training import train_config

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
CONFIGS = sorted((JOBS / "configs").glob("*.yaml"))
COMMANDS = ("pretrain", "train", "tune", "score", "evaluate")
BIN = Path(sys.executable).parent  # the venv that runs the tests, vitray installed in it


def load_entry() -> ModuleType:
    """jobs/_entry.py as a module, without putting jobs/ on everyone's sys.path."""
    spec = importlib.util.spec_from_file_location("jobs_entry", JOBS / "_entry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entry = load_entry()


def configs_of(command: str) -> list[Path]:
    return [p for p in CONFIGS if p.stem.split("-")[0] == command]


def read_yaml(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text())
    assert isinstance(values, dict), f"{path.name}: not a mapping"
    return values


# --------------------------------------------------------------------------- configs


def test_every_config_belongs_to_a_job() -> None:
    assert CONFIGS
    for path in CONFIGS:
        assert path.stem.split("-")[0] in COMMANDS, f"{path.name}: name it <command>-..."
    for command in COMMANDS:
        assert (JOBS / f"{command}.py").is_file()
        assert configs_of(command), f"no ready-made config for jobs/{command}.py"


@pytest.mark.parametrize("path", configs_of("train"), ids=lambda p: p.stem)
def test_train_configs_load_through_the_cli(path: Path) -> None:
    config = train_config(parse(["train", "--config", str(path)]))
    config.check()
    assert config.data.startswith("s3://YOUR-BUCKET/") and config.out.startswith("s3://YOUR-BUCKET/")


def test_train_configs_repeat_the_seed_runs() -> None:
    configs = {p.stem: train_config(parse(["train", "--config", str(p)]))
               for p in configs_of("train")}
    digits = configs["train-digits-scratch"]
    assert digits.data.endswith("digit-recognizer/train.csv")
    assert digits.model is None and digits.epochs == 15, "a from-scratch preset, the default recipe"
    frame = [c for name, c in configs.items() if name.startswith("train-frame-")]
    assert {(c.model, c.finetune) for c in frame} == {
        (f"google/vit-{size}-patch16-224", policy) for size in ("base", "large") for policy in ("full", "lora:8")}
    for c in frame:
        assert (c.workers, c.gpus_per_worker) == (4, 1)
        assert c.val and c.val.rstrip("/").endswith("/val") and c.data.rstrip("/").endswith("/train")


def test_tune_config_searches_lr_and_epochs_with_asha() -> None:
    (path,) = configs_of("tune")
    values = read_yaml(path)
    assert {"data", "out", "lr", "epochs", "samples", "scheduler"} <= set(values)
    assert values["lr"] == "loguniform:1e-4:3e-3" and values["epochs"] == "choice:5,10,15"
    assert values["scheduler"] == "asha" and values["samples"] >= 1
    from vitray.cli.search import tune_config

    tune_config(parse(["tune", "--config", str(path)])).check()


def test_score_config_is_the_nightly_s3_scoring() -> None:
    (path,) = configs_of("score")
    values = read_yaml(path)
    assert set(values) == {"model", "input", "output", "attention", "batch_size", "workers", "gpus_per_worker"}
    assert values["attention"] == "defects"
    assert all(values[k].startswith("s3://") for k in ("model", "input", "output"))


@pytest.mark.parametrize("path", configs_of("pretrain"), ids=lambda p: p.stem)
def test_pretrain_configs_load_through_the_cli(path: Path) -> None:
    from vitray.cli.pretraining import pretrain_config

    config = pretrain_config(parse(["pretrain", "--config", str(path)]))
    config.check()
    assert config.data.startswith("s3://YOUR-BUCKET/") and config.out.startswith("s3://YOUR-BUCKET/")


def test_evaluate_config_uses_the_held_out_split() -> None:
    (path,) = configs_of("evaluate")
    values = read_yaml(path)
    assert {"model", "data", "out"} <= set(values)
    assert values["data"].rstrip("/").endswith("/test")


@pytest.mark.parametrize("path", [p for c in ("tune", "score", "evaluate") for p in configs_of(c)],
                         ids=lambda p: p.stem)
def test_other_configs_parse_with_their_command(path: Path) -> None:
    command = path.stem.split("-")[0]
    args = parse([command, "--config", str(path)])
    for key, value in read_yaml(path).items():
        assert getattr(args, key) == value, key


# --------------------------------------------------------------------------- every command's --config


def test_every_command_reads_a_config_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "eval.yaml"
    path.write_text("model: m\ndata: d\nout: o\nbatch-size: 64\nverbose: true\n")
    args = parse(["evaluate", "--config", str(path), "--batch-size", "8"])
    assert (args.model, args.data, args.out, args.batch_size, args.verbose) == ("m", "d", "o", 8, True)
    (tmp_path / "score.yaml").write_text("model: m\ninput: i\noutput: o\nattention: all\nlease_timeout: 5\n")
    args = parse(["score", "--config", str(tmp_path / "score.yaml"), "--attention", "none"])
    assert (args.model, args.input, args.attention, args.lease_timeout) == ("m", "i", "none", 5.0)
    (tmp_path / "synth.yaml").write_text("n: 12\nstyle: alt\n")
    args = parse(["synth", "out", "--config", str(tmp_path / "synth.yaml")])
    assert (args.n, args.style, args.size) == (12, "alt", 64)
    (tmp_path / "explain.yaml").write_text("model: m\nout: o\nhead_fusion: max\n")
    args = parse(["explain", "a.png", "--config", str(tmp_path / "explain.yaml")])
    assert (args.model, args.head_fusion, args.images) == ("m", "max", ["a.png"])
    (tmp_path / "params.yaml").write_text("model: vit-tiny\nfinetune: lora:4\njson: true\n")
    args = parse(["params", "--config", str(tmp_path / "params.yaml")])
    assert (args.model, args.finetune, args.json) == ("vit-tiny", "lora:4", True)


@pytest.mark.parametrize("text, needle", [
    ("model: m\nbatchsize: 8\n", "unknown option(s) batchsize for 'vitray evaluate'"),
    ("model: m\nbatch_size: many\n", "batch_size: invalid literal"),
    ("model: m\ndata: d\nformat: tiff\n", "format must be one of"),
    ("- a list\n", "a config must be a mapping"),
    ("data: d\nout: o\n", "--model is required (on the command line or in --config)"),
])
def test_a_bad_config_is_one_line_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture, text: str,
                                                   needle: str) -> None:
    from vitray.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["evaluate", "--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("vitray: error:") and needle in err[0], err


def test_a_job_passes_its_arguments_to_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert entry.run("evaluate", ["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_job_scripts_answer_help(command: str) -> None:
    done = subprocess.run([sys.executable, str(JOBS / f"{command}.py"), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"usage: vitray {command}" in done.stdout and "--config YAML" in done.stdout


# --------------------------------------------------------------------------- runtime environments


def test_runtime_envs_keep_the_upload_small(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import create_package

    plain, pip = read_yaml(JOBS / "runtime_env.yaml"), read_yaml(JOBS / "runtime_env_pip.yaml")
    assert plain["working_dir"] == pip["working_dir"] == "."
    assert plain["excludes"] == pip["excludes"]
    # What `ray job submit` would zip from this checkout: .gitignore plus the excludes.
    package = tmp_path / "working_dir.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=plain["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert "vitray/cli/main.py" in names and "jobs/train.py" in names and "jobs/_entry.py" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/")) or "__pycache__" in n]
    assert package.stat().st_size < 5 * 1024**2, f"{package.stat().st_size} bytes"


def test_runtime_envs_carry_the_malloc_settings() -> None:
    from vitray.runtime import MALLOC_ENV

    for name in ("runtime_env.yaml", "runtime_env_pip.yaml"):
        assert read_yaml(JOBS / name)["env_vars"] == MALLOC_ENV, name


def test_pip_runtime_env_lists_the_project_dependencies_at_the_locked_releases() -> None:
    import re
    import tomllib

    from vitray.versions import canonical, locked_versions

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = locked_versions(str(REPO / "requirements.lock"))
    wanted = []
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        if name == "torch":  # the cluster's own build (CUDA or not), in the project's range
            wanted.append(requirement)
        elif not name.startswith("ray"):  # the cluster runs Ray already
            wanted.append(f"{name}=={locked[canonical(name)]}")
    assert read_yaml(JOBS / "runtime_env_pip.yaml")["pip"] == wanted
    assert "pip" not in read_yaml(JOBS / "runtime_env.yaml"), "the cluster image has the dependencies"


# --------------------------------------------------------------------------- a real job on a real head


HEAD_START_S = 120
# About 80 s on an idle 2-core machine; several times that while other test runs share the cores.
JOB_TIMEOUT_S = 420


class LoopbackHead:
    """`ray start --head --block` on loopback with its own ports and temp dir, in its own session.

    Stopped by its process group, then by PID for any process still in its temp dir:
    never `ray stop`, which would end every Ray on the machine.
    """

    def __init__(self) -> None:
        # Short: Ray's unix sockets live under it, and a socket path has ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")
        gcs, dashboard, client, agent = free_ports(4)
        self.address = f"http://{LOOPBACK}:{dashboard}"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # The job's driver runs `python` from the head's PATH: the venv's, where vitray is installed.
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"
        self.env["NO_PROXY"] = self.env["no_proxy"] = LOOPBACK
        # Ray 2.60 turns token auth on for a new cluster. A token of its own keeps this head
        # apart from ~/.ray/auth_token and lets every `ray` call below present it.
        self.token = secrets.token_hex(32)
        token_file = Path(self.temp_dir) / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.env.pop("RAY_AUTH_TOKEN", None)
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
        self.log = open(Path(self.temp_dir) / "head.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", LOOPBACK,
             "--port", str(gcs), "--dashboard-host", LOOPBACK, "--dashboard-port", str(dashboard),
             "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
             "--num-cpus", "8", "--temp-dir", self.temp_dir, "--disable-usage-stats"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        """Until the job API answers (the dashboard starts after the GCS and raylet)."""
        request = urllib.request.Request(f"{self.address}/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with opener.open(request, timeout=5) as reply:
                    if json.load(reply).get("ray_version"):
                        return
            except OSError as exc:  # refused while starting; the last reason goes in the timeout
                last = exc
            time.sleep(1)
        raise TimeoutError(f"the job API did not answer in {timeout:.0f}s ({last}):\n{self.log_tail()}")

    def ray(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """The `ray` CLI against this head, as a user would type it (from the repository root)."""
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join((Path(self.temp_dir) / "head.log").read_text().splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        # SIGTERM lets the raylet and GCS shut down cleanly; `ray start --block` itself
        # does not always exit on it, so the group gets SIGKILL after the grace period.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        kill_processes_of(self.temp_dir, grace)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

@pytest.fixture
def ray_head() -> Iterator[LoopbackHead]:
    pytest.importorskip("aiohttp", reason="the job API is Ray's dashboard, which needs ray[default]")
    head = LoopbackHead()
    try:
        head.wait_ready(HEAD_START_S)
        yield head
    finally:
        head.stop()


@pytest.mark.slow
def test_train_job_runs_on_a_ray_head(ray_head: LoopbackHead, tmp_path: Path) -> None:
    from vitray.cli import main

    data, out = tmp_path / "data", tmp_path / "out"  # outside the repository, not uploaded
    assert main(["synth", str(data), "--n", "60", "--size", "32", "--format", "imagefolder",
                 "--passed-fraction", "0.2"]) == 0
    job_id = f"vitray-test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    # What a user types, with the runtime env the docs give for a cluster that has vitray;
    # without --no-wait it streams the job's logs and exits 1 if the job failed.
    try:
        for _ in range(12):
            submit = ray_head.ray(
                "job", "submit", "--address", ray_head.address, "--submission-id", job_id, "--working-dir",
                str(REPO), "--runtime-env", str(JOBS / "runtime_env.yaml"), "--", "python", "jobs/train.py",
                "--data", str(data), "--out", str(out), "--epochs", "2", "--workers", "1", timeout=JOB_TIMEOUT_S)
            # A head whose job agent has not registered yet refuses the job before creating it: submit again.
            if "No available agent to submit job" not in submit.stdout + submit.stderr:
                break
            time.sleep(5)
    except subprocess.TimeoutExpired as exc:
        ray_head.ray("job", "stop", "--address", ray_head.address, "--no-wait", job_id, timeout=60)
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"the job ran past {JOB_TIMEOUT_S}s:\n{partial[-4000:]}")
    print(f"train job: {time.monotonic() - started:.0f}s from submit to exit")
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
    status = ray_head.ray("job", "status", "--address", ray_head.address, job_id, timeout=60)
    assert "SUCCEEDED" in status.stdout.upper(), status.stdout + status.stderr
    assert (out / "model" / "config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["labels"]) == {"passed", "Xplus", "Xminus", "Yplus", "Yminus"}
    assert "exported epoch" in submit.stdout, "the driver's report reaches the job's logs"
