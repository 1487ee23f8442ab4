"""A finished search read back: one summary per trial, trials.csv, the terminal table, tune.png, the best model."""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

from vitray import storage
from vitray.errors import VitrayError
from vitray.train.config import TrainConfig
from vitray.train.data import TrainingData
from vitray.train.run import TrainResult
from vitray.tune.space import SEARCHABLE, SearchConfig, trial_config

log = logging.getLogger(__name__)


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


def summarize(grid: Any, config: SearchConfig) -> list[TrialSummary]:
    """Every trial of a ResultGrid as a TrialSummary, best first (ties: lower validation loss).

    Not `ResultGrid.get_best_result(scope="all")` or `get_dataframe(filter_metric=...)`: those
    rank by the metric alone and take the first epoch that reaches it, and on a validation set
    of a few hundred images macro-F1 moves in steps, so ties between epochs and trials are
    common; the validation loss breaks them, the same way `export_best` picks the checkpoint.
    """
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


def export_best(config: SearchConfig, best: TrialSummary, data: TrainingData) -> TrainResult:
    """`finish()` of the best trial into OUT/best: its checkpoint that is best by the search's metric."""
    import ray.train

    from vitray.train.run import RUN_NAME, finish

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
        data = dataclasses.replace(data, params=_params(trial, data))
    return finish(dataclasses.replace(trial, out=storage.join(config.base.out, "best")), result, data)


def _params(config: TrainConfig, data: TrainingData) -> dict[str, Any]:
    from vitray.models import params_for

    return params_for(config.model, config.finetune, n_labels=len(data.labels), image_size=data.prep.size,
                      channels=data.prep.channels)


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
    rows = [[str(i) if t.best is not None else "-", t.trial_id, *(fmt(t.params.get(n)) for n in names),
             fmt(t.best), fmt(t.best_epoch), str(t.epochs_run), t.status] for i, t in enumerate(trials, 1)]
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
    from vitray.figures import save_figure

    save_figure(fig, uri, dpi=110)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
