"""`OUT/report.html` of a scoring output: label counts per run, score histogram, defect gallery, errors.

One self-contained page (inline CSS and SVG, thumbnails as data URIs, full overlays by
relative links), so it opens from a local folder or an object store; every name is escaped.
Counts and histograms come from the summaries in the compacted files' footers (and, for
pieces not compacted yet, from three columns in Arrow), and the gallery reads only the
newest runs: the page costs the same memory for any number of images, and its time grows
with the number of files, not of rows (docs/scale.md).
"""
from __future__ import annotations

import base64
import heapq
import html
import io
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vitray import storage
from vitray.domain import OK_CLASS as NEGATIVE_LABEL
from vitray.score.outputs import HIST_BINS
THUMB_SIDE = 160
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#59a14f"]
PASSED_COLOUR = "#59a14f"


@dataclass
class ReportData:
    """What the page shows, gathered in one pass over predictions/ and errors/."""

    output: str
    runs: list[dict] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)
    run_labels: dict[str, Counter] = field(default_factory=dict)
    histogram: dict[str, np.ndarray] = field(default_factory=dict)
    defects: int = 0
    gallery: list[tuple] = field(default_factory=list)  # (run_id, score, id, label, png key, path)
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    error_rows: list[tuple] = field(default_factory=list)  # (run_id, path, error, message)
    decisions: dict = field(default_factory=dict)  # the newest run's, with a calibrated model
    review: list[tuple] = field(default_factory=list)  # (run_id, defect score, id, reason, png key, path)
    anomaly: dict = field(default_factory=dict)  # the newest run's, scored with --anomaly
    anomalies: list[tuple] = field(default_factory=list)  # (run_id, anomaly score, id, label, png key, path)


def gather(output: str, gallery_size: int = 48, error_rows: int = 200) -> ReportData:
    """Counts and histograms from the compacted files' footers (the rows of pieces not compacted
    yet, in Arrow), the gallery from the newest runs only, and the newest error rows."""
    from vitray.score.outputs import prediction_files, read_errors

    data = ReportData(storage.resolve(output).uri)
    data.runs = _runs(output)
    loc, files = prediction_files(output)
    rows_of = [path for path, summary in zip(files, _summaries(loc, files)) if not _add(data, summary)]
    for batch in _scan(_predictions(loc, rows_of), ["label", "score", "run_id"]):
        _count(data, batch)
    data.gallery = _gallery(_predictions(loc, files), sorted(data.run_labels, reverse=True), gallery_size)
    newest: list[tuple] = []
    for batch in read_errors(output).to_batches():
        rows = zip(*(batch.column(c).to_pylist() for c in ("run_id", "path", "error", "message")))
        for row in rows:
            data.errors += 1
            data.error_kinds[row[2]] += 1
            if len(newest) < error_rows:
                heapq.heappush(newest, row)
            elif row > newest[0]:
                heapq.heapreplace(newest, row)
    data.error_rows = sorted(newest, reverse=True)
    data.decisions, data.review = _review(data.runs[-1] if data.runs else {}, gallery_size)
    data.anomaly = (data.runs[-1] if data.runs else {}).get("anomaly") or {}
    if data.anomaly:
        data.anomalies = _anomaly_gallery(_predictions(loc, files), data.runs[-1]["run_id"], gallery_size)
    return data


def _anomaly_gallery(predictions: Any, run_id: str, size: int) -> list[tuple]:
    """The newest run's most anomalous images with an overlay: (run_id, score, id, label, png key, path)."""
    import pyarrow.dataset as pads

    where = (pads.field("run_id") == run_id) & pads.field("anomaly_png").is_valid()
    return _top_rows(predictions, run_id, where, "anomaly_score", "anomaly_png", size)


