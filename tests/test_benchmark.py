"""benchmarks/benchmark.py's measuring pieces, without running the benchmark (minutes, and a speed figure
means nothing on a shared test machine): start-up drops out of the steady rate, the memory peak
sees the Ray processes under the driver, and the table shows every ratio against its target.

The tables are read as Markdown tables (columns, rows, the figures in their cells), not as prose."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import benchmark  # noqa: E402 - benchmarks/ is not a package
import measuring  # noqa: E402
import scoring_speed  # noqa: E402

NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in `text`: its rows (the header first, no separator row), each a list of cells."""
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip()[1:-1].split("|")]
            if not all(set(cell) <= {"-"} and cell for cell in cells):
                rows.append(cells)
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def table_headed(text: str, first: str) -> list[list[str]]:
    """The table whose header's first cell starts with `first`; every row has the header's columns."""
    found = [t for t in markdown_tables(text) if t[0][0].startswith(first)]
    assert len(found) == 1, text
    header, *rows = found[0]
    assert rows and all(len(row) == len(header) for row in rows), found[0]
    return found[0]


def numbers(cell: str) -> list[float]:
    """The figures in a cell, as numbers (thousands separators allowed)."""
    return [float(n.replace(",", "")) for n in NUMBER.findall(cell)]


def test_steady_rate_starts_at_the_first_committed_piece() -> None:
    # 20 s of start-up before the first piece, then 100 images/s.
    stamps = [(20.0, 512), (25.12, 1024), (30.24, 1536), (120.0, 10_512)]
    assert measuring.steady_rate(stamps) == pytest.approx(100.0)
    # `vitray score` also reports its start (nothing scored yet): that is not a piece.
    assert measuring.steady_rate(measuring.committed([(0.5, 0)] + stamps)) == pytest.approx(100.0)


def test_steady_rate_needs_several_pieces() -> None:
    with pytest.raises(RuntimeError, match="too few"):
        measuring.steady_rate([(3.0, 60), (4.0, 120)])


def test_score_runs_use_vitray_scores_defaults() -> None:
    # The ratios speak for `vitray score` as users run it.
    from vitray.score import ScoreConfig

    defaults = ScoreConfig(model="m", input="i", output="o")
    assert (measuring.Sizes.score_batch, measuring.Sizes.piece_rows) == (defaults.batch_size, defaults.piece_rows)


PEAK_OF_A_CHILD = """
import subprocess, sys, time
import measuring
child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(300 * 2**20); "
                          "b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"])
try:
    before = measuring.PeakMemory.sample()
    with measuring.PeakMemory(interval_s=0.1) as memory:
        deadline = time.monotonic() + 30  # the child touches its 300 MB meanwhile
        while memory.peak - before <= 200 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.1)
    print(memory.peak - before)
finally:
    child.kill()
    child.wait()
"""


def test_peak_memory_counts_child_processes() -> None:
    # In a process of its own: this one's descendants include the session's Ray, whose memory moves.
    done = subprocess.run([sys.executable, "-c", PEAK_OF_A_CHILD], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(measuring.__file__), timeout=120)
    assert int(done.stdout.strip().splitlines()[-1]) > 200 * 2**20


