"""Bulk scoring with Ray Data, each image committed exactly once under OUT.

`pipeline` holds the run (`score`, `ScoreConfig`), `outputs` the layout of OUT and the
commit protocol (the one module that knows the on-disk format), `report` the HTML page.
"""
from vitray.score.outputs import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    PiecePlan,
    attention_key,
    committed_ids,
    read_errors,
    read_predictions,
    recover,
    write_piece,
)
from vitray.score.pipeline import SCORE_FORMATS, ScoreConfig, score, write_submission

__all__ = ["ERRORS_SCHEMA", "PREDICTIONS_SCHEMA", "PiecePlan", "SCORE_FORMATS", "ScoreConfig", "attention_key",
           "committed_ids", "read_errors", "read_predictions", "recover", "score", "write_piece",
           "write_submission"]