def _review(latest: dict, size: int) -> tuple[dict, list[tuple]]:
    """The newest run's decisions and the first rows of its review table (a calibrated model's)."""
    import pyarrow.parquet as pq

    decisions = latest.get("decisions") or {}
    uri = (decisions.get("review") or {}).get("parquet")
    if not uri:
        return decisions, []
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri))).slice(0, size)
    except (OSError, ValueError):  # a review table removed by hand: the counts still show
        return decisions, []
    rows = table.to_pylist()
    # An image sent to review as an anomaly shows where it differs from the good images.
    return decisions, [(r["run_id"], float(r["defect_score"]), r["id"], r["reason"],
                        r.get("anomaly_png") or r["attention_png"], r["path"]) for r in rows]


def _summaries(loc: storage.Location, files: list[str]) -> list[dict | None]:
    """Each file's footer summary (None for pieces), read a few at a time: on S3 each is a round trip."""
    from concurrent.futures import ThreadPoolExecutor

    from vitray.score.outputs import read_summary

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda path: read_summary(loc.fs, path), files))


def _add(data: ReportData, summary: dict | None) -> bool:
    """A file's footer summary added to the page's counts; False when it has none."""
    if summary is None:
        return False
    for run_id, labels in summary["runs"].items():
        for label, count in labels.items():
            data.run_labels.setdefault(run_id, Counter())[label] += count
            data.labels[label] += count
            if label != NEGATIVE_LABEL:
                data.defects += count
    for label, counts in summary["histogram"].items():
        data.histogram[label] = data.histogram.get(label, np.zeros(HIST_BINS, np.int64)) + np.asarray(counts)
    return True


def _predictions(loc: storage.Location, files: list[str]) -> Any:
    """Committed files as a dataset, with `label` and `run_id` read as dictionaries (a few values each)."""
    import pyarrow.dataset as pads

    from vitray.score.outputs import PREDICTIONS_SCHEMA

    schema = PREDICTIONS_SCHEMA
    for name in ("label", "run_id"):
        schema = schema.set(schema.get_field_index(name), pa.field(name, pa.dictionary(pa.int32(), pa.string())))
    fmt = pads.ParquetFileFormat(read_options=pads.ParquetReadOptions(dictionary_columns=["label", "run_id"]))
    return pads.dataset(files, schema=schema, filesystem=loc.fs, format=fmt)


def _codes(column: Any) -> tuple[np.ndarray, list[str]]:
    """A dictionary column as (codes, values); any other column is encoded first."""
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    return column.indices.to_numpy(zero_copy_only=False).astype(np.int64), column.dictionary.to_pylist()


def _count(data: ReportData, batch: Any) -> None:
    """One batch's labels per run, defects and score histogram per label, in whole arrays."""
    labels, label_names = _codes(batch.column("label"))
    runs, run_names = _codes(batch.column("run_id"))
    width = len(label_names)
    per_run = np.bincount(runs * width + labels, minlength=len(run_names) * width)
    for cell in np.flatnonzero(per_run):
        run, label = divmod(int(cell), width)
        count = int(per_run[cell])
        data.run_labels.setdefault(run_names[run], Counter())[label_names[label]] += count
        data.labels[label_names[label]] += count
    scores = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    bins = np.clip(np.floor(scores * HIST_BINS), 0, HIST_BINS - 1).astype(np.int64)
    per_label = np.bincount(labels * HIST_BINS + bins, minlength=width * HIST_BINS).reshape(width, HIST_BINS)
    for label, name in enumerate(label_names):
        if per_label[label].any():
            data.histogram[name] = data.histogram.get(name, np.zeros(HIST_BINS, np.int64)) + per_label[label]
        if name != NEGATIVE_LABEL:
            data.defects += int(per_label[label].sum())


