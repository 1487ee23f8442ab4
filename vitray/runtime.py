"""Ray bootstrap: join a cluster when one is named, else start an embedded Ray.

The embedded Ray advertises more logical CPUs than the machine has, so that
Train workers (one CPU each) never leave Ray Data without a slot to run in.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field

from vitray.errors import VitrayError

# On a 2-core machine, 2 Train workers + Ray Data readers + an inference actor
# need room: logical CPUs are slots, not cores.
MIN_LOGICAL_CPUS = 8
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DATA_LOG_LEVEL_ENV = "RAY_DATA_LOG_LEVEL"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
STARTUP_ENV = "RAY_worker_maximum_startup_concurrency"
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # how often Train's controller polls its workers
TRAIN_POLL_S = "0.5"
PREEMPTION_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Train's watcher of node drains, an actor per run
# glibc's malloc hands blocks over 128 kB back to the kernel when they are freed, and gets
# fresh zeroed pages on the next batch: a page fault per 4 kB of every large tensor. Keeping
# blocks up to 32 MiB (glibc's largest mmap threshold) and 256 MiB of free heap in the
# process cuts most of those faults and the time they cost a tiny ViT's forward passes
# (docs/benchmarks.md#what-the-scoring-rate-rests-on). Read by glibc when a process starts:
# Ray's workers get them in the runtime env (jobs/runtime_env*.yaml on a cluster), a running
# process `tune_malloc`.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD


VERBOSE_ENV = "VITRAY_VERBOSE"  # "1": Ray's own logs and every worker's output (the CLI's --verbose)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # a cluster to join; None → RAY_ADDRESS or embedded
    num_cpus: int | None = None  # logical CPUs of an embedded Ray
    # Quiet: vitray's own lines and progress only (workers send theirs through
    # vitray.progress); Ray's logs and the workers' output stay in Ray's log files.
    quiet: bool = field(default_factory=lambda: not verbose())
    # Ray Train's controller cleans up through the state API, which the dashboard serves;
    # scoring and evaluation need neither, and an embedded Ray starts sooner without it
    # (docs/benchmarks.md#start-up-of-a-small-run).
    dashboard: bool = True


# How long joining a named cluster may wait for something to answer at its address: a head
# that is starting answers within seconds; an address where nothing listens otherwise keeps
# ray.init retrying for minutes.
CONNECT_S = 30.0
CONNECT_ENV = "VITRAY_CONNECT_TIMEOUT_S"  # another bound, in seconds
ADDRESS_ENV = "RAY_ADDRESS"
_HOST_PORT = re.compile(r"^(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")


def check_address(address: str | None, where: str = "--ray-address") -> None:
    """Refuse (exit 2) an address ray.init cannot take, before any work: HOST:PORT, ray://HOST:PORT, auto or local."""
    if address is None or address.strip() in ("auto", "local"):
        return
    text = address.strip()
    if text.startswith(("http://", "https://")):
        raise VitrayError(f"{where} {address!r} is the job API's address (`ray job submit --address`); a run joins "
                          "the cluster at HOST:PORT of its head (port 6379) or ray://HOST:10001")
    match = _HOST_PORT.match(text)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise VitrayError(f"{where} {address!r} is not a Ray address: use HOST:PORT (the head's port, 6379 by "
                          "default), ray://HOST:PORT, or auto")


def wait_reachable(address: str, budget_s: float | None = None) -> None:
    """Wait until something listens at the address's HOST:PORT, at most `budget_s`; else one line, exit 1."""
    import socket
    import time

    if budget_s is None:
        try:
            budget_s = float(os.environ.get(CONNECT_ENV, CONNECT_S))
        except ValueError:
            raise VitrayError(f"${CONNECT_ENV} must be a number of seconds, got {os.environ[CONNECT_ENV]!r}") from None

    match = _HOST_PORT.match(address.strip())
    if match is None:  # auto: Ray finds the cluster itself
        return
    host, port = match.group(1).strip("[]"), int(match.group(2))
    deadline = time.monotonic() + budget_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.5, budget_s))):
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if time.monotonic() >= deadline:
                raise VitrayError(
                    f"cannot reach a Ray cluster at {address}: nothing answered at {host}:{port} for "
                    f"{budget_s:.0f} s ({reason}); check that the head runs (`ray status --address {host}:{port}` "
                    f"on a node) and the address, or leave {ADDRESS_ENV} and --ray-address unset to run on an "
                    "embedded Ray", exit_code=1) from None
            time.sleep(1.0)


