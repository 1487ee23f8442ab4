"""Start-up of small runs: `vitray score` and `vitray train` against plain single-process scripts, side by side.

    python benchmarks/startup.py [--images 2000] [--train-images 300] [--rounds 2] [--out startup.json]

Writes N PNGs (64 px) and a default-preset model, then alternates, `--rounds` times:
- `vitray score --attention none` as a user runs it (a fresh process, no cluster named: up to
  `--in-process-max` images it scores in its own process), with a timeline: the first line it
  prints, the first committed piece, the exit;
- the same with `--in-process-max 0`: on an embedded Ray, as a larger run is;
- a plain script: import torch and transformers, load the model, decode with PIL, forward in
  batches of 64, write one parquet file;
- `vitray explain` on 3 of the images against a plain script that draws the same rollout maps.
- `vitray train` on `--train-images` synthetic inspection images (32 px, 1 epoch, `--workers 2`)
  as a user runs it (a fresh process, no cluster named: up to `--in-process-max` images it
  trains in its own process), with its first output line, its first epoch's line and its exit;
  the same with `--in-process-max 0` (on an embedded Ray, as a larger run is), and on Ray with
  Ray Train's own controller poll (every 2 s) instead of vitray's; a plain script that trains
  the same model for one epoch in one process.
Prints the medians and the ratios of the wall times to the plain script's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

PLAIN = r'''
import sys, os, time
import numpy as np, torch, pyarrow as pa, pyarrow.parquet as pq
from PIL import Image
from transformers import ViTForImageClassification
model = ViTForImageClassification.from_pretrained(sys.argv[1]).eval()
names = sorted(os.listdir(sys.argv[2]))
rows = []
with torch.inference_mode():
    for start in range(0, len(names), 64):
        part = names[start:start + 64]
        x = np.stack([np.asarray(Image.open(os.path.join(sys.argv[2], n)).convert("RGB")) for n in part])
        x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
        probs = model(pixel_values=x).logits.softmax(-1)
        rows += [(n, int(p.argmax()), float(p.max())) for n, p in zip(part, probs)]
pq.write_table(pa.table({"id": [r[0] for r in rows], "pred": [r[1] for r in rows], "score": [r[2] for r in rows]}),
               sys.argv[3])
'''

# `vitray explain` by hand: the model with attention weights, mean-fused rollout, one map PNG per image.
PLAIN_EXPLAIN = r'''
import sys, os
import numpy as np, torch
from PIL import Image
from transformers import ViTForImageClassification
model = ViTForImageClassification.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
side = model.config.image_size // model.config.patch_size
for path in sys.argv[3:]:
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        attentions = model(pixel_values=(x - 0.5) / 0.5, output_attentions=True).attentions
    rollout = torch.eye(attentions[0].shape[-1])
    for layer in attentions:
        a = layer[0].mean(0) + torch.eye(layer.shape[-1])
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    heat = rollout[0, 1:].reshape(side, side)
    heat = (255 * heat / heat.max()).numpy().astype(np.uint8)
    Image.fromarray(heat).resize(x.shape[-2:]).save(os.path.join(sys.argv[2], os.path.basename(path)))
'''


# One epoch of the same model in one process: PIL, torch, transformers, nothing else.
PLAIN_TRAIN = r'''
import sys, os, time
start = time.perf_counter()
import numpy as np, torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification
model = ViTForImageClassification(ViTConfig.from_json_file(sys.argv[1]))
folders = sorted(e.path for e in os.scandir(sys.argv[2]) if e.is_dir())
items = [(os.path.join(d, n), c) for c, d in enumerate(folders) for n in sorted(os.listdir(d))]
x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in items])).permute(0, 3, 1, 2)
x, y = (x.float() / 255 - 0.5) / 0.5, torch.tensor([c for _, c in items])
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
order = torch.randperm(len(y))
for step, i in enumerate(range(0, len(y), 32)):
    batch = order[i:i + 32]
    loss = torch.nn.functional.cross_entropy(model(pixel_values=x[batch]).logits, y[batch])
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    if step == 0:
        print(f"first_step_s {time.perf_counter() - start}", flush=True)
print(f"epoch_s {time.perf_counter() - start}", flush=True)
'''


VITRAY = os.path.join(os.path.dirname(sys.executable), "vitray")


def user_env(**extra: str) -> dict[str, str]:
    """This environment without RAY_ADDRESS (no cluster: as a user at a terminal), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **extra}


