"""How well each attention-map setting localises defects, for a trained inspection model.

    python benchmarks/maps.py --model q/inspection/seed1/train/model [--style synth|alt|render3] [--n 1000 --seed 2001]

Renders the test set that `benchmarks/quality.py` evaluates on (same arguments; `render3` is the
held-out renderer of `benchmarks/render3.py`), keeps the defect
images, and for every map setting prints pointing game and energy in box against the part's box
(what `vitray evaluate` reports) and against the box around the part and its seat together (the
gap between them is where a shift shows). A last row measures the plain input gradient
(|d logit / d pixel| of the predicted class, summed over each patch's pixels and channels): no
attention at all, so it says where the model's evidence lies whatever the map method.

Faithfulness: a deletion curve per setting. The patches are replaced with the image's mean, a
tenth of them at a time, in the map's order (highest first) and in a random order; the area
under the predicted class's probability (AUC, fraction deleted 0 to 1) is lower the sooner the
map's patches take the evidence away. A map that shows where the model looks has a map AUC
well under the random one. Runs on the CPU in a minute or two, without Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # vitray, and render3 beside this script

SETTINGS = [("rollout", "mean", 0.0), ("rollout", "mean", 0.5), ("rollout", "mean", 0.9),
            ("rollout", "max", 0.0), ("rollout", "max", 0.9), ("rollout", "min", 0.0),
            ("grad-rollout", "mean", 0.0)]


def union(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float, float, float]:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def input_gradient(model, pixels) -> np.ndarray:
    """(B, rows, cols): |d logit of the predicted class / d input| summed over each patch."""
    pixels = pixels.clone().requires_grad_(True)
    logits = model(pixel_values=pixels).logits
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    saliency = pixels.grad.abs().sum(1)  # (B, H, W)
    patch = model.config.patch_size
    b, h, w = saliency.shape
    return saliency.reshape(b, h // patch, patch, w // patch, patch).sum((2, 4)).numpy()


def deletion_auc(model, x, maps, rng, steps: int = 10) -> tuple[float, float]:
    """Mean AUC of the predicted class's probability as patches go: in the maps' order, and at random."""
    import torch

    n, _, size, _ = x.shape
    grid = maps.shape[-1]
    patch = size // grid
    with torch.no_grad():
        predicted = model(pixel_values=x).logits.argmax(1)
    mean = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    by_map = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")
    at_random = np.argsort(rng.random((n, grid * grid)), axis=1)
    aucs = []
    for order in (by_map, at_random):
        curve = []
        for k in np.linspace(0, grid * grid, steps + 1).round().astype(int):
            gone = np.zeros((n, grid * grid), dtype=bool)
            np.put_along_axis(gone, order[:, :k], True, axis=1)
            mask = torch.from_numpy(gone.reshape(n, 1, grid, 1, grid, 1))
            mask = mask.expand(n, 1, grid, patch, grid, patch).reshape(n, 1, size, size)
            with torch.no_grad():
                probs = model(pixel_values=torch.where(mask, mean, x)).logits.softmax(1)
            curve.append(probs.gather(1, predicted[:, None]).mean().item())
        aucs.append(float(np.trapezoid(curve, dx=1.0 / steps)))
    return aucs[0], aucs[1]


def main() -> int:
    import torch

    from vitray.data import synth
    from vitray.data.preprocess import normalize, resize_image
    from vitray.attention import register_weights_attention
    from vitray.rollout import attention_maps
    from vitray.localisation import energy_in_box, pointing_game
    from vitray.models import load_trained

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--style", default="synth", choices=(*synth.STYLES, "render3"))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2001)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    model, prep, _ = load_trained(args.model, attn_implementation=register_weights_attention())
    if args.style == "render3":
        import render3
        rendered = render3.scenes(args.n, 0.2, args.size, args.seed)
    else:
        rendered = synth.generate(n=args.n, passed_fraction=0.2, size=args.size, seed=args.seed, style=args.style)
    samples = [s for s in rendered if s.label != "passed"]
    pixels = np.stack([resize_image(s.image, prep.size, prep.channels) for s in samples])
    x = normalize(torch.from_numpy(pixels), prep.mean, prep.std)
    hw = (args.size, args.size)
    part_area = np.mean([(s.bbox[2] - s.bbox[0]) * (s.bbox[3] - s.bbox[1]) for s in samples]) / (hw[0] * hw[1])
    print(f"{len(samples)} defect images; part box {part_area:.1%} of the image")
    print("| map | pointing / energy (part) | pointing / energy (part + seat) | deletion AUC map / random |\n"
          "|---|---|---|---|")
    for method, fusion, discard in SETTINGS + [("input-gradient", "", 0.0)]:
        if method == "input-gradient":
            maps = np.concatenate([input_gradient(model, x[i:i + 128]) for i in range(0, len(x), 128)])
        else:
            maps = np.concatenate([attention_maps(model, x[i:i + 128], method=method, head_fusion=fusion,
                                                  discard_ratio=discard)[0].numpy() for i in range(0, len(x), 128)])
        part = [(pointing_game(m, s.bbox, hw), energy_in_box(m, s.bbox, hw)) for m, s in zip(maps, samples)]
        both = [(pointing_game(m, union(s.bbox, s.seat), hw), energy_in_box(m, union(s.bbox, s.seat), hw))
                for m, s in zip(maps, samples)]
        (p1, e1), (p2, e2) = np.mean(part, axis=0), np.mean(both, axis=0)
        auc_map, auc_random = deletion_auc(model, x, maps, np.random.default_rng(args.seed))
        name = f"{method}, {fusion}, discard {discard:g}" if method == "rollout" else method
        print(f"| {name} | {p1:.2f} / {e1:.2f} | {p2:.2f} / {e2:.2f} | {auc_map:.3f} / {auc_random:.3f} |", flush=True)
        print(json.dumps({"method": method, "head_fusion": fusion, "discard_ratio": discard, "pointing": round(p1, 3),
                          "energy": round(e1, 3), "pointing_part_seat": round(p2, 3), "energy_part_seat": round(e2, 3),
                          "deletion_auc": round(auc_map, 4), "deletion_auc_random": round(auc_random, 4)}),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
