"""The search itself: Ray Tune runs one Ray Train run per trial, ASHA stops weak ones, a re-run resumes.

`search(SearchConfig(...))` prepares the data once, runs the trials, then writes
OUT/trials.csv, OUT/tune.png and the best trial's best checkpoint as OUT/best/model.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from vitray import storage, tracking
from vitray.errors import VitrayError
from vitray.interrupts import STOP_EXIT_CODES, stop_error
from vitray.train.config import TrainConfig
from vitray.train.data import TrainingData
from vitray.train.run import TrainResult, check_steps
from vitray.tune.results import TrialSummary, export_best, fmt, plot_search, summarize, write_trials_csv
from vitray.tune.space import METRICS, SearchConfig, Space, trial_config

log = logging.getLogger(__name__)

EXPERIMENT = "tune"  # the Tune experiment folder under OUT
SEARCH_RECORD = "search.json"
INTERRUPTED = "{what}; the same command resumes"  # after "interrupted" (Ctrl-C) or "stopped by SIGTERM"
# ASHA keeps the best 1/REDUCTION of the trials at each rung; 2 rather than Tune's 4 because
# vitray searches are small (tens of trials) and noisy early epochs should not decide alone.
REDUCTION = 2
# The trial function only waits on its TorchTrainer, whose workers hold the CPUs; Tune
# refuses a request of nothing, so it asks for a sliver.
TRIAL_CPU = 0.01


@dataclass
class SearchResult:
    out: str
    metric: str
    trials: list[TrialSummary]  # best first
    best: TrialSummary
    model: TrainResult  # the best trial's export under OUT/best
    resumed: bool


def search(config: SearchConfig) -> SearchResult:
    """Run (or resume) a search end to end; outputs land under `config.base.out`.

    A re-run with the same `out` restores the Tune experiment: finished trials stay finished,
    interrupted or failed ones resume from their newest complete Ray Train checkpoint. Ctrl-C,
    SIGTERM and SIGHUP raise a VitrayError with the signal's exit code (130, 143, 129). One search
    per output, by the output's lease.
    """
    from vitray import runs
    from vitray.train.run import check_outside_data

    config.check()
    config = dataclasses.replace(config, base=config.base.located())
    storage.check_output(config.base.out, "--out")
    check_outside_data(config.base.out, config.base.data, config.base.val)
    try:
        with runs.held(config.base.out):
            return _search(config)
    except KeyboardInterrupt:
        raise stop_error(INTERRUPTED.format(what="search {stopped}")) from None


def _search(config: SearchConfig) -> SearchResult:
    import ray.tune

    from vitray.train.data import load_training_data

    # Tune's TensorBoard logger warns once about the labels list in the metrics; the numbers still reach it.
    logging.getLogger("ray.tune.logger.tensorboardx").setLevel(logging.ERROR)
    spaces = config.spaces()
    out = storage.resolve(config.base.out)
    experiment = out.child(EXPERIMENT)
    resumed = _check_resume(config, experiment)
    data = load_training_data(config.base, workers_flag="--workers-per-trial", trial_cpus=TRIAL_CPU)
    batch = spaces["batch_size"].largest if "batch_size" in spaces else config.base.batch_size
    check_steps(data.n_train, config.base.workers, int(batch))
    # One MLflow run for the search (a resumed search goes on in its own); each trial a child run under it.
    search_run = tracking.start(tracking.resolve(config.base.mlflow, config.base.mlflow_experiment),
                                name=f"search {out.uri}", params=_flat(config.record()), resume=resumed)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, base=config.base, data=data, search_run=search_run), {"cpu": TRIAL_CPU})
    try:
        grid = _tuner(config, spaces, out, experiment, resumed, trainable).fit()
        unfinished = unfinished_trials(experiment)
        if unfinished:
            raise stop_error(INTERRUPTED.format(what=f"search {{stopped}} with {unfinished}/{len(grid)} trials "
                                                     "unfinished"))
        trials = summarize(grid, config)
        write_trials_csv(storage.join(out.uri, "trials.csv"), trials, list(spaces), config.metric)
        plot_search(trials, config.metric, storage.join(out.uri, "tune.png"))
        ranked = [t for t in trials if t.best is not None]
        if not ranked:
            errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error)
            raise VitrayError(f"no trial finished an epoch ({errors or 'no errors recorded'})", exit_code=1)
        best = ranked[0]
        model = export_best(config, best, data)
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", None) in STOP_EXIT_CODES
        tracking.end(search_run, "KILLED" if stopped else "FAILED")
        raise
    tracking.log_metrics(search_run, {f"best_{config.metric}": best.best, "trials": len(trials)})
    tracking.log_outputs(search_run, [storage.join(out.uri, n) for n in ("trials.csv", "tune.png")])
    tracking.end(search_run)
    return SearchResult(out.uri, config.metric, trials, best, model, resumed)


def _tuner(config: SearchConfig, spaces: dict[str, Any], out: Any, experiment: Any, resumed: bool,
           trainable: Any) -> Any:
    """The Tune experiment: restored from `experiment` when the search resumes, else a new one."""
    import ray
    import ray.tune
    from ray.tune import Tuner
    from ray.tune.search import BasicVariantGenerator

    if resumed:
        log.info(f"resuming the search in {experiment.uri}")
        return Tuner.restore(experiment.path, trainable=trainable, resume_errored=True, storage_filesystem=out.fs)
    storage.write_json(storage.join(out.uri, SEARCH_RECORD), config.record())
    concurrent = config.max_concurrent or default_concurrency(config.base, ray.cluster_resources())
    log.info(f"searching {', '.join(f'{k}={s}' for k, s in spaces.items())}: {config.samples} trials, "
             f"{concurrent} at a time, {config.scheduler} on {config.metric}")
    return Tuner(
        trainable,
        param_space={name: space.to_tune() for name, space in spaces.items()},
        tune_config=ray.tune.TuneConfig(
            metric=config.metric, mode=config.mode, num_samples=config.samples,
            # Seeded draws: the same command searches the same values. The concurrency limit
            # goes here: Tune ignores max_concurrent_trials beside a variant generator.
            search_alg=BasicVariantGenerator(random_state=config.base.seed, max_concurrent=concurrent),
            scheduler=make_scheduler(config, spaces), trial_dirname_creator=trial_dirname),
        run_config=ray.tune.RunConfig(
            name=EXPERIMENT, storage_path=out.path, storage_filesystem=out.fs,
            verbose=0,  # Tune's status table repeats itself; trial_lines says what matters
            callbacks=[trial_lines(config.metric, list(spaces))]),
    )


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """A search's record as MLflow params: the base options, then each space as space_<name>."""
    return {**record["base"], **{f"space_{k}": v for k, v in record["space"].items()},
            **{k: v for k, v in record.items() if k not in ("base", "space")}}