def test_table_shows_every_ratio_with_its_target_and_figures() -> None:
    runs = {name: {"images": n, "peak_pss_mb": mb, "scoring_s": 1.0}
            for name, n, mb in (("none_small", 1000, 2500.0), ("none_large", 10000, 2700.0),
                                ("all_small", 1000, 2600.0), ("all_large", 10000, 2800.0))}
    ratios = {"train_ray_vs_torch": 0.95, "pretrain_ray_vs_torch": 0.92, "score_vs_forward": 0.7, "score_vs_naive": 4.0,
              "attention_overhead": 2.0, "memory_growth": 1.08}
    results = {"cpu": {
        "ratios": ratios,
        "targets": {k: f"{op} {t}" for k, (op, t) in benchmark.TARGETS.items()},
        "met": {k: k != "attention_overhead" for k in ratios},
        "figures": {"forward_images_per_s": 1400.0, "naive_images_per_s": 250.0, "score": runs,
                    "score_steady_images_per_s": {"none": 1000.0, "all": 500.0},
                    "attention_overhead_pairs": [2.0, 1.9],
                    "train_pairs": [{"ratio": 0.93, "ray_epochs": [300.0, 380.0], "torch_epochs": [350.0, 390.0]},
                                    {"ratio": 0.97, "ray_epochs": [310.0, 370.0], "torch_epochs": [360.0, 400.0]},
                                    {"ratio": 0.95, "ray_epochs": [290.0, 375.0], "torch_epochs": [340.0, 395.0]}],
                    "pretrain_pairs": [{"ratio": 0.92, "ray_epochs": [500.0, 920.0], "torch_epochs": [800.0, 1000.0]}]},
    }, "gpu": {"skipped": "no CUDA device"}}
    text = benchmark.table(results)
    header, *rows = table_headed(text, "ratio")
    assert header == ["ratio", "measured", "target", "met", "from"]
    by_name = {row[0]: row for row in rows}
    assert set(by_name) == set(benchmark.TARGETS)
    for name, (_, measured, target, met, source) in by_name.items():
        op, bar = benchmark.TARGETS[name]
        assert float(measured) == pytest.approx(ratios[name], abs=0.005)
        assert target.startswith(op) and numbers(target) == [bar]
        assert met in ("yes", "NO") and (met == "yes") == results["cpu"]["met"][name]
        assert numbers(source), name  # the figures the ratio divides
    # Each ratio's row carries the figures it was taken from: the best epochs and every pair's ratio.
    assert {380, 400, 0.93, 0.97, 0.95} <= set(numbers(by_name["train_ray_vs_torch"][4]))
    assert {920, 1000} <= set(numbers(by_name["pretrain_ray_vs_torch"][4]))
    assert {1000, 1400} <= set(numbers(by_name["score_vs_forward"][4]))
    assert {1000, 500, 2.0, 1.9} <= set(numbers(by_name["attention_overhead"][4]))
    assert {2700, 2500, 10000, 1000} <= set(numbers(by_name["memory_growth"][4]))
    assert "no CUDA device" in text  # a part that did not run says why


@pytest.mark.slow
@pytest.mark.ray
def test_the_quick_benchmark_measures_every_ratio_in_one_command(ray_session, tmp_path) -> None:
    """`benchmark.py --quick` end to end, on the session's Ray: every ratio measured, its table printed."""
    script = os.path.join(os.path.dirname(benchmark.__file__), "benchmark.py")
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(out), "--scores-to", "work"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ray_session})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "benchmark.json").read_text())
    ratios = results["cpu"]["ratios"]
    assert set(ratios) == set(benchmark.TARGETS) and all(value > 0 for value in ratios.values()), ratios
    assert results["sizes"]["warm_up"] is False
    _, *rows = table_headed(proc.stdout, "ratio")
    assert {row[0] for row in rows} == set(benchmark.TARGETS), proc.stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json"]  # scratch data removed


def test_score_outputs_go_to_tmpfs_unless_told(tmp_path) -> None:
    work = str(tmp_path / "work")
    assert scoring_speed.scores_folder("work", work) == os.path.join(work, "scores")
    assert scoring_speed.scores_folder(str(tmp_path / "fast"), work).startswith(str(tmp_path / "fast"))
    if os.access("/dev/shm", os.W_OK):
        assert scoring_speed.scores_folder("auto", work).startswith("/dev/shm/")


def test_file_create_cost_is_measured_and_cleaned_up(tmp_path) -> None:
    assert measuring.file_create_ms(str(tmp_path), files=20) > 0
    assert os.listdir(tmp_path) == []


