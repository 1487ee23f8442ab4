"""Scoring outputs as they grow: planning, files, report and reruns beside 10 k to 10 M committed rows.

    python benchmarks/scale.py --work /tmp/vitray-scale

builds outputs of growing size directly (synthetic rows, nights of up to 1 M images, the
layout a run leaves: `predictions/run=<run_id>/` files of 50,000 rows sorted by id), then per
size measures, each in a fresh Python process (its peak RSS is the driver's memory):
  - a rerun of 2,000 images already committed in the newest night: `vitray.score.score`
    from its start to its manifest (plan, compaction, report), and the plan alone;
  - planning an input of 1 M files (listing + what is left) beside the output;
  - the files under predictions/ and the report's time.
`--e2e 20000,200000` scores that many small PNGs end to end on the embedded Ray (images/s,
driver peak, files, a rerun with nothing left; each size but the largest `--e2e-repeats` times); `--s3 2000` scores that many from a
SeaweedFS bucket into one through a counting proxy (requests per image by kind). The
figures and their reading are in docs/scale.md.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["passed", "Xminus", "Xplus", "Yminus", "Yplus"]
NIGHT = 1_000_000  # images a night
RERUN = 2_000
FILE_ROWS = 50_000
PYCACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "vitray-scale-pycache")


# --------------------------------------------------------------------------- synthetic outputs


def night_ids(night: int, start: int, stop: int) -> list[str]:
    return [f"night-{night:04d}/cam{i % 100:02d}/{i:07d}.png" for i in range(start, stop)]


def write_file(out: str, run_id: str, ids: list[str], seed: int) -> None:
    """One compacted predictions file of `ids`, as a run's compaction writes it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from vitray import storage
    from vitray.score.compaction import ROW_GROUP_ROWS
    from vitray.score.outputs import PREDICTIONS_SCHEMA, SUMMARY_KEY, parquet_bytes, summarize

    rng = np.random.default_rng(seed)
    n = len(ids)
    probs = rng.dirichlet(np.ones(len(LABELS)), n).astype(np.float32)
    pred = probs.argmax(1)
    id_column = pa.array(ids, pa.string())
    label = pa.array(np.array(LABELS, dtype=object)[pred], pa.string())
    defect = pa.array(pred != 0)
    png = pc.if_else(defect, pc.binary_join_element_wise("attention/", id_column, "-0123456789abcdef.png", ""), None)
    offsets = pa.array(np.arange(0, (n + 1) * len(LABELS), len(LABELS), dtype=np.int32))
    columns = {
        "id": id_column, "path": pc.binary_join_element_wise("/nights/", id_column, ""), "label": label,
        "score": pa.array(probs.max(1)), "probs": pa.ListArray.from_arrays(offsets, pa.array(probs.ravel())),
        "attention_png": png, "model": pa.array(["/models/vit"] * n), "run_id": pa.array([run_id] * n),
    }  # the other columns (maps, decisions) null
    table = pa.table([columns.get(f.name, pa.nulls(n, f.type)) for f in PREDICTIONS_SCHEMA], schema=PREDICTIONS_SCHEMA)
    table = table.replace_schema_metadata({SUMMARY_KEY: json.dumps(summarize(table))})
    name = f"run={run_id}/part-{seed:016x}.parquet"
    storage.put(storage.resolve(out).child("predictions", *name.split("/")), parquet_bytes(table, ROW_GROUP_ROWS))