def _check_resume(config: SearchConfig, experiment: storage.Location) -> bool:
    """True when OUT holds this same search to restore; an error when it holds a different one."""
    from ray.tune import Tuner

    if not Tuner.can_restore(experiment.path, storage_filesystem=experiment.fs):
        return False
    record_uri = storage.join(config.base.out, SEARCH_RECORD)
    if storage.exists(record_uri):
        old = storage.read_json(record_uri)
        if old != config.record():
            changed = sorted(k for k in config.record() if old.get(k) != config.record()[k])
            raise VitrayError(f"{config.base.out} holds another search (its {', '.join(changed)} differ); "
                              f"resume it with the same options or use a new --out")
    return True


def unfinished_trials(experiment: storage.Location) -> int:
    """Trials the saved experiment would resume (after Ctrl-C, Tune saves its state and returns).

    Read back from storage: in memory Tune marks the trials it stopped on Ctrl-C as terminated.
    """
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(experiment.path, storage_filesystem=experiment.fs).trials
    return sum(t.status not in ("TERMINATED", "ERROR") for t in trials)


def default_concurrency(base: TrainConfig, resources: dict[str, float]) -> int:
    """Trials that fit at once: each needs its workers plus a CPU left over for Ray Data's tasks."""
    fits = int(resources.get("CPU", 1) // (base.workers + 1))
    if base.gpus_per_worker > 0:
        fits = min(fits, int(resources.get("GPU", 0) // (base.workers * base.gpus_per_worker)))
    return max(1, fits)


def make_scheduler(config: SearchConfig, spaces: dict[str, Space]) -> Any:
    """ASHA over epochs (a trial's epochs are its budget), or FIFO (every trial runs to its end)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if config.scheduler == "fifo":
        return FIFOScheduler()
    max_t = spaces["epochs"].largest if "epochs" in spaces else config.base.epochs
    # The first rung after an eighth of the longest budget: one epoch of a short search,
    # a few of a long one, when the cosine schedule has left its warm-up.
    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=max(1, max_t // 8),
                         reduction_factor=REDUCTION)


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial is named by its id alone, like the trial's training run."""
    return trial.trial_id


def run_trial(params: dict[str, Any], base: TrainConfig, data: TrainingData, search_run: Any = None) -> None:
    """The Tune trainable: one Ray Train run whose every epoch report reaches Tune (and ASHA).

    Tracked as a child of `search_run` (its MLflow run), when the search is tracked.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from vitray.train.checkpoints import check_resume, prune_checkpoints
    from vitray.train.run import RUN_NAME, fit, make_trainer

    config = trial_config(base, params, ray.tune.get_context().get_trial_id())
    run = storage.join(config.out, RUN_NAME)
    last = _last_report(config)
    if last is not None and last.get("epoch", 0) >= config.epochs:
        # A resumed trial whose run had ended before Tune heard of its last epoch (the search
        # was interrupted in between): training again would report nothing, so report that epoch.
        ray.tune.report(last)
        return
    check_resume(run)
    trial_id = ray.tune.get_context().get_trial_id()
    # A resumed trial goes on in the MLflow run it began.
    tracked = tracking.start(search_run, name=f"trial {trial_id}", params=params, parent=search_run, resume=True)
    try:
        prune_checkpoints(fit(make_trainer(config, data, callbacks=[TuneReportCallback()], tracked=tracked)), run)
    except BaseException as exc:
        tracking.end(tracked, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracking.log_outputs(tracked, [storage.join(config.out, "history.csv")])
    tracking.end(tracked)


def _last_report(config: TrainConfig) -> dict[str, Any] | None:
    """The metrics of the newest complete checkpoint of a trial's training run, if it has one."""
    from vitray.train.checkpoints import complete_checkpoints, read_record
    from vitray.train.run import RUN_NAME

    saved = complete_checkpoints(storage.join(config.out, RUN_NAME))
    return read_record(saved[0][1]).get("metrics") if saved else None


def trial_lines(metric: str, names: Sequence[str]) -> Any:
    """A Tune callback printing one line when a trial starts and one when it ends.

    It replaces Tune's repeated status tables; the class is made here so that importing
    vitray.tune (and `vitray --help`) does not load Ray Tune.
    """
    from ray.tune import Callback

    def values(trial: Any) -> str:
        return " ".join(f"{n}={fmt(trial.config.get(n))}" for n in names)

    class TrialLines(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log.info(f"trial {trial.trial_id} started: {values(trial)}")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            epoch = (trial.last_result or {}).get("epoch")
            best = trial.metric_analysis.get(metric, {}).get(METRICS[metric])
            budget = trial.config.get("epochs")
            ended = sum(t is trial or t.status in ("TERMINATED", "ERROR") for t in trials)  # trial: still RUNNING
            state = "stopped early" if budget and epoch and epoch < int(budget) else "done"
            scores = [t.metric_analysis.get(metric, {}).get(METRICS[metric]) for t in trials]
            scores = [v for v in scores if v is not None]
            so_far = (max if METRICS[metric] == "max" else min)(scores) if scores else None
            running = sum(t.status == "RUNNING" and t is not trial for t in trials)
            log.info(f"trial {trial.trial_id} {state} after epoch {fmt(epoch)}: {values(trial)} "
                     f"best {metric} {fmt(best)}; {ended}/{len(trials)} trials ended, {running} running, "
                     f"best so far {fmt(so_far)}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log.info(f"trial {trial.trial_id} failed: {values(trial)} (its error.txt is in {trial.path})")

    return TrialLines()