def make_inputs(root: str, n: int) -> tuple[str, str]:
    from PIL import Image

    from vitray.models import build_model, export_model

    images = os.path.join(root, "images")
    os.makedirs(images)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(os.path.join(images, f"{i:05d}.png"))
    model, prep = build_model(None, ["passed", "Xplus", "Xminus", "Yplus", "Yminus"], 64)
    export_model(model, prep, os.path.join(root, "model"))
    return images, os.path.join(root, "model")


def vitray_run(images: str, model: str, out: str, *extra: str) -> dict[str, float]:
    """Seconds from the command to: its first output line, the first and last committed piece, its exit."""
    events: dict[str, float] = {}
    start = time.perf_counter()
    proc = subprocess.Popen([VITRAY, "score", "--model", model, "--input", images, "--output", out,
                             "--attention", "none", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=user_env())
    done = threading.Event()

    def watch() -> None:
        predictions = os.path.join(out, "predictions")
        while not done.is_set():
            if os.path.isdir(predictions) and any(n.endswith(".parquet") for n in os.listdir(predictions)):
                events.setdefault("first_piece_s", time.perf_counter() - start)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for line in proc.stdout:
        events.setdefault("first_line_s", time.perf_counter() - start)
    proc.wait()
    events["exit_s"] = time.perf_counter() - start
    done.set()
    if proc.returncode != 0:
        raise RuntimeError(f"vitray score exited with {proc.returncode}")
    manifest = max((os.path.join(out, "runs", n) for n in os.listdir(os.path.join(out, "runs"))), key=os.path.getmtime)
    events["scoring_s"] = json.load(open(manifest))["scoring_s"]
    return events


def make_train_inputs(root: str, n: int) -> tuple[str, str]:
    """An inspection image folder (32 px) and the default preset's config for it."""
    from vitray.data import synth
    from vitray.data.synth import LABEL_NAMES
    from vitray.models import build_model

    data = os.path.join(root, "train-data")
    synth.write(data, fmt="imagefolder", n=n, size=32, seed=1)
    model, _ = build_model(None, list(LABEL_NAMES), 32)
    config = os.path.join(root, "train-config.json")
    model.config.to_json_file(config)
    return data, config


def train_run(data: str, out: str, *extra: str, poll_s: str | None = None) -> dict[str, float]:
    """Seconds from `vitray train` to its first output line, to the end of its epoch and to its exit."""
    env = user_env(**({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": poll_s} if poll_s else {}))
    events: dict[str, float] = {}
    start = time.perf_counter()
    proc = subprocess.Popen([VITRAY, "train", "--data", data, "--out", out, "--epochs", "1", "--workers", "2",
                             "--batch-size", "32", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    for line in proc.stdout:
        events.setdefault("first_line_s", time.perf_counter() - start)
        if line.startswith("epoch 1/1:"):
            events["epoch_s"] = time.perf_counter() - start
    proc.wait()
    events["exit_s"] = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"vitray train exited with {proc.returncode}")
    return events


def plain_train(data: str, config: str) -> dict[str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PLAIN_TRAIN, config, data], check=True, capture_output=True,
                          text=True)
    first = float(done.stdout.split("first_step_s")[1].split()[0])
    epoch = float(done.stdout.split("epoch_s")[1].split()[0])
    return {"first_step_s": first, "epoch_s": epoch, "exit_s": time.perf_counter() - start}


def plain_run(images: str, model: str, out: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", PLAIN, model, images, out], check=True)
    return time.perf_counter() - start


def explain_pair(images: str, model: str, root: str, n: int = 3) -> tuple[float, float]:
    """Seconds of `vitray explain` on n images, and of the plain script that draws the same maps."""
    paths = [os.path.join(images, name) for name in sorted(os.listdir(images))[:n]]
    start = time.perf_counter()
    subprocess.run([VITRAY, "explain", "--model", model, "--out", os.path.join(root, "explain"), *paths],
                   check=True, capture_output=True)
    ours = time.perf_counter() - start
    os.makedirs(os.path.join(root, "plain-explain"), exist_ok=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", PLAIN_EXPLAIN, model, os.path.join(root, "plain-explain"), *paths],
                   check=True)
    return ours, time.perf_counter() - start


def measure(n_images: int = 2000, train_images: int = 300, rounds: int = 2) -> dict:
    """Every start-up figure, the medians of `rounds` alternating rounds (0 images: that part is left out)."""
    with tempfile.TemporaryDirectory() as root:
        if n_images:
            images, model = make_inputs(root, n_images)
        runs, on_ray, plain, explains = [], [], [], []
        trains: dict[str, list[dict[str, float]]] = {"vitray": [], "on_ray": [], "on_ray_poll_2s": [], "plain": []}
        if train_images:
            train_data, train_config = make_train_inputs(root, train_images)
        for r in range(rounds):
            if train_images:
                trains["vitray"].append(train_run(train_data, os.path.join(root, f"train-{r}")))
                trains["on_ray"].append(train_run(train_data, os.path.join(root, f"ray-train-{r}"),
                                                  "--in-process-max", "0"))
                trains["on_ray_poll_2s"].append(train_run(train_data, os.path.join(root, f"ray-train-2s-{r}"),
                                                          "--in-process-max", "0", poll_s="2"))
                trains["plain"].append(plain_train(train_data, train_config))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]}" for k, v in trains.items()), flush=True)
            if not n_images:
                continue
            runs.append(vitray_run(images, model, os.path.join(root, f"scores-{r}")))
            on_ray.append(vitray_run(images, model, os.path.join(root, f"ray-{r}"), "--in-process-max", "0"))
            plain.append(plain_run(images, model, os.path.join(root, f"plain-{r}.parquet")))
            explains.append(explain_pair(images, model, root))
            print(f"round {r + 1}: vitray {runs[-1]}, on Ray {on_ray[-1]}, plain script {plain[-1]:.1f} s; "
                  f"explain on 3 images {explains[-1][0]:.1f} s, plain {explains[-1][1]:.1f} s", flush=True)
    result: dict = {"images": n_images}
    if n_images:
        median = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
        median_ray = {k: round(statistics.median(r[k] for r in on_ray), 2) for k in on_ray[0]}
        plain_s = statistics.median(plain)
        result.update({"vitray": median, "vitray_on_ray": median_ray, "plain_s": round(plain_s, 2),
                       "ratio": round(median["exit_s"] / plain_s, 2),
                       "ratio_on_ray": round(median_ray["exit_s"] / plain_s, 2)})
        ours, theirs = (statistics.median(e[i] for e in explains) for i in (0, 1))
        result["explain_3_images"] = {"vitray_s": round(ours, 2), "plain_s": round(theirs, 2),
                                      "ratio": round(ours / theirs, 2)}
    if train_images:
        train = {k: {e: round(statistics.median(run[e] for run in v), 2) for e in v[0]} for k, v in trains.items()}
        result["train"] = {"images": train_images, **train,
                           "ratio": round(train["vitray"]["exit_s"] / train["plain"]["exit_s"], 2),
                           "ratio_on_ray": round(train["on_ray"]["exit_s"] / train["plain"]["exit_s"], 2),
                           "poll_saving_s": round(train["on_ray_poll_2s"]["exit_s"] - train["on_ray"]["exit_s"], 2)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="0: no scoring figures")
    parser.add_argument("--train-images", type=int, default=300, help="0: no training figures")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = measure(args.images, args.train_images, args.rounds)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
