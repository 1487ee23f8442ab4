"""Hyperparameter search over `vitray.train` with Ray Tune: every trial is one Ray Train run.

`search(SearchConfig(...))` prepares the data once, runs the trials (ASHA stops weak ones early),
then writes OUT/trials.csv, OUT/tune.png and the best trial's best checkpoint as OUT/best/model.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from vitray import storage
from vitray.errors import VitrayError
from vitray.train import Prepared, TrainConfig, TrainResult

log = logging.getLogger(__name__)

# Options a search may vary, with the type a trial's value takes.
SEARCHABLE: dict[str, type] = {"lr": float, "epochs": int, "batch_size": int, "finetune": str}
SPACE_KINDS = ("loguniform", "uniform", "choice")
SPACE_SYNTAX = "loguniform:LOW:HIGH, uniform:LOW:HIGH, choice:A,B,C or a single value"
# What a search can rank trials by (all reported every epoch), and which way is better.
METRICS = {"val_macro_f1": "max", "val_accuracy": "max", "val_loss": "min"}
SCHEDULERS = ("asha", "fifo")
EXPERIMENT = "tune"  # the Tune experiment folder under OUT
SEARCH_RECORD = "search.json"
INTERRUPTED = "{what}; the same command resumes"  # the line of a Ctrl-C (exit 130)
# ASHA keeps the best 1/REDUCTION of the trials at each rung; 2 rather than Tune's 4 because
# vitray searches are small (tens of trials) and noisy early epochs should not decide alone.
REDUCTION = 2
# The trial function only waits on its TorchTrainer, whose workers hold the CPUs; Tune
# refuses a request of nothing, so it asks for a sliver.
TRIAL_CPU = 0.01


@dataclass(frozen=True)
class Space:
    """One searched option: a single value, a choice, or a (log-)uniform range."""

    name: str  # the TrainConfig field
    kind: str  # "value", "choice", "uniform" or "loguniform"
    values: tuple[Any, ...]  # the value, the choices, or (low, high)

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "value":
            return self.values[0]
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if SEARCHABLE[self.name] is int:  # whole numbers, both bounds included
            return (tune.lograndint if self.kind == "loguniform" else tune.randint)(low, high + 1)
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(low, high)

    @property
    def largest(self) -> Any:
        return max(self.values) if SEARCHABLE[self.name] is not str else None

    def __str__(self) -> str:
        if self.kind == "value":
            return str(self.values[0])
        sep = "," if self.kind == "choice" else ":"
        return f"{self.kind}:{sep.join(str(v) for v in self.values)}"


def parse_space(name: str, spec: Any) -> Space:
    """A SPACE (`loguniform:1e-4:1e-2`, `uniform:..`, `choice:a,b`, a value, or a YAML list) for option `name`."""
    if name not in SEARCHABLE:
        raise VitrayError(f"--{_flag(name)} cannot be searched (searchable: "
                          f"{', '.join('--' + _flag(n) for n in SEARCHABLE)})")
    cast = SEARCHABLE[name]
    if isinstance(spec, (list, tuple)):
        kind, parts = "choice", [str(v) for v in spec]
    else:
        text = str(spec).strip()
        head, sep, rest = text.partition(":")
        # `last:2` is a fine-tune policy, not a space: only the three space names open one.
        if sep and head.lower() in SPACE_KINDS:
            kind = head.lower()
            parts = rest.split(",") if kind == "choice" else rest.split(":")
        else:
            kind, parts = "value", [text]
    parts = [p.strip() for p in parts]
    where = f"--{_flag(name)} {spec!r}"
    if not parts or any(p == "" for p in parts):
        raise VitrayError(f"{where}: empty value (use {SPACE_SYNTAX})")
    if kind in ("uniform", "loguniform") and len(parts) != 2:
        raise VitrayError(f"{where}: {kind} needs LOW:HIGH (use {SPACE_SYNTAX})")
    if kind in ("uniform", "loguniform") and cast is str:
        raise VitrayError(f"{where}: a range needs numbers; use choice:A,B or a single value")
    try:
        values = tuple(_cast(cast, p) for p in parts)
    except ValueError:
        what = "a whole number" if cast is int else "a number"
        raise VitrayError(f"{where}: not {what} or a search space (use {SPACE_SYNTAX})") from None
    if kind in ("uniform", "loguniform"):
        low, high = values
        if not low < high:
            raise VitrayError(f"{where}: LOW must be below HIGH")
        if kind == "loguniform" and low <= 0:
            raise VitrayError(f"{where}: loguniform needs LOW > 0")
    if kind == "choice":
        values = tuple(dict.fromkeys(values))  # a repeated choice would only bias the draw
    return Space(name, kind, values)


def _cast(cast: type, text: str) -> Any:
    if cast is int:
        number = float(text)
        if not number.is_integer():
            raise ValueError(text)
        return int(number)
    return cast(text)


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class SearchConfig:
    """Every option of a search, with its one default; trial options not searched come from `base`."""

    base: TrainConfig  # data, out and everything the trials share (base.workers: workers per trial)
    space: dict[str, Any] = field(default_factory=dict)  # TrainConfig field -> SPACE text (or list)
    samples: int = 8
    scheduler: str = "asha"
    metric: str = "val_macro_f1"
    max_concurrent: int | None = None  # None: as many trials as the cluster's CPUs (and GPUs) hold

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    def spaces(self) -> dict[str, Space]:
        """The parsed spaces; with none given, the learning rate a decade either side of its default."""
        given = self.space or {"lr": f"loguniform:{self.base.resolved_lr() / 10:g}:"
                                      f"{min(0.5, self.base.resolved_lr() * 10):g}"}
        return {name: parse_space(name, spec) for name, spec in given.items()}

    def check(self) -> None:
        """Refuse bad values, including every edge of every space, before any work starts."""
        if self.samples < 1:
            raise VitrayError(f"--samples must be at least 1, got {self.samples}")
        if self.scheduler not in SCHEDULERS:
            raise VitrayError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler}")
        if self.metric not in METRICS:
            raise VitrayError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise VitrayError(f"--max-concurrent must be at least 1, got {self.max_concurrent}")
        self.base.check()
        for name, space in self.spaces().items():
            for value in space.values:
                try:
                    dataclasses.replace(self.base, **{name: value}).check()
                except VitrayError as exc:
                    raise VitrayError(f"--{_flag(name)} {space}: {exc}") from None

    def record(self) -> dict[str, Any]:
        """What makes a search this search: a re-run with another record must not resume it."""
        base = {k: v for k, v in asdict(self.base).items() if k not in ("out", "ray_address", "shared_fs")}
        return {"base": base, "space": {k: str(s) for k, s in self.spaces().items()},
                "samples": self.samples, "scheduler": self.scheduler, "metric": self.metric}


@dataclass
class TrialSummary:
    """One trial as trials.csv shows it, with its learning curve."""

    trial_id: str
    params: dict[str, Any]  # the searched values
    status: str  # completed | stopped early | error
    best: float | None  # best value of the metric over the reported epochs
    best_epoch: int | None
    epochs_run: int
    history: list[dict[str, Any]]  # one row per reported epoch
    out: str  # the trial's training run (OUT/trials/<trial_id>)
    error: str | None = None


@dataclass
class SearchResult:
    out: str
    metric: str
    trials: list[TrialSummary]  # best first
    best: TrialSummary
    model: TrainResult  # the best trial's export under OUT/best
    resumed: bool


# --------------------------------------------------------------------------- driver


def search(config: SearchConfig) -> SearchResult:
    """Run (or resume) a search end to end; outputs land under `config.base.out`.

    A re-run with the same `out` restores the Tune experiment: finished trials stay finished,
    interrupted or failed ones resume from their newest complete Ray Train checkpoint. Ctrl-C
    raises a VitrayError with exit code 130.
    """
    config.check()
    storage.check_output(config.base.out, "--out")
    try:
        return _search(config)
    except KeyboardInterrupt:
        raise VitrayError(INTERRUPTED.format(what="search interrupted"), exit_code=130) from None


def _search(config: SearchConfig) -> SearchResult:
    import ray
    import ray.tune
    from ray.tune import Tuner
    from ray.tune.search import BasicVariantGenerator

    from vitray.train import prepare

    # Tune's TensorBoard logger warns once about the labels list in the metrics; the numbers still reach it.
    logging.getLogger("ray.tune.logger.tensorboardx").setLevel(logging.ERROR)
    spaces = config.spaces()
    out = storage.resolve(config.base.out)
    experiment = out.child(EXPERIMENT)
    resumed = _check_resume(config, experiment)
    prepared = prepare(config.base, workers_flag="--workers-per-trial", trial_cpus=TRIAL_CPU)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, base=config.base, prepared=prepared), {"cpu": TRIAL_CPU})
    if resumed:
        log.info(f"resuming the search in {experiment.uri}")
        tuner = Tuner.restore(experiment.path, trainable=trainable, resume_errored=True,
                              storage_filesystem=out.fs)
    else:
        storage.write_json(storage.join(out.uri, SEARCH_RECORD), config.record())
        concurrent = config.max_concurrent or default_concurrency(config.base, ray.cluster_resources())
        log.info(f"searching {', '.join(f'{k}={s}' for k, s in spaces.items())}: {config.samples} trials, "
              f"{concurrent} at a time, {config.scheduler} on {config.metric}")
        tuner = Tuner(
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
    grid = tuner.fit()
    unfinished = unfinished_trials(experiment)
    if unfinished:
        raise VitrayError(INTERRUPTED.format(what=f"search interrupted with {unfinished}/{len(grid)} trials "
                                                  f"unfinished"), exit_code=130)
    trials = summarize(grid, config)
    write_trials_csv(storage.join(out.uri, "trials.csv"), trials, list(spaces), config.metric)
    plot_search(trials, config.metric, storage.join(out.uri, "tune.png"))
    ranked = [t for t in trials if t.best is not None]
    if not ranked:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error)
        raise VitrayError(f"no trial finished an epoch ({errors or 'no errors recorded'})", exit_code=1)
    best = ranked[0]
    model = export_best(config, best, prepared)
    return SearchResult(out.uri, config.metric, trials, best, model, resumed)


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


def trial_config(base: TrainConfig, params: dict[str, Any], trial_id: str) -> TrainConfig:
    """The TrainConfig of one trial: the base with the trial's values, stored under OUT/trials/<id>.

    The folder depends only on the trial id, which Tune keeps on restore, so that a resumed
    trial finds its own Ray Train run there and continues from its last checkpoint.
    """
    values = {name: _cast(SEARCHABLE[name], str(value)) for name, value in params.items() if name in SEARCHABLE}
    return dataclasses.replace(base, **values, out=storage.join(base.out, "trials", trial_id))


def run_trial(params: dict[str, Any], base: TrainConfig, prepared: Prepared) -> None:
    """The Tune trainable: one Ray Train run whose every epoch report reaches Tune (and ASHA)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from vitray.checkpoints import check_resume, prune_checkpoints
    from vitray.train import RUN_NAME, fit, make_trainer

    config = trial_config(base, params, ray.tune.get_context().get_trial_id())
    run = storage.join(config.out, RUN_NAME)
    last = _last_report(config)
    if last is not None and last.get("epoch", 0) >= config.epochs:
        # A resumed trial whose run had ended before Tune heard of its last epoch (the search
        # was interrupted in between): training again would report nothing, so report that epoch.
        ray.tune.report(last)
        return
    check_resume(run)
    prune_checkpoints(fit(make_trainer(config, prepared, callbacks=[TuneReportCallback()])), run)


