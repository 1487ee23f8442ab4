"""Hyperparameter search over `vitray.train` with Ray Tune: every trial is one Ray Train run.

`space` holds what a search varies (SPACE syntax, `SearchConfig`), `search` the run
(`search`, the trial function, ASHA, resuming), `results` what a finished search
writes (trials.csv, tune.png, the table) and the export of its best trial.
"""
from vitray.tune.results import TrialSummary, format_trials, summarize
from vitray.tune.search import SearchResult, default_concurrency, search
from vitray.tune.space import METRICS, SEARCHABLE, SearchConfig, Space, parse_space, trial_config

__all__ = ["METRICS", "SEARCHABLE", "SearchConfig", "SearchResult", "Space", "TrialSummary", "default_concurrency",
           "format_trials", "parse_space", "search", "summarize", "trial_config"]