def _gallery(predictions: Any, run_ids: list[str], size: int) -> list[tuple]:
    """The newest runs' most confident defects with an overlay: (run_id, score, id, label, png key, path).

    Runs are read newest first and only until the gallery is full; a run's files are found by
    their `run_id` statistics, so other runs' rows are not read. Per run, one pass over the
    scores finds the gallery's lowest score, and a second reads the few rows at or above it.
    """
    import pyarrow.dataset as pads

    gallery: list[tuple] = []
    for run_id in run_ids:
        wanted = size - len(gallery)
        if wanted <= 0:
            break
        defects = (pads.field("run_id") == run_id) & (pads.field("label") != NEGATIVE_LABEL)
        gallery += _top_rows(predictions, run_id, defects, "score", "attention_png", wanted)
    return gallery


def _top_rows(predictions: Any, run_id: str, where: Any, score: str, png: str, k: int) -> list[tuple]:
    """The k rows of `where` with the highest `score` that have a `png` overlay, highest first:
    (run_id, score, id, label, png key, path). One pass over the scores finds the k-th highest,
    a second reads the few rows at or above it."""
    import pyarrow.dataset as pads

    best = np.concatenate([_top(b.column(0), k) for b in _scan(predictions, [score], where)] + [
        np.empty(0, np.float32)])
    if not len(best):
        return []
    lowest = float(np.sort(best)[-k:][0])
    rows = [row for b in _scan(predictions, ["id", "path", "label", score, png],
                               where & (pads.field(score) >= lowest) & pads.field(png).is_valid())
            for row in b.to_pylist()]
    return sorted(((run_id, float(r[score]), r["id"], str(r["label"]), r[png], r["path"]) for r in rows),
                  reverse=True)[:k]


def _scan(predictions: Any, columns: list[str], where: Any = None) -> Any:
    """Batches of a few columns, with little read ahead: the page's memory stays small."""
    return predictions.to_batches(columns=columns, filter=where, batch_size=64 * 1024, batch_readahead=2,
                                  fragment_readahead=1)


def _top(scores: Any, k: int) -> np.ndarray:
    values = scores.to_numpy(zero_copy_only=False)
    return values if len(values) <= k else np.partition(values, len(values) - k)[-k:]


def _runs(output: str) -> list[dict]:
    runs = []
    for info in storage.list_files(storage.join(output, "runs"), recursive=False):
        name = posixpath.basename(info.path)
        if name.endswith(".json") and not name.startswith((".", "_")):
            try:
                runs.append(storage.read_json(storage.join(output, "runs", name)))
            except ValueError:  # a manifest cut short by hand: list the others
                continue
    return sorted(runs, key=lambda r: str(r.get("run_id", "")))


def write_report(output: str, gallery_size: int = 48) -> str:
    """Write OUT/report.html (replacing it) and return its URI."""
    data = gather(output, gallery_size)
    uri = storage.join(output, "report.html")
    thumbnails = _thumbnails(output, data.review + data.anomalies + data.gallery)
    storage.write_bytes(uri, render(data, thumbnails=thumbnails).encode("utf-8"))
    return uri


def _thumbnails(output: str, gallery: list[tuple]) -> dict[str, str]:
    """Small JPEG data URIs of the gallery's overlays, so the page shows them on its own."""
    from PIL import Image

    thumbs = {}
    for item in gallery:
        key = item[4]
        if not key:
            continue
        try:
            with Image.open(io.BytesIO(storage.read_bytes(storage.join(output, *key.split("/"))))) as img:
                img = img.convert("RGB")
                # Bulk overlays are at the model's input size: enlarge small ones by a whole
                # factor (nearest, so the patch grid stays sharp) rather than let the page blur them.
                factor = THUMB_SIDE // max(img.size)
                if factor > 1:
                    img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
                img.thumbnail((THUMB_SIDE, THUMB_SIDE))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=82)
        except Exception:  # a missing or unreadable overlay: the caption and link still show
            continue
        thumbs[key] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return thumbs


# --------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(key: str) -> str:
    """A relative link to a key under OUT: percent-encoded (ids hold `#`, `?`, spaces, any script)."""
    return _e(quote(key, safe="/"))


