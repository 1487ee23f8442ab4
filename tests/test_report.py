"""The scoring report: counts, histogram, defect gallery and errors, escaped and self-contained."""
from __future__ import annotations

import base64
import io
import json
import re
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import INSPECTION_LABELS
from vitray import storage
from vitray.lease import Lease
from vitray.score.report import gather, write_report
from vitray.score import ERRORS_SCHEMA, PiecePlan, attention_key, write_piece

EVIL = "<script>alert(1)</script>.png"


def commit(out: str, run_id: str, ids: list[str], labels: list[str], scores: list[float]) -> None:
    """Commit one piece the way `score` does, with chosen predictions and a map for every image."""
    n = len(ids)
    rng = np.random.default_rng(len(run_id) + n)
    probs = np.full((n, len(INSPECTION_LABELS)), 0.0, dtype=np.float32)
    pred = np.array([INSPECTION_LABELS.index(label) for label in labels])
    probs[np.arange(n), pred] = scores
    batch = {"id": np.array(ids, dtype=object), "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             "error_kind": np.array([""] * n, dtype=object), "error": np.array([""] * n, dtype=object),
             "pred": pred, "score": np.array(scores, dtype=np.float32), "probs": probs,
             "attention": rng.random((n, 64)).astype(np.float32)}
    with Lease(out, run_id):  # only the run holding the output's lease commits
        write_piece(batch, PiecePlan(out, run_id, "/models/m", tuple(INSPECTION_LABELS), (8, 8), "/in"))


@pytest.fixture
def scored(tmp_path) -> str:
    out = str(tmp_path / "out")
    commit(out, "20250101T020000Z-aaaaaa", ["a/1.png", "a/2.png", "b/3.png"], ["passed", "Xplus", "Yminus"],
           [0.91, 0.8, 0.55])
    commit(out, "20250102T020000Z-bbbbbb", [EVIL, "c#4", "d/5.png"], ["Xminus", "passed", "Xplus"],
           [0.7, 0.97, 0.99])
    storage.write_json(f"{out}/runs/20250101T020000Z-aaaaaa.json", {
        "run_id": "20250101T020000Z-aaaaaa", "status": "complete", "started": "2025-01-01T02:00:00Z",
        "model": "/models/<m>", "counts": {"scored": 3, "skipped": 0, "errors": 1}, "images_per_s": 12.5})
    storage.write_json(f"{out}/runs/20250102T020000Z-bbbbbb.json", {
        "run_id": "20250102T020000Z-bbbbbb", "status": "running", "started": "2025-01-02T02:00:00Z",
        "model": "/models/<m>"})
    errors = pa.table({"path": ["/in/<b>bad</b>.png"], "error": ["corrupt"],
                       "message": ["<img src=x onerror=alert(2)>"], "run_id": ["20250101T020000Z-aaaaaa"]},
                      schema=ERRORS_SCHEMA)
    storage.resolve(f"{out}/errors").fs.create_dir(storage.resolve(f"{out}/errors").path)
    pq.write_table(errors, f"{out}/errors/part-x.parquet")
    return out


def test_counts_histogram_and_gallery_come_from_the_committed_rows(scored):
    data = gather(scored, gallery_size=3)
    assert dict(data.labels) == {"passed": 2, "Xplus": 2, "Yminus": 1, "Xminus": 1}
    assert data.run_labels["20250101T020000Z-aaaaaa"] == {"passed": 1, "Xplus": 1, "Yminus": 1}
    assert sum(int(c.sum()) for c in data.histogram.values()) == 6
    assert data.histogram["passed"][19] == 1 and data.histogram["passed"][18] == 1  # 0.97 and 0.91
    assert data.defects == 4
    # Newest run first, most confident first; only 3 kept.
    assert [g[2] for g in data.gallery] == ["d/5.png", EVIL, "a/2.png"]
    assert data.errors == 1 and data.error_kinds == {"corrupt": 1}


def test_report_is_escaped_self_contained_and_links_relatively(scored):
    uri = write_report(scored)
    page = storage.read_bytes(uri).decode("utf-8")

    assert "<script" not in page.lower() and "<img src=x" not in page and "<b>bad" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page and "/in/&lt;b&gt;bad&lt;/b&gt;.png" in page
    links = re.findall(r'href="([^"]*)"', page)
    evil = attention_key(EVIL)
    assert quote(evil) in links and evil.startswith("attention/<script>alert(1)</script>.png-")
    assert quote(attention_key("c#4")) not in links  # passed: not a defect, not in the gallery
    assert all(link.startswith("attention/") for link in links)  # relative, nothing outside OUT
    thumbs = re.findall(r'src="(data:image/jpeg;base64,[^"]+)"', page)
    assert len(thumbs) == 4
    # The 32 px overlays are enlarged by a whole factor to the thumbnail side, not left to blur.
    with Image.open(io.BytesIO(base64.b64decode(thumbs[0].split(",", 1)[1]))) as thumb:
        assert thumb.size == (160, 160)
    assert not re.search(r'(src|href)="(/|file:|http)', page)
    assert "running or killed" in page and "12.5" in page
    assert page.count("<figure>") == 4


def test_report_of_an_empty_output_says_so(tmp_path):
    page = storage.read_bytes(write_report(str(tmp_path / "out"))).decode()
    assert "No images scored yet" in page and "Every image could be read" in page


def test_a_manifest_cut_short_is_left_out(scored):
    with open(f"{scored}/runs/20250103T020000Z-cccccc.json", "w") as f:
        f.write('{"run_id": "20250103')
    assert [r["run_id"] for r in gather(scored).runs] == ["20250101T020000Z-aaaaaa", "20250102T020000Z-bbbbbb"]
    json.loads(json.dumps(gather(scored).runs))


def test_compacted_files_give_the_same_page_from_their_footers(scored):
    from vitray.score import compact, prediction_files
    from vitray.score.outputs import read_summary

    before = gather(scored, gallery_size=3)
    assert compact(scored)["files"] == 2  # one per run
    loc, files = prediction_files(scored)
    assert [read_summary(loc.fs, f)["runs"] for f in files] == [
        {"20250101T020000Z-aaaaaa": {"passed": 1, "Xplus": 1, "Yminus": 1}},
        {"20250102T020000Z-bbbbbb": {"Xminus": 1, "passed": 1, "Xplus": 1}}]

    after = gather(scored, gallery_size=3)

    assert after.labels == before.labels and after.run_labels == before.run_labels
    assert after.defects == before.defects == 4
    assert {k: v.tolist() for k, v in after.histogram.items()} == {k: v.tolist() for k, v in before.histogram.items()}
    assert after.gallery == before.gallery
