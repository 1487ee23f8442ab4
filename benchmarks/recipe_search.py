"""Recipe exploration on a lent GPU machine, which has no Ray: vitray's own model config,
augmentation, class weights, schedule, metrics and attention maps, in a plain loop.

It measures recipe variants quickly; `vitray train` is what users run. Repeat the tables of docs/benchmarks.md:
    python benchmarks/recipe_search.py insp synth '[{"name":"default","patch":8,"bs":32}]'
    python benchmarks/recipe_search.py digits - '[{"name":"p2","patch":2,"bs":32,"epochs":100}]'
    python benchmarks/recipe_search.py digits 3 '[...]'   (a stratified 80/20 split, seed 3; the SVM's accuracy first)
"""
import dataclasses, json, math, sys, time, os
sys.path.insert(0, os.getcwd())
import numpy as np, torch
from transformers import ViTConfig, ViTForImageClassification
from vitray.data import synth
from vitray.data.preprocess import AugmentConfig, augment_batch, normalize, resize_image
from vitray.models import PRESETS
from vitray.data.sampling import class_weights
from vitray.train.loop import make_scheduler
from vitray.metrics import classification_metrics
from vitray.rollout import attention_maps
from vitray.localisation import energy_in_box, pointing_game

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

def data(style, n, frac, seed, size=64):
    xs, ys, bs = [], [], []
    names = sorted(synth.CLASSES)
    for s in synth.generate(n, frac, size, seed, style):
        xs.append(s.image); ys.append(names.index(s.label)); bs.append(s.bbox)
    return np.stack(xs), np.array(ys), np.array(bs, np.float32), names

def digits(split=None):
    """scikit-learn's digits: the project's fifth (permutation seed 0), or with `split` a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    d = load_digits(); X = (d.images*255/16).round().astype(np.uint8)[..., None]
    if split is None:
        rng = np.random.default_rng(0); o = rng.permutation(len(d.target)); cut = int(.8*len(o)); tr, te = o[:cut], o[cut:]
    else:
        from quality import digits_split  # the split benchmarks/quality.py measures on
        tr, te = digits_split(split)
    return X[tr], d.target[tr], X[te], d.target[te], [str(i) for i in range(10)]

def svm_accuracy(Xtr, ytr, Xte, yte):
    """The baseline the digits target names: an RBF SVM on the raw 8x8 pixels (0..16), SVC(gamma=0.001, C=10)."""
    from sklearn.svm import SVC
    f = lambda X: X.reshape(len(X), -1) * (16 / 255)
    return float((SVC(gamma=0.001, C=10).fit(f(Xtr), ytr).predict(f(Xte)) == yte).mean())

def resized(X, b, size):
    """Images and boxes at `size` px, as vitray's Ray Data resize makes them."""
    if size == X.shape[1]:
        return X, b
    return np.stack([resize_image(x, size, X.shape[3]) for x in X]), b * (size / X.shape[1])