def _colours(labels: list[str]) -> dict[str, str]:
    others = iter(PALETTE)
    return {label: PASSED_COLOUR if label == NEGATIVE_LABEL else next(others, "#888888") for label in labels}


def render(data: ReportData, thumbnails: dict[str, str] | None = None) -> str:
    thumbnails = thumbnails or {}
    order = sorted(data.labels, key=lambda l: (l != NEGATIVE_LABEL, l))
    for run_counts in data.run_labels.values():
        order += [l for l in run_counts if l not in order]
    colours = _colours(order)
    total = sum(data.labels.values())
    latest = data.runs[-1] if data.runs else {}
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>vitray score report: {_e(data.output)}</title>", f"<style>{CSS}</style></head><body>",
        "<header><h1>vitray score report</h1>",
        f'<p class="meta"><span>output <code>{_e(data.output)}</code></span>'
        f'<span>model <code>{_e(latest.get("model", "-"))}</code></span>'
        f'<span>written {_e(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))}</span></p>',
        '<div class="tiles">',
        _tile("images scored", f"{total:,}"), _tile("defects", f"{data.defects:,}"),
        _tile("errors", f"{data.errors:,}"), _tile("runs", f"{len(data.runs):,}"),
        "</div></header>",
        _decisions_section(data, thumbnails),
        _anomaly_section(data, thumbnails),
        _labels_section(data, order, colours, total),
        _runs_section(data, order, colours),
        _histogram_section(data, order, colours),
        _gallery_section(data, thumbnails),
        _errors_section(data),
        "</body></html>",
    ]
    return "\n".join(parts)


def _tile(name: str, value: str) -> str:
    return f'<div class="tile"><div class="value">{_e(value)}</div><div class="name">{_e(name)}</div></div>'


def _swatch(colour: str) -> str:
    return f'<span class="swatch" style="background:{colour}"></span>'


def _labels_section(data: ReportData, order: list[str], colours: dict[str, str], total: int) -> str:
    if not total:
        return '<section><h2>Predicted labels</h2><p class="empty">No images scored yet.</p></section>'
    rows = []
    for label in order:
        count = data.labels.get(label, 0)
        share = count / total
        rows.append(f"<tr><td>{_swatch(colours[label])}{_e(label)}</td><td class=num>{count:,}</td>"
                    f"<td class=num>{share:.1%}</td><td class=barcell><div class=bar style=\"width:{share * 100:.1f}%;"
                    f"background:{colours[label]}\"></div></td></tr>")
    return ("<section><h2>Predicted labels</h2><table><thead><tr><th>label</th><th class=num>images</th>"
            "<th class=num>share</th><th></th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>")