IN_PROCESS_MAX = 2000  # images: a smaller run on no cluster is done without Ray (score, evaluate)


def runs_in_process(images: int, limit: int, address: str | None, gpus_per_worker: float) -> bool:
    """Whether a run of `images` is done in this process rather than on Ray.

    Only with no cluster named (no `--ray-address`, no RAY_ADDRESS, no Ray already started in
    this process by the program calling vitray), at most `limit` images (0: never): starting
    Ray and its workers costs a few seconds, many times such a run. Both engines take a GPU
    wherever they see one, so on a GPU machine asked for none, Ray (which hides the GPUs from a
    worker asking for none) keeps the run on the CPU.
    """
    if images > limit or address or os.environ.get("RAY_ADDRESS") or ray_started():
        return False
    if gpus_per_worker == 0:
        import torch

        return not torch.cuda.is_available()
    return True


def ray_started() -> bool:
    """Whether this process is connected to a Ray already (a program calling vitray started it);
    Ray is not imported just to ask: that import costs a second."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(getattr(ray, "is_initialized", lambda: False)())


def embedded_cpus() -> int:
    return max(MIN_LOGICAL_CPUS, 2 * (os.cpu_count() or 1))


def malloc_env() -> dict[str, str]:
    """`MALLOC_ENV`, where the caller's environment does not set a variable its own way."""
    return {name: os.environ.get(name, value) for name, value in MALLOC_ENV.items()}


