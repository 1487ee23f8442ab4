"""Bulk scoring with Ray Data, each image committed exactly once under OUT.

`config` holds the run's options (`ScoreConfig`), `pipeline` the run (`score`), `outputs` the layout of OUT and the
commit protocol (the one module that knows the on-disk format), `planning` what is left
to score, `compaction` the rewrite of a run's pieces into large files, `report` the HTML page.
"""
from vitray.score.compaction import compact
from vitray.score.outputs import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    PiecePlan,
    attention_key,
    committed_ids,
    prediction_files,
    read_errors,
    read_predictions,
    recover,
    write_piece,
)
from vitray.score.config import SCORE_FORMATS, ScoreConfig
from vitray.score.pipeline import score, write_submission
from vitray.score.planning import committed_among, plan_run

__all__ = ["ERRORS_SCHEMA", "PREDICTIONS_SCHEMA", "PiecePlan", "SCORE_FORMATS", "ScoreConfig", "attention_key",
           "compact", "committed_among", "committed_ids", "plan_run", "prediction_files", "read_errors",
           "read_predictions", "recover", "score", "write_piece", "write_submission"]