def _runs_section(data: ReportData, order: list[str], colours: dict[str, str]) -> str:
    manifests = {str(r.get("run_id")): r for r in data.runs}
    run_ids = sorted(set(manifests) | set(data.run_labels))
    if not run_ids:
        return ""
    chart = _runs_chart(run_ids[-60:], data.run_labels, order, colours)
    head = "".join(f"<th class=num>{_swatch(colours[l])}{_e(l)}</th>" for l in order)
    rows = []
    for run_id in reversed(run_ids[-50:]):
        m = manifests.get(run_id, {})
        counts = m.get("counts") or {}
        status = m.get("status", "no manifest")
        if status == "running":
            status = "running or killed"
        rate = m.get("images_per_s")
        numbers = [counts.get(k, "-") for k in ("scored", "skipped", "errors")]
        numbers.append(f"{rate:.1f}" if isinstance(rate, (int, float)) else "-")
        numbers += [f"{data.run_labels.get(run_id, Counter()).get(l, 0):,}" for l in order]
        rows.append(f"<tr><td><code>{_e(run_id)}</code></td><td>{_e(m.get('started') or '-')}</td>"
                    f"<td class=\"status {_e(status.split()[0])}\">{_e(status)}</td>"
                    + "".join(f"<td class=num>{_e(v)}</td>" for v in numbers) + "</tr>")
    return ("<section><h2>Runs</h2><p class=note>Committed images per run and label (a killed run keeps "
            "what it committed; the next run finishes the job).</p>" + chart +
            "<div class=scroll><table><thead><tr><th>run</th><th>started</th><th>status</th><th class=num>scored</th>"
            "<th class=num>skipped</th><th class=num>errors</th><th class=num>images/s</th>" + head +
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div></section>")


def _runs_chart(run_ids: list[str], run_labels: dict[str, Counter], order: list[str],
                colours: dict[str, str]) -> str:
    width, height, left, right, bottom = 860, 180, 48, 20, 22
    peak = max([sum(run_labels.get(r, Counter()).values()) for r in run_ids] + [1])
    step = (width - left - right) / len(run_ids)
    bar = max(2.0, min(40.0, step * 0.7))
    shapes = []
    for n, run_id in enumerate(run_ids):
        x, y = left + n * step + (step - bar) / 2, height - bottom
        for label in order:
            count = run_labels.get(run_id, Counter()).get(label, 0)
            if count:
                h = (height - bottom - 10) * count / peak
                y -= h
                shapes.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                              f'fill="{colours[label]}"><title>{_e(run_id)}: {_e(label)} {count:,}</title></rect>')
    first, last = _when(run_ids[0]), _when(run_ids[-1])
    axis = (f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>'
            f'<text x="{left - 6}" y="16" class="tick" text-anchor="end">{peak:,}</text>'
            f'<text x="{left - 6}" y="{height - bottom}" class="tick" text-anchor="end">0</text>'
            f'<text x="{left}" y="{height - 6}" class="tick">{_e(first)}</text>'
            f'<text x="{width - right}" y="{height - 6}" class="tick" text-anchor="end">{_e(last)}</text>')
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="images per run">'
            + axis + "".join(shapes) + "</svg>")


