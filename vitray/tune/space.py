"""What a search varies and how: SPACE syntax, `SearchConfig`, and the TrainConfig of one trial."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from vitray import storage
from vitray.errors import VitrayError
from vitray.train.config import TrainConfig

# Options a search may vary, with the type a trial's value takes.
SEARCHABLE: dict[str, type] = {"lr": float, "epochs": int, "batch_size": int, "finetune": str}
SPACE_KINDS = ("loguniform", "uniform", "choice")
SPACE_SYNTAX = "loguniform:LOW:HIGH, uniform:LOW:HIGH, choice:A,B,C or a single value"
# What a search can rank trials by (all reported every epoch), and which way is better.
METRICS = {"val_macro_f1": "max", "val_accuracy": "max", "val_loss": "min"}
SCHEDULERS = ("asha", "fifo")


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
        base = {k: v for k, v in asdict(self.base).items()
                if k not in ("out", "ray_address", "shared_fs", "mlflow", "mlflow_experiment")}
        return {"base": base, "space": {k: str(s) for k, s in self.spaces().items()},
                "samples": self.samples, "scheduler": self.scheduler, "metric": self.metric}


def trial_config(base: TrainConfig, params: dict[str, Any], trial_id: str) -> TrainConfig:
    """The TrainConfig of one trial: the base with the trial's values, stored under OUT/trials/<id>.

    The folder depends only on the trial id, which Tune keeps on restore, so that a resumed
    trial finds its own Ray Train run there and continues from its last checkpoint.
    """
    values = {name: _cast(SEARCHABLE[name], str(value)) for name, value in params.items() if name in SEARCHABLE}
    return dataclasses.replace(base, **values, out=storage.join(base.out, "trials", trial_id))
