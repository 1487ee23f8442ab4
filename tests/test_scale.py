"""Outputs that stay cheap as they grow: planning in Arrow, compaction into large files, kills during it."""
from __future__ import annotations

import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pytest

from conftest import INSPECTION_LABELS, as_a_fresh_process_without_ray
from test_score import _piece_batch, noise_pngs, predictions_table
from vitray import storage
from vitray.lease import Lease
from vitray.score import PiecePlan, ScoreConfig, read_predictions, recover, score, write_piece
from vitray.score import compaction
from vitray.score.compaction import compact, flat_pieces
from vitray.score.planning import committed_among, plan_run

RUN_A, RUN_B = "20260101T020000Z-aaaaaa", "20260102T020000Z-bbbbbb"


def commit_pieces(out: str, run_id: str, ids: list[str], rows: int) -> None:
    """Commit `ids` as pieces of `rows` rows, the way a run's writer stage does."""
    plan = PiecePlan(out, run_id, "m", tuple(INSPECTION_LABELS), (8, 8), "/in")
    with Lease(out, run_id):
        for start in range(0, len(ids), rows):
            write_piece(_piece_batch(ids[start:start + rows]), plan)


def ids_once(out: str) -> list[str]:
    """The committed ids as vitray reads them, asserting each appears once."""
    ids = read_predictions(out).to_table(columns=["id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)), "an id is visible twice"
    return sorted(ids)


def parquet_files(out: str) -> list[str]:
    """The visible Parquet files under predictions/, relative to it (local outputs)."""
    folder = Path(out, "predictions")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet") if not p.name.startswith("."))


# --------------------------------------------------------------------------- compaction


def test_pieces_become_one_file_per_run_and_rows_per_file_readable_as_one_table(tmp_path):
    out = str(tmp_path / "out")
    a = [f"a/{i:03d}.png" for i in range(23)]
    b = [f"b/{i:03d}.png" for i in range(7)]
    commit_pieces(out, RUN_A, a, rows=4)
    commit_pieces(out, RUN_B, b, rows=4)
    assert len(parquet_files(out)) == 8

    done = compact(out, rows_per_file=10)

    assert done == {"pieces": 8, "files": 4, "rows": 30}
    files = parquet_files(out)
    # Run A: 23 rows in pieces of 4 → files of at most 10 rows (8, 8, 7); run B: one file.
    assert [f.split("/")[0] for f in files] == [f"run={RUN_A}"] * 3 + [f"run={RUN_B}"]
    assert ids_once(out) == sorted(a + b)
    assert flat_pieces(storage.resolve(out)) == {}
    # Each file sorted by id: its id range is narrow, which planning skips by.
    for name in files:
        ids = pads.dataset(os.path.join(out, "predictions", name)).to_table(columns=["id"]).column(0).to_pylist()
        assert ids == sorted(ids) and len(ids) <= 10
    # One table for plain pyarrow and for DuckDB, partitioned by run.
    assert sorted(predictions_table(out).column("id").to_pylist()) == sorted(a + b)
    rows = duckdb.sql(f"select run, count(*) as n, count(distinct id) as ids from read_parquet("
                      f"'{out}/predictions/*/*.parquet', hive_partitioning = true) group by run order by run").fetchall()
    assert rows == [(RUN_A, 23, 23), (RUN_B, 7, 7)]
    assert compact(out, rows_per_file=10) == {"pieces": 0, "files": 0, "rows": 0}  # nothing left to do


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def steps_of_compaction(out: str) -> int:
    """How many writes and deletes one compaction of the output's pieces makes."""
    calls = {"n": 0}
    put, delete = compaction.storage.put, compaction.storage.delete

    def counting(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compaction.storage, "put", counting(put))
        mp.setattr(compaction.storage, "delete", counting(delete))
        compact(out, rows_per_file=100)
    return calls["n"]


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_kill_at_every_step_of_compaction_keeps_each_id_once(where, tmp_path, request):
    ids = [f"cam/{i:03d}.png" for i in range(12)]
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_prefix")
    probe = f"{base}/probe"
    commit_pieces(probe, RUN_A, ids, rows=4)
    steps = steps_of_compaction(probe)
    assert steps == 6  # the marker, the target, three pieces deleted, the marker deleted

    for step in range(steps):  # killed before each of them
        out = f"{base}/kill-{step}"
        commit_pieces(out, RUN_A, ids, rows=4)
        calls = {"n": 0}
        real_put, real_delete = storage.put, storage.delete

        def dies_at(real):
            def call(*args, **kwargs):
                if calls["n"] == step:
                    raise Killed
                calls["n"] += 1
                return real(*args, **kwargs)
            return call

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(compaction.storage, "put", dies_at(real_put))
            mp.setattr(compaction.storage, "delete", dies_at(real_delete))
            with pytest.raises(Killed):
                compact(out, rows_per_file=100)
        assert ids_once(out) == ids, f"killed at step {step}"
        if where == "local" and step == 1:  # killed while the target was being written: a hidden temp
            target = Path(out, "predictions", f"run={RUN_A}")
            target.mkdir(exist_ok=True)
            (target / ".part-0123.parquet.tmp-1-abc").write_bytes(b"PAR1 half")
            assert ids_once(out) == ids

        found = recover(out)  # the next run, holding the lease

        assert found["compactions_finished"] + found["compactions_undone"] == (1 if step else 0)
        assert found["compactions_finished"] == (1 if step >= 2 else 0)  # the target was whole
        assert ids_once(out) == ids
        assert storage.list_files(f"{out}/_compacting") == []
        compact(out, rows_per_file=100)
        assert ids_once(out) == ids
        assert read_predictions(out).files[0].endswith(f"run={RUN_A}/" + os.path.basename(
            read_predictions(out).files[0])) and len(read_predictions(out).files) == 1
        if where == "local":
            assert not [p for p in Path(out).rglob(".*")], f"killed at step {step}: temp files left"


# --------------------------------------------------------------------------- planning


def test_planning_finds_the_committed_ids_among_tonights_in_input_order(tmp_path):
    out = str(tmp_path / "out")
    old = [f"2026-01-01/{i:04d}.png" for i in range(300)]
    commit_pieces(out, RUN_A, old, rows=50)
    compact(out, rows_per_file=100)
    commit_pieces(out, RUN_B, ["2026-01-02/0000.png"], rows=50)  # a piece not compacted yet

    tonight = ["2026-01-02/0002.png", "2026-01-01/0007.png", "2026-01-02/0000.png", "2026-01-02/0001.png"]
    planned = plan_run(out, tonight)

    assert planned.remaining == ["2026-01-02/0002.png", "2026-01-02/0001.png"]
    assert planned.skipped == 2
    import pyarrow as pa

    assert sorted(committed_among(out, pa.array(tonight)).to_pylist()) == ["2026-01-01/0007.png",
                                                                           "2026-01-02/0000.png"]
    assert plan_run(out, []).remaining == [] and plan_run(str(tmp_path / "none"), tonight).remaining == tonight


# --------------------------------------------------------------------------- outputs written before compaction


def test_an_output_of_flat_pieces_is_resumed_exactly_once_and_compacted(tiny_model, tmp_path, monkeypatch):
    """An output whose pieces lie flat in predictions/ (as vitray wrote them without compaction),
    one of them killed before its commit, is finished by a run, each image once."""
    data, out = tmp_path / "night", str(tmp_path / "out")
    first = [f"cam/{i:02d}.png" for i in range(10)]
    noise_pngs(data, first)
    as_a_fresh_process_without_ray(monkeypatch)
    config = ScoreConfig(model=tiny_model, input=str(data), output=out, attention="all", piece_rows=3)
    with monkeypatch.context() as mp:
        mp.setattr("vitray.score.pipeline.compact", lambda output: {})
        score(config)
    flat = sorted(os.listdir(Path(out, "predictions")))
    assert len(flat) == 4 and all(name.startswith("part-") for name in flat)
    (Path(out) / "_pending").mkdir(exist_ok=True)
    (Path(out, "_pending") / "20250101T000000Z-abcdef-0123456789abcdef.json").write_text('{"pngs": []}')
    noise_pngs(data, [f"cam/{i:02d}.png" for i in range(10, 14)], seed=3)

    again = score(config)

    assert again["counts"]["scored"] == 4 and again["counts"]["skipped"] == 10
    assert ids_once(out) == sorted(f"cam/{i:02d}.png" for i in range(14))
    assert sorted(predictions_table(out).column("id").to_pylist()) == ids_once(out)
    runs = sorted({f.split("/")[0] for f in parquet_files(out)})
    assert len(runs) == 2 and all(r.startswith("run=") for r in runs)
    assert len(parquet_files(out)) == 2  # one file per run: below 50,000 rows each
    assert again["compacted"] == {"pieces": 6, "files": 2, "rows": 14}
    assert not list(Path(out, "_pending").iterdir())
    nothing = score(config)
    assert nothing["counts"]["scored"] == 0 and nothing["counts"]["skipped"] == 14
    assert nothing["compacted"] == {"pieces": 0, "files": 0, "rows": 0}
    assert np.isclose(sum(predictions_table(out).column("score").to_numpy() > 0), 14)


def test_a_marker_that_is_not_vitrays_blocks_neither_reading_nor_recovery(tmp_path):
    out = str(tmp_path / "out")
    commit_pieces(out, RUN_A, ["a.png", "b.png"], rows=1)
    Path(out, "_compacting").mkdir()
    Path(out, "_compacting", "notes.json").write_text("not json")

    assert ids_once(out) == ["a.png", "b.png"]
    assert recover(out)["compactions_undone"] == 0
    assert compact(out)["files"] == 1 and ids_once(out) == ["a.png", "b.png"]