def run(name, Xtr, ytr, btr, Xte, yte, bte, labels, preset="vit-tiny", patch=8, lr=1e-3, epochs=40, bs=64,
        wd=0.05, warm=0.1, ls=0.1, cw=True, aug=True, size=None, extra=None, seed=0, rot=0.0, zoom=0.0,
        shift=None, ema=0.0, balance=0.0, holdout=0.0, sincos=False, mixup=0.0, cutmix=0.0, every=5, flips=True,
        lighting=True, stop=None, embed=None, pos_scale=1.0):
    """balance: sample each epoch with replacement, class c drawn ∝ count_c^(1-balance) (1: uniform
    over classes); holdout: drop this stratified share of the training set, as vitray train's
    validation split does; mixup / cutmix: Beta(a, a) mixing of each batch with a shuffled copy
    of itself (both given: one or the other per batch, even odds); every: measure the test set
    every this many epochs (the curve); flips / lighting: False turns that part of the augmentation off;
    stop: end after this many epochs (the schedule still spans `epochs`), to study the first ones;
    embed: "xavier" starts the patch projection as MAE does (Xavier-uniform over the flattened
    patch) instead of std 0.02, "qk" the attention's query and key projections, "all" every
    linear layer and the patch projection (MAE's encoder init); pos_scale: multiplies the
    sine-cosine position table."""
    torch.manual_seed(seed)
    if holdout:
        from vitray.data.sampling import stratified_split
        keep, _ = stratified_split([str(i) for i in range(len(ytr))], ytr, holdout, seed)
        keep = np.array([int(i) for i in keep]); Xtr, ytr, btr = Xtr[keep], ytr[keep], btr[keep]
    size = size or Xtr.shape[1]; ch = Xtr.shape[3]
    (Xtr, btr), (Xte, bte) = resized(Xtr, btr, size), resized(Xte, bte, size)
    kw = dict(PRESETS[preset], num_channels=ch, image_size=size, patch_size=patch, **(extra or {}))
    model = ViTForImageClassification(ViTConfig(**kw, num_labels=len(labels), attn_implementation="sdpa"))
    if sincos:
        from vitray.models import init_position_embeddings
        init_position_embeddings(model)
        with torch.no_grad():
            model.vit.embeddings.position_embeddings.mul_(pos_scale)
    if embed == "all":
        from vitray.models import init_linear_layers
        init_linear_layers(model)
    elif embed == "xavier":
        w = model.vit.embeddings.patch_embeddings.projection.weight
        torch.nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
    elif embed == "qk":
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and path.endswith((".q_proj", ".k_proj")):
                torch.nn.init.xavier_uniform_(module.weight)
    model = model.to(dev)
    steps = math.ceil(len(Xtr)/bs)*epochs
    decay=[p for p in model.parameters() if p.ndim>=2]; nod=[p for p in model.parameters() if p.ndim<2]
    opt = torch.optim.AdamW([{"params":decay,"weight_decay":wd},{"params":nod,"weight_decay":0}], lr=lr)
    sch = make_scheduler(opt, steps, warm)
    counts = np.bincount(ytr, minlength=len(labels))
    w = class_weights(counts) if cw else None
    if w is not None and cw is not True:  # a power of inverse frequency, e.g. 0.5: milder weights
        w = np.asarray(w) ** float(cw); w = (w * len(ytr) / (w * counts).sum()).tolist()
    w = torch.tensor(w, dtype=torch.float32, device=dev) if w is not None else None
    lossf = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=ls)
    acfg = AugmentConfig.for_labels(labels) if aug else AugmentConfig(max_shift=0, brightness=0, contrast=0)
    acfg = dataclasses.replace(acfg, rotate=rot, scale=zoom, **({} if shift is None else {"max_shift": shift}),
                               **({} if flips else {"hflip": None, "vflip": None}),
                               **({} if lighting else {"brightness": 0.0, "contrast": 0.0}))
    averaged = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema)) \
        if ema else None
    rng = np.random.default_rng(seed); t0=time.time(); curve=[]
    for ep in range(stop or epochs):
        model.train(); perm = rng.permutation(len(Xtr))
        if balance:
            p = np.bincount(ytr, minlength=len(labels)).astype(float) ** -balance
            p = p[ytr] / p[ytr].sum(); perm = rng.choice(len(Xtr), size=len(Xtr), p=p)
        for i in range(0, len(perm), bs):
            idx = perm[i:i+bs]
            b = augment_batch({"image": Xtr[idx], "label": ytr[idx].copy(), "bbox": btr[idx]}, acfg, seed=int(rng.integers(1<<30)))
            x = normalize(torch.from_numpy(b["image"]).to(dev), [.5]*ch, [.5]*ch); y = torch.from_numpy(b["label"]).to(dev)
            lam, other = 1.0, None
            if mixup or cutmix:
                other = torch.from_numpy(rng.permutation(len(y))).to(dev)
                cut = cutmix and (not mixup or rng.random() < 0.5)
                lam = float(rng.beta(cutmix, cutmix) if cut else rng.beta(mixup, mixup))
                if cut:  # a box of (1-lam) of the area from the other image; lam made exact
                    S = x.shape[-1]; h = int(round(S * math.sqrt(1 - lam)))
                    r0, c0 = int(rng.integers(0, S - h + 1)), int(rng.integers(0, S - h + 1))
                    x = x.clone(); x[..., r0:r0+h, c0:c0+h] = x[other][..., r0:r0+h, c0:c0+h]; lam = 1 - h*h/(S*S)
                else:
                    x = lam * x + (1 - lam) * x[other]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = model(pixel_values=x).logits
            loss = lossf(out.float(), y)
            if other is not None:
                loss = lam * loss + (1 - lam) * lossf(out.float(), y[other])
            opt.zero_grad(); loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sch.step()
            if averaged is not None:
                averaged.update_parameters(model)
        if ep % every == every - 1 or ep == (stop or epochs)-1:
            m = evaluate(averaged.module if averaged is not None else model, Xte, yte, labels, ch)
            curve.append((ep+1, round(m["accuracy"],3), round(m["macro_f1"],3)))
    if averaged is not None:
        model = averaged.module
    m = evaluate(model, Xte, yte, labels, ch)
    if os.environ.get("RECIPE_SAVE"):  # the trained model, to measure more map variants later
        os.makedirs(os.environ["RECIPE_SAVE"], exist_ok=True)
        model.save_pretrained(os.path.join(os.environ["RECIPE_SAVE"], name))
    res = {"name": name, "acc": round(m["accuracy"],4), "macro_f1": round(m["macro_f1"],4), "curve": curve, "secs": round(time.time()-t0,1)}
    if "passed" in labels:
        res["passed_recall"] = round(m["per_class"]["passed"]["recall"],3)
        res.update(localise(model, Xte, yte, bte, labels, ch))
    print(json.dumps(res), flush=True)
    return res