def _when(run_id: str) -> str:
    """`20250102T020000Z-ab12cd` → `2025-01-02 02:00` (run ids start with their UTC start time)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.strptime(run_id[:16], "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return run_id


def _histogram_section(data: ReportData, order: list[str], colours: dict[str, str]) -> str:
    if not data.histogram:
        return ""
    width, height, left, right, bottom = 860, 220, 48, 20, 34
    stacks = np.zeros(HIST_BINS, np.int64)
    for label in order:
        stacks += data.histogram.get(label, np.zeros(HIST_BINS, np.int64))
    peak = max(int(stacks.max()), 1)
    step = (width - left - right) / HIST_BINS
    shapes = []
    base = np.zeros(HIST_BINS)
    for label in order:
        counts = data.histogram.get(label)
        if counts is None:
            continue
        for b, count in enumerate(counts):
            if count:
                h = (height - bottom - 10) * count / peak
                y = height - bottom - base[b] - h
                base[b] += h
                lo = b / HIST_BINS
                shapes.append(f'<rect x="{left + b * step + 1:.1f}" y="{y:.1f}" width="{step - 2:.1f}" '
                              f'height="{h:.1f}" fill="{colours[label]}"><title>{_e(label)}, score '
                              f'{lo:.2f}-{lo + 1 / HIST_BINS:.2f}: {int(count):,}</title></rect>')
    ticks = "".join(f'<text x="{left + i * (width - left - right) / 4:.1f}" y="{height - bottom + 16}" class="tick" '
                    f'text-anchor="middle">{i / 4:.2f}</text>' for i in range(5))
    axis = (f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>'
            f'<text x="{left - 6}" y="16" class="tick" text-anchor="end">{peak:,}</text>'
            f'<text x="{left - 6}" y="{height - bottom}" class="tick" text-anchor="end">0</text>'
            f'<text x="{(width - right + left) / 2}" y="{height - 2}" class="tick" text-anchor="middle">'
            f'score (probability of the predicted label)</text>')
    legend = "".join(f'<span class="legend">{_swatch(colours[l])}{_e(l)}</span>' for l in order
                     if l in data.histogram)
    return (f'<section><h2>Score histogram</h2><div>{legend}</div><svg class="chart" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="score histogram">{axis}{ticks}{"".join(shapes)}</svg></section>')


def _decisions_section(data: ReportData, thumbnails: dict[str, str]) -> str:
    """OK / NG / REVIEW of the newest run (a calibrated model), its drift test, and its review queue first."""
    if not data.decisions:
        return ""
    counts = data.decisions.get("counts", {})
    tiles = "".join(_tile(name.upper(), f"{counts.get(name, 0):,}") for name in ("ok", "ng", "review"))
    drift = data.decisions.get("drift", {})
    if not drift.get("tested"):
        said = f"not tested: {_e(drift.get('why', ''))}"
    elif drift.get("drifted"):
        said = (f"<b>drifted</b> from the calibration's images (p = {drift['p_value']:.2g} &lt; {drift['alpha']}, "
                f"most in {_e(drift['worst']['feature'])})")
    else:
        said = f"like the calibration's images (p = {drift['p_value']:.2g}, alpha {drift['alpha']})"
    review = data.decisions.get("review", {})
    cards = []
    for run_id, defect, image_id, reason, key, path in data.review:
        thumb = thumbnails.get(key) if key else None
        img = (f'<img src="{thumb}" alt="{_e(image_id)}" width="{THUMB_SIDE}" height="{THUMB_SIDE}">' if thumb
               else '<div class="missing">no overlay</div>')
        link = f'<a href="{_href(key)}" title="{_e(path)}">{img}</a>' if key else img
        cards.append(f'<figure>{link}<figcaption><b>review</b> {defect:.3f}<br><span class="id">{_e(image_id)}'
                     f'</span><br><span class="id">{_e(reason)}</span></figcaption></figure>')
    queue = (f"<p class=note>{review.get('images', 0):,} images to review in this run (the table: "
             f"<code>{_e(review.get('csv', '-'))}</code>); the first {len(cards)}:</p>"
             f'<div class="gallery">{"".join(cards)}</div>') if cards else \
        '<p class="empty">No image of this run waits for review.</p>'
    return (f"<section><h2>Decisions (newest run)</h2><div class=tiles>{tiles}</div>"
            f"<p class=note>Tonight's images: {said}.</p><h3>Review queue</h3>{queue}</section>")


def _anomaly_section(data: ReportData, thumbnails: dict[str, str]) -> str:
    """The newest run's images unlike the anomaly bank's good images, most anomalous first."""
    if not data.anomaly:
        return ""
    tiles = (_tile("anomalous", f"{data.anomaly.get('anomalous', 0):,}")
             + _tile("threshold", f"{float(data.anomaly.get('threshold', float('nan'))):.3f}"))
    cards = [_card(key, image_id, path, thumbnails, f"<b>{_e(label)}</b> anomaly {score:.3f}")
             for run_id, score, image_id, label, key, path in data.anomalies]
    shown = (f"<p class=note>Bank <code>{_e(data.anomaly.get('bank', '-'))}</code>; the {len(cards)} most anomalous "
             f'images with an overlay (red: patches at the threshold\'s distance from every good patch):</p>'
             f'<div class="gallery">{"".join(cards)}</div>') if cards else \
        '<p class="empty">No anomaly overlay in this run (none anomalous, or --attention none).</p>'
    return f"<section><h2>Anomalies (newest run)</h2><div class=tiles>{tiles}</div>{shown}</section>"


def _card(key: str, image_id: str, path: str, thumbnails: dict[str, str], caption: str) -> str:
    thumb = thumbnails.get(key)
    img = (f'<img src="{thumb}" alt="{_e(image_id)}" width="{THUMB_SIDE}" height="{THUMB_SIDE}">' if thumb
           else '<div class="missing">overlay missing</div>')
    return (f'<figure><a href="{_href(key)}" title="{_e(path)}">{img}</a>'
            f'<figcaption>{caption}<br><span class="id">{_e(image_id)}</span></figcaption></figure>')


def _gallery_section(data: ReportData, thumbnails: dict[str, str]) -> str:
    title = "<section><h2>Defects</h2>"
    if not data.defects:
        return title + '<p class="empty">No image was predicted as a defect.</p></section>'
    note = (f"<p class=note>{len(data.gallery):,} of {data.defects:,} defect images with attention overlays, "
            "newest run first, most confident first; click for the full overlay.</p>")
    if not data.gallery:
        note = (f"<p class=note>{data.defects:,} defect images, none with an overlay "
                "(score with --attention defects or all to see where the model looked).</p>")
    cards = [_card(key, image_id, path, thumbnails, f"<b>{_e(label)}</b> {score:.2f}")
             for run_id, score, image_id, label, key, path in data.gallery]
    return title + note + '<div class="gallery">' + "".join(cards) + "</div></section>"


def _errors_section(data: ReportData) -> str:
    title = "<section><h2>Errors</h2>"
    if not data.errors:
        return title + '<p class="empty">Every image could be read.</p></section>'
    kinds = ", ".join(f"{_e(k)} {n:,}" for k, n in data.error_kinds.most_common())
    rows = "".join(f"<tr><td class=path>{_e(path)}</td><td><code>{_e(kind)}</code></td><td>{_e(message)}</td>"
                   f"<td><code>{_e(run_id)}</code></td></tr>" for run_id, path, kind, message in data.error_rows)
    return (title + f"<p class=note>{data.errors:,} rows ({kinds}); an image that could not be read is tried "
            f"again by the next run. Newest first, {len(data.error_rows):,} shown.</p>"
            "<div class=scroll><table><thead><tr><th>path</th><th>error</th><th>message</th><th>run</th></tr>"
            f"</thead><tbody>{rows}</tbody></table></div></section>")


CSS = """
:root{--fg:#1d232b;--muted:#5d6875;--line:#dfe3e8;--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0;padding:24px 32px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
 color:var(--fg);background:var(--bg)}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0 0 10px}