def _last_report(config: TrainConfig) -> dict[str, Any] | None:
    """The metrics of the newest complete checkpoint of a trial's training run, if it has one."""
    from vitray.checkpoints import complete_checkpoints, read_record
    from vitray.train import RUN_NAME

    saved = complete_checkpoints(storage.join(config.out, RUN_NAME))
    return read_record(saved[0][1]).get("metrics") if saved else None


def trial_lines(metric: str, names: Sequence[str]) -> Any:
    """A Tune callback printing one line when a trial starts and one when it ends.

    It replaces Tune's repeated status tables; the class is made here so that importing
    vitray.tune (and `vitray --help`) does not load Ray Tune.
    """
    from ray.tune import Callback

    def values(trial: Any) -> str:
        return " ".join(f"{n}={_fmt(trial.config.get(n))}" for n in names)

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
            log.info(f"trial {trial.trial_id} {state} after epoch {_fmt(epoch)}: {values(trial)} "
                     f"best {metric} {_fmt(best)}; {ended}/{len(trials)} trials ended, {running} running, "
                     f"best so far {_fmt(so_far)}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log.info(f"trial {trial.trial_id} failed: {values(trial)} (its error.txt is in {trial.path})")

    return TrialLines()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


# --------------------------------------------------------------------------- results


def summarize(grid: Any, config: SearchConfig) -> list[TrialSummary]:
    """Every trial of a ResultGrid as a TrialSummary, best first (ties: lower validation loss)."""
    import pandas as pd

    from vitray.faults import innermost_line

    sign = 1.0 if config.mode == "max" else -1.0
    trials = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
        params = {k: v for k, v in (result.config or {}).items() if k in SEARCHABLE}
        trial = trial_config(config.base, params, trial_id)
        frame = result.metrics_dataframe
        history: list[dict[str, Any]] = []
        if frame is not None and "epoch" in frame:
            frame = frame.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
            keep = [c for c in ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr")
                    if c in frame]
            history = [{k: (None if pd.isna(v) else v) for k, v in row.items()}
                       for row in frame[keep].to_dict("records")]
            for row in history:
                row["epoch"] = int(row["epoch"])
        scored = [h for h in history if h.get(config.metric) is not None]
        top = max(scored, key=lambda h: epoch_rank(h, config.metric, sign)) if scored else None
        epochs_run = max((h["epoch"] for h in history), default=0)
        if result.error is not None:
            status = "error"
        else:
            status = "completed" if epochs_run >= trial.epochs else "stopped early"
        trials.append(TrialSummary(
            trial_id=trial_id, params=params, status=status,
            best=float(top[config.metric]) if top else None, best_epoch=top["epoch"] if top else None,
            epochs_run=epochs_run, history=history, out=trial.out,
            error=innermost_line(result.error) if result.error is not None else None))

    def rank(t: TrialSummary) -> tuple:
        if t.best is None:
            return (1, 0.0, 0.0, t.trial_id)
        loss = next((h.get("val_loss") for h in t.history if h["epoch"] == t.best_epoch), None)
        return (0, -sign * t.best, loss if loss is not None else math.inf, t.trial_id)

    return sorted(trials, key=rank)


def epoch_rank(metrics: dict[str, Any], metric: str, sign: float) -> tuple[float, float]:
    """Sorts a trial's epochs, better last: by the metric, then by the lower validation loss.

    Ties are common on small validation sets (macro-F1 moves in steps); the loss breaks them.
    """
    loss = metrics.get("val_loss")
    return sign * metrics[metric], -(loss if loss is not None else math.inf)


def export_best(config: SearchConfig, best: TrialSummary, prepared: Prepared) -> TrainResult:
    """`finish()` of the best trial into OUT/best: its checkpoint that is best by the search's metric."""
    import ray.train

    from vitray.train import RUN_NAME, finish

    trial = trial_config(config.base, best.params, best.trial_id)
    run = storage.resolve(storage.join(trial.out, RUN_NAME))
    result = ray.train.Result.from_path(run.path, storage_filesystem=run.fs)
    sign = 1.0 if config.mode == "max" else -1.0
    kept = [(c, m) for c, m in (result.best_checkpoints or []) if config.metric in m]
    if not kept:
        raise VitrayError(f"trial {best.trial_id} left no checkpoint in {run.uri}", exit_code=1)
    # finish() takes the best of the checkpoints it is given by macro-F1; give it only the one
    # this search ranks first (the epoch trials.csv names), whatever the --metric.
    chosen = max(kept, key=lambda cm: epoch_rank(cm[1], config.metric, sign))
    if chosen[1]["epoch"] != best.best_epoch:
        # Ray Train keeps the 2 best checkpoints by macro-F1 (and the latest): with another
        # --metric the best epoch's checkpoint may be gone.
        log.warning("trial %s kept no checkpoint of epoch %s; exporting epoch %s, its best kept by %s",
                    best.trial_id, best.best_epoch, chosen[1]["epoch"], config.metric)
    result = dataclasses.replace(result, best_checkpoints=[chosen])
    if trial.finetune != config.base.finetune:  # the parameter report of the trial's own policy
        prepared = dataclasses.replace(prepared, params=_params(trial, prepared))
    return finish(dataclasses.replace(trial, out=storage.join(config.base.out, "best")), result, prepared)


def _params(config: TrainConfig, prepared: Prepared) -> dict[str, Any]:
    from vitray.models import params_for

    return params_for(config.model, config.finetune, n_labels=len(prepared.labels), image_size=prepared.prep.size,
                      channels=prepared.prep.channels)


def trial_columns(names: Sequence[str], metric: str) -> list[str]:
    return ["rank", "trial_id", *names, f"best_{metric}", "best_epoch", "epochs_run", "status", "out"]


def write_trials_csv(uri: str, trials: list[TrialSummary], names: Sequence[str], metric: str) -> None:
    """One row per trial, best first: its id, searched values, best metric, epochs run and status."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(trial_columns(names, metric))
    for i, t in enumerate(trials, 1):
        writer.writerow([i if t.best is not None else "", t.trial_id, *(t.params.get(n) for n in names),
                         "" if t.best is None else round(t.best, 6), t.best_epoch or "", t.epochs_run, t.status,
                         t.out])
    storage.write_bytes(uri, buf.getvalue().encode())


def format_trials(trials: list[TrialSummary], names: Sequence[str], metric: str) -> str:
    """The final terminal table: one line per trial, best first."""
    header = ["#", "trial", *names, metric, "epoch", "epochs", "status"]
    rows = [[str(i) if t.best is not None else "-", t.trial_id, *(_fmt(t.params.get(n)) for n in names),
             _fmt(t.best), _fmt(t.best_epoch), str(t.epochs_run), t.status] for i, t in enumerate(trials, 1)]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def plot_search(trials: list[TrialSummary], metric: str, uri: str) -> None:
    """PNG: the metric against lr and against epochs (each trial's best), and every learning curve."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import MaxNLocator, NullFormatter

    fig = Figure(figsize=(14, 4.2), layout="constrained")
    ax_lr, ax_ep, ax_curve = fig.subplots(1, 3)
    done = [t for t in trials if t.best is not None]
    best = done[0] if done else None
    colours = {"completed": "tab:blue", "stopped early": "tab:orange", "error": "tab:red"}
    for ax, key, label in ((ax_lr, "lr", "learning rate"), (ax_ep, "epochs", "epochs (trial budget)")):
        for status, colour in colours.items():
            points = [(float(t.params[key]), t.best) for t in done if t.status == status and key in t.params]
            if points:
                ax.scatter(*zip(*points), color=colour, label=status, s=36, zorder=3)
        if best is not None and key in best.params:
            ax.scatter([float(best.params[key])], [best.best], s=160, facecolors="none", edgecolors="black",
                       linewidths=1.5, label="best", zorder=4)
        if not ax.collections:
            ax.text(0.5, 0.5, f"{key} not searched", transform=ax.transAxes, ha="center", va="center",
                    color="grey")
        if key == "lr" and ax.collections:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap within a decade
        if key == "epochs":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(label)
        ax.set_ylabel(f"best {metric}")
        ax.set_title(f"best {metric} by {key}", fontsize=11)
        ax.grid(alpha=0.3)
        if ax.collections:
            ax.legend(fontsize=8)
    for t in trials:
        xs = [h["epoch"] for h in t.history if h.get(metric) is not None]
        ys = [h[metric] for h in t.history if h.get(metric) is not None]
        if xs:
            is_best = t is best
            ax_curve.plot(xs, ys, marker="o", markersize=3, linewidth=2.2 if is_best else 1.0,
                          alpha=1.0 if is_best else 0.55, color="black" if is_best else None,
                          label=f"{t.trial_id} (best)" if is_best else None, zorder=3 if is_best else 2)
    ax_curve.set_title(f"learning curves ({len(trials)} trials)", fontsize=11)
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel(metric)
    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.grid(alpha=0.3)
    if best is not None:
        ax_curve.legend(fontsize=8)
    from vitray.evaluate import save_figure

    save_figure(fig, uri, dpi=110)
