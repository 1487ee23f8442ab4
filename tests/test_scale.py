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


WRITES = ("put", "put_file", "delete")  # compaction's steps: each a call of one of these


def steps_of_compaction(out: str) -> int:
    """How many writes and deletes one compaction of the output's pieces makes."""
    calls = {"n": 0}

    def counting(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as mp:
        for name in WRITES:
            mp.setattr(compaction.storage, name, counting(getattr(storage, name)))
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

        def dies_at(real):
            def call(*args, **kwargs):
                if calls["n"] == step:
                    raise Killed
                calls["n"] += 1
                return real(*args, **kwargs)
            return call

        with pytest.MonkeyPatch.context() as mp:
            for name in WRITES:
                mp.setattr(compaction.storage, name, dies_at(getattr(storage, name)))
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


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_kill_while_the_file_is_written_leaves_no_part_of_it(where, tmp_path, request, monkeypatch):
    ids = [f"cam/{i:03d}.png" for i in range(12)]
    out = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_prefix")
    commit_pieces(out, RUN_A, ids, rows=4)
    monkeypatch.setattr(compaction, "ROW_GROUP_ROWS", 5)
    real = compaction._sorted_row_groups

    def dies_after_one(*args):
        groups = real(*args)
        yield next(groups)
        raise Killed

    with monkeypatch.context() as mp:
        mp.setattr(compaction, "_sorted_row_groups", dies_after_one)
        with pytest.raises(Killed):
            compact(out, rows_per_file=100)
    assert ids_once(out) == ids
    if where == "local":
        assert not [p for p in Path(out).rglob(".*") if p.is_file()], "a temp file was left"
    recover(out)
    compact(out, rows_per_file=100)
    assert ids_once(out) == ids and len(read_predictions(out).files) == 1


def test_interleaved_pieces_are_written_sorted_in_row_groups_with_the_whole_files_summary(tmp_path, monkeypatch):
    """Pieces whose ids interleave (round robin) still give a file sorted by id, cut into row groups,
    whose footer counts every row; pieces of consecutive ids are each read once, a few at a time."""
    import pyarrow.parquet as pq

    from vitray.score.outputs import read_summary, summarize

    monkeypatch.setattr(compaction, "ROW_GROUP_ROWS", 6)
    ids = [f"cam/{i:03d}.png" for i in range(40)]
    interleaved = [ids[i::5][j] for j in range(8) for i in range(5)]  # piece k holds ids k, k+5, ...
    out = str(tmp_path / "mixed")
    commit_pieces(out, RUN_A, interleaved, rows=8)
    whole = summarize(read_predictions(out).to_table())
    compact(out, rows_per_file=100)
    (path,) = read_predictions(out).files
    file = pq.ParquetFile(path)
    assert [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)] == [6] * 6 + [4]
    assert file.read(columns=["id"]).column(0).to_pylist() == ids
    assert read_summary(storage.resolve(path).fs, storage.resolve(path).path) == whole

    out = str(tmp_path / "consecutive")
    commit_pieces(out, RUN_A, ids, rows=4)
    reads: list[str] = []
    real = compaction._read_ahead

    def counted(root, names, columns=None):
        if columns is None:
            reads.extend(names)
        return real(root, names, columns)

    monkeypatch.setattr(compaction, "_read_ahead", counted)
    compact(out, rows_per_file=100)
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 10  # each piece read whole once
    assert ids_once(out) == ids


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