def test_a_scores_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path) -> None:
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "benchmark.py")
    done = subprocess.run([sys.executable, script, "--out", str(tmp_path / "out"), "--scores-to",
                           str(tmp_path / "missing")], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--scores-to" in done.stderr and "not a writable folder" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_held_out_renderer_writes_data_vitray_reads_with_each_parts_box(tmp_path) -> None:
    """benchmarks/render3.py: every class at its count, a box vitray reads, and the class in the part's shift."""
    import numpy as np
    import render3

    from vitray.data.sources import inspect_source, parse_response

    render3.write(str(tmp_path / "d"), 40, 0.1, 64, seed=3)
    source = inspect_source(str(tmp_path / "d"))
    assert source.format == "parquet" and source.has_boxes
    assert source.labels == sorted(render3.CLASSES) and len(source.ids) == 40
    counts = np.bincount(source.row_labels, minlength=5)
    assert dict(zip(source.labels, counts.tolist())) == render3.counts(40, 0.1)

    import pyarrow.parquet as pq
    table = pq.read_table(str(tmp_path / "d")).to_pylist()
    for row in table:
        label, (x1, y1, x2, y2) = parse_response(row["response"], "test")
        assert label in render3.CLASSES and 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
    for scene in render3.scenes(40, 0.1, 64, seed=3):
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        shift = np.subtract(scene.bbox, scene.seat).reshape(2, 2).mean(0)  # part centre minus seat centre
        expected = np.array(render3.DIRECTION[scene.label])
        if scene.label == "passed":
            assert np.abs(shift).max() < 0.5
        else:
            assert 1.9 < shift @ expected < 5.1 and abs(shift @ expected[::-1]) < 0.5


def test_quality_takes_each_targets_min_and_mean_over_the_seeds() -> None:
    import quality

    runs = [{"seed": 1, "figures": {"accuracy": 0.99, "svm_accuracy": 0.98}, "met": {"accuracy": True}},
            {"seed": 2, "figures": {"accuracy": 0.97, "svm_accuracy": 0.99}, "met": {"accuracy": False}}]
    summary = quality.summarise(runs)
    assert summary["seeds"] == [1, 2] and summary["met_in"] == {"accuracy": 1}
    assert summary["min"]["accuracy"] == 0.97 and summary["mean"]["accuracy"] == pytest.approx(0.98)
    assert quality.TARGETS["digits"]["accuracy"] == "svm_accuracy"  # measured on the same split
    train, test = quality.digits_split(4)
    assert len(set(train) | set(test)) == len(train) + len(test) == 1797


def test_table_shows_the_start_up_figures_against_their_plain_scripts_when_measured() -> None:
    up = {"images": 2000, "vitray": {"first_piece_s": 4.4, "exit_s": 5.1}, "vitray_on_ray": {"exit_s": 26.6},
          "plain_s": 5.7, "ratio": 0.89, "ratio_on_ray": 4.67,
          "explain_3_images": {"vitray_s": 4.0, "plain_s": 4.6, "ratio": 0.87},
          "train": {"images": 300, "vitray": {"exit_s": 6.6}, "on_ray": {"exit_s": 38.0}, "plain": {"exit_s": 4.9},
                    "ratio": 1.35, "ratio_on_ray": 7.76}}
    header, *rows = table_headed(benchmark.table({"startup": up}), "start-up")
    assert len(header) == 5  # what, vitray, plain script, ratio, target
    figures = [numbers(" ".join(row[1:])) for row in rows]
    # score in its own process and its first piece, on Ray, explain, train in its own process and on Ray
    assert figures == [[5.1, 5.7, 0.89, 1.5], [4.4, 8], [26.6, 5.7, 4.67], [4.0, 4.6, 0.87, 2],
                       [6.6, 4.9, 1.35], [38.0, 4.9, 7.76]]
    assert "2,000" in rows[0][0] and "300" in rows[4][0]  # the sizes measured
    skipped = benchmark.table({"cpu": {"skipped": "ray is not installed here"}})
    assert not markdown_tables(skipped) and "ray is not installed here" in skipped