section,header{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:0 0 16px}
.meta{color:var(--muted);margin:0 0 12px;display:flex;flex-wrap:wrap;gap:6px 20px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all}
.tiles{display:flex;gap:12px;flex-wrap:wrap}
.tile{border:1px solid var(--line);border-radius:6px;padding:8px 14px;min-width:120px}
.tile .value{font-size:20px;font-weight:600}.tile .name{color:var(--muted);font-size:12px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;color:var(--muted);font-size:12px;white-space:nowrap}
.num{text-align:right;font-variant-numeric:tabular-nums}
.barcell{width:45%}.bar{height:12px;border-radius:2px;min-width:1px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:baseline}
.legend{margin-right:14px;font-size:12px;color:var(--muted)}
.chart{width:100%;max-width:860px;height:auto;display:block;margin:6px 0 12px}
.chart .axis{stroke:#9aa3ad;stroke-width:1}.chart .tick{font-size:11px;fill:var(--muted)}
.note,.empty{color:var(--muted);margin:0 0 10px}
.scroll{max-height:520px;overflow:auto}
.status.complete{color:#2e7d32}.status.failed{color:#c62828}.status.running{color:#b26a00}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}
figure{margin:0;border:1px solid var(--line);border-radius:6px;padding:5px;background:#fff}
figure img,.missing{display:block;width:100%;height:auto;aspect-ratio:1;border-radius:3px;background:#eee}
.missing{display:flex;align-items:center;justify-content:center;color:var(--muted);font-size:12px}
figcaption{font-size:12px;margin-top:4px}.id{color:var(--muted);word-break:break-all}
td.path{word-break:break-all;width:38%}
td code{white-space:nowrap;word-break:normal}
"""