@torch.no_grad()
def predict(model, X, ch):
    model.eval(); preds=[]
    for i in range(0, len(X), 512):
        x = normalize(torch.from_numpy(X[i:i+512]).to(dev), [.5]*ch, [.5]*ch)
        preds.append(model(pixel_values=x).logits.argmax(-1).cpu())
    return torch.cat(preds).numpy()

def evaluate(model, X, y, labels, ch):
    return classification_metrics(y.tolist(), predict(model, X, ch).tolist(), labels)

def localise(model, X, y, b, labels, ch):
    neg = labels.index("passed"); idx = np.flatnonzero(y != neg)[:400]
    model.set_attn_implementation("eager")
    x = normalize(torch.from_numpy(X[idx]).to(dev), [.5]*ch, [.5]*ch)
    out = {}
    variants = {"rollout": ("rollout", "mean", 0.0), "grad-rollout": ("grad-rollout", "mean", 0.0),
                "max.9": ("rollout", "max", 0.9), "mean.9": ("rollout", "mean", 0.9), "min": ("rollout", "min", 0.0),
                "max": ("rollout", "max", 0.0)}
    for key, (method, fusion, discard) in variants.items():
        maps = []
        for i in range(0, len(idx), 100):
            m, _ = attention_maps(model, x[i:i+100], method=method, head_fusion=fusion, discard_ratio=discard)
            maps.append(m.float().cpu().numpy())
        maps = np.concatenate(maps); S = X.shape[1]
        out[key] = {"pointing": round(float(np.mean([pointing_game(mm, bb, (S,S)) for mm, bb in zip(maps, b[idx])])),3),
                    "energy": round(float(np.mean([energy_in_box(mm, bb, (S,S)) for mm, bb in zip(maps, b[idx])])),3)}
    model.set_attn_implementation("sdpa")
    return out

if __name__ == "__main__":
    torch.set_num_threads(1)
    which = sys.argv[1]
    if which == "insp":
        style = sys.argv[2] if len(sys.argv) > 2 else "synth"
        Xtr, ytr, btr, labels = data(style, 3000, 0.02, 11); Xte, yte, bte, _ = data(style, 1000, 0.2, 12)
        for v in json.loads(sys.argv[3]):
            run(v.pop("name"), Xtr, ytr, btr, Xte, yte, bte, labels, **v)
    else:  # argv[2]: "-" for the project's split, or a stratified split's seed
        Xtr, ytr, Xte, yte, labels = digits(None if sys.argv[2] == "-" else int(sys.argv[2]))
        print(json.dumps({"split": sys.argv[2], "svm_acc": round(svm_accuracy(Xtr, ytr, Xte, yte), 4)}), flush=True)
        nb = np.full((len(Xtr),4), np.nan, np.float32); nb2 = np.full((len(Xte),4), np.nan, np.float32)
        for v in json.loads(sys.argv[3]):
            run(v.pop("name"), Xtr, ytr, nb, Xte, yte, nb2, labels, **v)