def tune_malloc() -> bool:
    """Apply `malloc_env()` to this running process; False where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # macOS, musl: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    try:
        settings = {_MALLOPT[name]: int(value) for name, value in malloc_env().items()}
    except ValueError:  # the caller's own, unreadable value: glibc ignores it at start-up too
        return False
    return all(mallopt(option, value) == 1 for option, value in settings.items())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Lines that Ray's C++ core writes straight to the driver's stderr, with no switch to turn
# them off, and that say nothing about the user's run. Ray Data's actor pools pass a handle
# to their constructors, and Ray warns about every such actor as if it had large arguments
# (ray-project/ray#57733, open). Only these exact lines are dropped, and only when quiet.
BENIGN_STDERR = re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
                           rb"object store and max_restarts > 0")
_filtering: list[bool] = []


def filter_benign_stderr() -> None:
    """Drop `BENIGN_STDERR` lines from this process's stderr (fd 2), passing everything else on at once."""
    import atexit
    import sys
    import threading

    if _filtering:
        return
    _filtering.append(True)
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not BENIGN_STDERR.search(line))
            if pending and not pending.startswith(b"["):  # not a log line's start: a bar redrawn in place
                out, pending = out + pending, b""
            if out:
                os.write(original, out)
        if pending:
            os.write(original, pending)

    thread = threading.Thread(target=pump, name="vitray-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last writer: the pump drains what is left and ends
        thread.join(timeout=2)

    atexit.register(restore)


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _join_failure(address: str, exc: BaseException) -> str:
    """One line for a cluster that cannot be joined; a missing token is the usual cause.

    Ray logs the refused token only in its C++ lines; its exception says "Failed to connect".
    """
    text = " ".join(str(exc).split())
    line = f"cannot join the Ray cluster at {address}: {text[:200]}"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" or "auth" in text.lower():
        line += ("; if the cluster wants its authentication token (new Ray clusters do), set RAY_AUTH_MODE=token "
                 "and RAY_AUTH_TOKEN_PATH=FILE or RAY_AUTH_TOKEN=TOKEN (`ray get-auth-token` on the head prints it)")
    return line


def init_ray(options: RayOptions | None = None) -> None:
    """Connect to Ray once per process; a no-op when already connected."""
    options = options or RayOptions()
    address = options.address or os.environ.get("RAY_ADDRESS")
    check_address(address, "--ray-address" if options.address else f"${ADDRESS_ENV}")
    loopback = not address or _is_loopback(address)
    if loopback:
        # Ray otherwise takes the machine's outward address as the node address and
        # listens on every interface (an embedded Ray), or rewrites a loopback address to
        # the outward one and cannot reach the cluster it was given (a cluster on this
        # machine). Read when ray is first imported, hence before the import.
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray

    if ray.is_initialized():
        return
    if loopback:
        # Ray reads the variable when it is first imported: if the caller imported ray
        # before this, set what the variable would have set.
        try:  # a private constant: a release that moves it leaves the variable's own effect
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
        except ImportError:
            pass
    env_vars = _worker_env(options.quiet)
    log_level = logging.WARNING if options.quiet else logging.INFO
    # Quiet, the workers' own output (Ray's and PyTorch's chatter) stays in Ray's log files;
    # their errors still reach the driver as exceptions, and their progress through vitray.progress.
    if address:
        wait_reachable(address)
        try:
            ray.init(address=address, logging_level=log_level, log_to_driver=not options.quiet)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as exc:
            raise VitrayError(_join_failure(address, exc)) from exc
    else:
        _start_embedded(options, env_vars, log_level)
    from vitray.interrupts import handle_stop_signals

    handle_stop_signals()  # ray.init put in a SIGTERM handler that exits on the spot: stop as Ctrl-C does
    if options.quiet:
        filter_benign_stderr()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # vitray draws its own progress (vitray.progress); Ray Data's bars show with --verbose.
    ctx.enable_operator_progress_bars = False
    ctx.enable_progress_bars = not options.quiet


def _worker_env(quiet: bool) -> dict[str, str]:
    """The variables every Ray worker gets (and the driver's own logging set to match)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Train V2 is the current Ray Train API; V1 is deprecated. Its print patch shows each
    # worker line twice; Train passes both on to its controller and workers on any cluster.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Train's controller polls its workers every 2 s by default, and steps of a run (the
    # workers up, the end) wait for the next poll, seconds of a small run
    # (docs/benchmarks.md#a-small-training). A poll is one call per worker.
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    env_vars = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                TRAIN_POLL_ENV: os.environ[TRAIN_POLL_ENV], **malloc_env()}
    tune_malloc()  # the driver's own work, such as the benchmark's plain loops
    if quiet:
        # Ray Data logs every execution plan (each epoch, in every Train worker) at INFO and
        # says "progress bars disabled" as a warning; its errors still show. --verbose shows all.
        env_vars[DATA_LOG_LEVEL_ENV] = os.environ.setdefault(DATA_LOG_LEVEL_ENV, "ERROR")
        logging.getLogger("ray.data").setLevel(os.environ[DATA_LOG_LEVEL_ENV])
        # A local Ray turns token authentication on, and says so on every start: keep it on, quietly.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    return env_vars


def _start_embedded(options: RayOptions, env_vars: dict[str, str], log_level: int) -> None:
    """A Ray of this process's own, listening on loopback only."""
    import ray

    port = free_port()
    if options.dashboard:
        # Ray Train's placement-group cleaner finds the state API by looking for "the" local
        # Ray, and fails when another Ray runs on the machine: name ours.
        env_vars[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    # The raylet expects at most min(cores, CPUs) workers to start at once and warns the
    # driver (as "(raylet) WARNING: 8 PYTHON worker processes ...") when a run starts four
    # times that; an embedded Ray's logical CPUs are slots for Train workers, Ray Data's
    # tasks and actors, which do start that many. Its own setting, read when it starts.
    os.environ.setdefault(STARTUP_ENV, str(options.num_cpus or embedded_cpus()))
    # Nothing drains the node of an embedded Ray: Train's preemption watcher (an actor per
    # run, a process to start: docs/benchmarks.md#a-small-training) has nothing to watch.
    # Set before the raylet starts, so that the runs of other processes joining this Ray
    # skip it too.
    os.environ.setdefault(PREEMPTION_ENV, "0")
    env_vars[PREEMPTION_ENV] = os.environ[PREEMPTION_ENV]
    ray.init(num_cpus=options.num_cpus or embedded_cpus(), include_dashboard=options.dashboard,
             dashboard_host="127.0.0.1", dashboard_port=port,
             logging_level=log_level, log_to_driver=not options.quiet,
             # Train V2 patches print() on workers so that each line shows twice; plain print.
             runtime_env={"env_vars": env_vars})