def build_output(out: str, rows: int) -> str:
    """An output of `rows` committed rows in nights of up to 1 M; returns the newest night's run id."""
    nights = -(-rows // NIGHT)
    run_id = ""
    for night in range(nights):
        run_id = f"2026{(night // 28) % 12 + 1:02d}{night % 28 + 1:02d}T020000Z-{night:06x}"
        size = min(NIGHT, rows - night * NIGHT)
        for start in range(0, size, FILE_ROWS):
            write_file(out, run_id, night_ids(night, start, min(size, start + FILE_ROWS)), night * 1000 + start // FILE_ROWS)
        from vitray import storage
        storage.write_json(storage.join(out, "runs", f"{run_id}.json"), {
            "run_id": run_id, "status": "complete", "started": run_id[:16], "model": "/models/vit",
            "counts": {"scored": size, "skipped": 0, "errors": 0}, "images_per_s": None})
    return f"night-{nights - 1:04d}"


def rerun_input(work: str, night: str) -> str:
    """2,000 PNG files whose ids are the first 2,000 of the newest night (already committed)."""
    folder = os.path.join(work, f"rerun-{night}")
    if os.path.isdir(folder):
        return folder
    blobs = small_pngs(16)
    for i in range(RERUN):
        path = os.path.join(folder, night, f"cam{i % 100:02d}", f"{i:07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(blobs[i % len(blobs)])
    return folder


def spread_input(work: str, nights: int) -> str:
    """2,000 empty files, committed ids spread evenly over every night: planning's worst case."""
    folder = os.path.join(work, f"spread-{nights}")
    if not os.path.isdir(folder):
        for i in range(RERUN):
            night, n = i % nights, (i // nights) * (NIGHT // (RERUN // nights + 1))
            path = os.path.join(folder, f"night-{night:04d}", f"cam{n % 100:02d}", f"{n:07d}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()
    return folder


def small_pngs(count: int, side: int = 32) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def image_files(folder: str, n: int, empty: bool = False) -> str:
    """`n` files under folder/camXX/ (small PNGs, or empty files for listing only)."""
    marker = os.path.join(folder, ".complete")
    if os.path.exists(marker):
        return folder
    blobs = [b""] if empty else small_pngs(64)
    for d in range(100):
        os.makedirs(os.path.join(folder, f"cam{d:02d}"), exist_ok=True)
    for i in range(n):
        with open(os.path.join(folder, f"cam{i % 100:02d}", f"{i:07d}.png"), "wb") as f:
            f.write(blobs[i % len(blobs)])
    open(marker, "w").close()
    return folder


def tiny_model(work: str) -> str:
    """An untrained tiny ViT (32 px, patch 4): the cost per image is the pipeline's, not the model's."""
    folder = os.path.join(work, "model")
    if os.path.isdir(folder):
        return folder
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from vitray.models import Preprocessing, export_model

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=len(LABELS),
                       id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)
    export_model(model, Preprocessing.default(32, 3), folder)
    return folder


# --------------------------------------------------------------------------- measured in a child process


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_plan(output: str, input_uri: str) -> dict[str, Any]:
    """List the input and find what is left, as a run does before scoring (libraries imported first)."""
    from vitray.data.sources import inspect_source
    from vitray.score.planning import plan_run

    started = time.perf_counter()
    source = inspect_source(input_uri, "images")
    listed = time.perf_counter()
    planned = plan_run(output, source.ids)
    return {"list_s": listed - started, "plan_s": time.perf_counter() - started, "listed": len(source),
            "remaining": len(planned.remaining), "peak_mib": peak_mib()}


def child_score(output: str, input_uri: str, model: str, ray: bool, attention: str) -> dict[str, Any]:
    """One `vitray.score.score` run, from its start to its manifest."""
    started = time.perf_counter()
    from vitray.score import ScoreConfig, score

    config = ScoreConfig(model=model, input=input_uri, output=output, attention=attention,
                         in_process_max=0 if ray else 10**9)
    manifest = score(config)
    return {"wall_s": time.perf_counter() - started, "peak_mib": peak_mib(), "counts": manifest["counts"],
            "images_per_s": manifest.get("images_per_s"), "compacted": manifest.get("compacted"),
            "scoring_s": manifest.get("scoring_s")}


def child_warm(model: str) -> dict[str, Any]:
    from vitray.models import describe_trained
    from vitray.score.report import write_report  # noqa: F401

    describe_trained(model)
    return {}


def child_report(output: str) -> dict[str, Any]:
    from vitray.score.report import write_report

    started = time.perf_counter()
    write_report(output)
    return {"report_s": time.perf_counter() - started, "peak_mib": peak_mib()}


def in_child(kind: str, *args: Any, env: dict | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh Python: its memory is the driver's alone."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--args", json.dumps(list(args))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(env), cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_env(extra: dict | None) -> dict[str, str]:
    """The children import with cached bytecode, as an installed vitray does (not recompiling torch and
    transformers each time, which PYTHONDONTWRITEBYTECODE would make them do)."""
    env = {**os.environ, **(extra or {})}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = PYCACHE
    return env


def files_under(output: str) -> int:
    from vitray import storage

    return sum(1 for f in storage.list_files(storage.join(output, "predictions")) if f.path.endswith(".parquet"))


# --------------------------------------------------------------------------- S3 requests


class Counting(BaseHTTPRequestHandler):
    """Forwards every request to the S3 server and counts it by kind (GET, PUT, LIST, ...), and apart
    those on the input's keys (`/night/in...`: its listing and reads)."""

    protocol_version = "HTTP/1.1"
    upstream = ("127.0.0.1", 0)
    counts: Counter = Counter()
    input_bucket, input_prefix = "night", "in"
    input_counts: Counter = Counter()
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if not size:
                while self.rfile.readline().strip():
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _forward(self) -> None:
        body = self._body()
        kind = self.command
        if self.command == "GET" and ("list-type" in self.path or self.path.rstrip("/").count("/") <= 1):
            kind = "LIST"
        path, _, query = self.path.partition("?")
        on_input = path.startswith(f"/{self.input_bucket}/{self.input_prefix}") or (
            path.rstrip("/") == f"/{self.input_bucket}" and f"prefix={self.input_prefix}" in query)
        with self.lock:
            self.counts[kind] += 1
            if on_input:
                self.input_counts[kind] += 1
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "transfer-encoding")}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        reply = conn.getresponse()
        data = reply.read()
        self.send_response(reply.status, reply.reason)
        for key, value in reply.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else
                                                reply.getheader("Content-Length") or 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def s3_requests(work: str, n: int, model: str) -> dict[str, Any]:
    """Score `n` PNGs from one S3 prefix into another; the requests per image, by kind."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import boto3  # noqa: F401 - the S3 server's client
    from s3server import SeaweedS3

    with SeaweedS3() as s3:
        s3.make_bucket("night")
        client = s3.client()
        for i, blob in enumerate(small_pngs(64) * (n // 64 + 1)):
            if i == n:
                break
            client.put_object(Bucket="night", Key=f"in/cam{i % 10}/{i:06d}.png", Body=blob)
        host, port = s3.endpoint.split("://")[1].split(":")
        Counting.upstream = (host, int(port))
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), Counting)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        env = {**s3.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}"}
        env.pop("AWS_ENDPOINT_URL_S3", None)
        Counting.counts.clear()
        Counting.input_counts.clear()
        result = in_child("score", "s3://night/out", "s3://night/in", model, True, "defects", env=env)
        counts, reads = dict(Counting.counts), dict(Counting.input_counts)
        overlays = sum(1 for _ in client.get_paginator("list_objects_v2").paginate(Bucket="night", Prefix="out/attention/")
                       for _ in _.get("Contents", []))
        proxy.shutdown()
    total = sum(counts.values())
    return {"images": n, "requests": counts, "input_requests": reads, "overlays": overlays, "per_image": total / n,
            "per_image_besides_overlays": (total - overlays) / n,
            "input_per_image": sum(reads.values()) / n, "score": result}


# --------------------------------------------------------------------------- the table


def measure_size(work: str, rows: int, model: str, listing: str | None) -> dict[str, Any]:
    out = os.path.join(work, f"out-{rows}")
    if not os.path.isdir(os.path.join(out, "predictions")):
        started = time.perf_counter()
        night = build_output(out, rows)
        print(f"  built {rows:,} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    night = f"night-{-(-rows // NIGHT) - 1:04d}"
    rerun = rerun_input(work, night)
    row: dict[str, Any] = {"committed": rows, "files": files_under(out)}
    row["rerun_plan"] = in_child("plan", out, rerun)
    row["spread_plan"] = in_child("plan", out, spread_input(work, -(-rows // NIGHT)))
    row["rerun"] = in_child("score", out, rerun, model, False, "defects")
    row["report"] = in_child("report", out)
    if listing:
        row["plan_1m"] = in_child("plan", out, listing)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| committed rows | files | rerun of 2,000: wall s / driver MiB | its plan s | plan s, ids over every "
          "night | report s | plan of 1 M new files: s (listing s) / driver MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        plan = r.get("plan_1m")
        big = f"{plan['plan_s']:.1f} ({plan['list_s']:.1f}) / {plan['peak_mib']:.0f}" if plan else "-"
        print(f"| {r['committed']:,} | {r['files']:,} | {r['rerun']['wall_s']:.1f} / {r['rerun']['peak_mib']:.0f} | "
              f"{r['rerun_plan']['plan_s'] - r['rerun_plan']['list_s']:.2f} | "
              f"{r['spread_plan']['plan_s'] - r['spread_plan']['list_s']:.2f} "
              f"({r['spread_plan']['remaining']} left) | {r['report']['report_s']:.2f} | {big} |")
    if len(rows) >= 2 and rows[-1].get("plan_1m") and rows[-2].get("plan_1m"):
        a, b = rows[-2], rows[-1]
        print(f"ratio {a['committed']:,} -> {b['committed']:,} committed: rerun wall "
              f"{b['rerun']['wall_s'] / a['rerun']['wall_s']:.2f}x, plan of 1 M files "
              f"{b['plan_1m']['plan_s'] / a['plan_1m']['plan_s']:.2f}x time, "
              f"{b['plan_1m']['peak_mib'] / a['plan_1m']['peak_mib']:.2f}x memory")


def write_times(out: str) -> list[float]:
    """The overlays' write times, sorted: one per scored image."""
    return sorted(os.stat(os.path.join(d, f)).st_mtime for d, _, fs in os.walk(os.path.join(out, "attention"))
                  for f in fs)


def steady_rate(times: list[float]) -> float:
    """Images/s between the 10th and 90th percentile of the overlays' write times: the pipeline's
    rate without Ray's start-up and the model's load, which `images_per_s` includes."""
    if len(times) < 10:
        return float("nan")
    low, high = times[len(times) // 10], times[9 * len(times) // 10]
    return 0.8 * len(times) / (high - low) if high > low else float("nan")


def decile_rates(times: list[float]) -> list[float]:
    """Images/s in each tenth of a run's images: a cost per image that grew with the images
    scored so far would fall from one tenth to the next."""
    edges = [round(i * (len(times) - 1) / 10) for i in range(11)]
    return [(edges[i + 1] - edges[i]) / max(1e-9, times[edges[i + 1]] - times[edges[i]]) for i in range(10)]


def end_to_end(work: str, sizes: list[int], model: str, repeats: int = 1) -> list[dict[str, Any]]:
    """Each size scored into a fresh output, then again with nothing left; a size other than the
    largest `repeats` times, its figures the run of the median steady rate (a small run is a
    window of seconds, whose rate swings with the machine)."""
    results = []
    for n in sizes:
        images = image_files(os.path.join(work, f"e2e-in-{n}"), n)
        out = os.path.join(work, f"e2e-out-{n}")
        runs = []
        for _ in range(repeats if n < max(sizes) else 1):
            shutil.rmtree(out, ignore_errors=True)
            first = in_child("score", out, images, model, True, "defects")
            again = in_child("score", out, images, model, True, "defects")
            times = write_times(out)
            runs.append({"images": n, "run": first, "rerun": again, "files": files_under(out),
                         "steady_per_s": steady_rate(times), "decile_per_s": decile_rates(times)})
            print(f"  e2e {n:,}: {first['images_per_s']} img/s ({runs[-1]['steady_per_s']:.0f} steady), driver "
                  f"{first['peak_mib']:.0f} MiB, {files_under(out)} files; rerun {again['wall_s']:.1f} s",
                  file=sys.stderr)
        runs.sort(key=lambda r: r["steady_per_s"])
        results.append({**runs[len(runs) // 2], "steady_runs_per_s": [r["steady_per_s"] for r in runs]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/vitray-scale")
    parser.add_argument("--sizes", default="10000,100000,1000000,10000000")
    parser.add_argument("--listing", type=int, default=1_000_000, help="input files to plan (0: none)")
    parser.add_argument("--e2e", default="", help="images scored end to end, e.g. 20000,200000")
    parser.add_argument("--e2e-repeats", type=int, default=3,
                        help="runs of each --e2e size but the largest (the median's figures are kept)")
    parser.add_argument("--s3", type=int, default=0, help="images scored S3 to S3 through the counting proxy")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--child")
    parser.add_argument("--args")
    args = parser.parse_args()
    if args.child:
        fn = {"plan": child_plan, "score": child_score, "report": child_report, "warm": child_warm}[args.child]
        print(json.dumps(fn(*json.loads(args.args))))
        return
    os.makedirs(args.work, exist_ok=True)
    model = tiny_model(args.work)
    in_child("warm", model)  # bytecode cached once, before anything is timed
    listing = image_files(os.path.join(args.work, f"listing-{args.listing}"), args.listing, empty=True) \
        if args.listing else None
    figures: dict[str, Any] = {"sizes": []}
    for rows in [int(s) for s in args.sizes.split(",") if s]:
        figures["sizes"].append(measure_size(args.work, rows, model, listing if rows >= 1_000_000 else None))
        print(json.dumps(figures["sizes"][-1]), file=sys.stderr)
    print_table(figures["sizes"])
    if args.e2e:
        figures["e2e"] = end_to_end(args.work, [int(s) for s in args.e2e.split(",")], model, args.e2e_repeats)
        base, big = figures["e2e"][0], figures["e2e"][-1]
        for r in figures["e2e"]:
            print(f"end to end {r['images']:,} images: {r['run']['images_per_s']:.1f} img/s "
                  f"({r['steady_per_s']:.0f} between the 10th and 90th percentile of its writes; runs: "
                  f"{', '.join(f'{v:.0f}' for v in r['steady_runs_per_s'])}), driver peak "
                  f"{r['run']['peak_mib']:.0f} MiB, {r['files']} predictions files, rerun with nothing left "
                  f"{r['rerun']['wall_s']:.1f} s / {r['rerun']['peak_mib']:.0f} MiB")
        print(f"ratio {big['images']:,} / {base['images']:,}: images/s "
              f"{big['run']['images_per_s'] / base['run']['images_per_s']:.2f} (steady "
              f"{big['steady_per_s'] / base['steady_per_s']:.2f}), driver memory "
              f"{big['run']['peak_mib'] / base['run']['peak_mib']:.2f}")
        tenths = big["decile_per_s"]
        print(f"{big['images']:,} images, images/s in each tenth: {' '.join(f'{r:.0f}' for r in tenths)}; "
              f"last tenth / second tenth {tenths[-1] / tenths[1]:.2f} (the first is the start's burst)")
    if args.s3:
        figures["s3"] = s3_requests(args.work, args.s3, model)
        s3 = figures["s3"]
        print(f"S3, {s3['images']:,} images from a bucket into one: {s3['per_image']:.3f} requests per image, "
              f"{s3['per_image_besides_overlays']:.3f} besides the {s3['overlays']:,} overlay PUTs "
              f"({s3['input_per_image']:.3f} reading the input: {s3['input_requests']}); by kind {s3['requests']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
