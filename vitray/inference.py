"""The one model stage of evaluate and score: decode and resize in Ray Data tasks, predict on actors.

`predict` appends both to a dataset of encoded images (`vitray.data.readers.read_encoded`).
An image that cannot be decoded keeps its row, with its error kind and no prediction, so
that scoring can record it and evaluation count it. `Predictor` is the callable class that
`map_batches` puts on an actor pool: it loads the model once per actor, normalises uint8
batches with the model's own preprocessing, predicts, and makes attention maps only where
they are asked for.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from vitray.domain import OK_CLASS as NEGATIVE_LABEL  # the class whose images need no map under --attention defects

ATTENTION_MODES = ("all", "defects", "none")
MAP_CHUNK_CPU = 32  # images per pass when making maps on a CPU
FORWARD_CHUNK_CPU = 64  # images per pass without maps on a CPU


@dataclass(frozen=True)
class PredictOptions:
    attention: str = "none"  # all | defects | none
    method: str = "rollout"
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    # The logits and the classifier's input (the [CLS] embedding) too: what calibration and the
    # decisions work from (vitray.decisions).
    features: bool = False
    # With a calibrated model: each image's decision (ok / ng / review), its reason, the calibrated
    # probabilities, the defect and out-of-distribution scores and the drift projection.
    decisions: bool = False
    # An anomaly bank (vitray anomaly): each image's anomaly score and map against it, and with
    # a calibrated model, an image decided OK but anomalous goes to REVIEW.
    anomaly: str | None = None

    @property
    def needs_features(self) -> bool:
        return self.features or self.decisions


def model_info(model_uri: str) -> tuple[list[str], Any]:
    """Labels and preprocessing of a trained model, checked on the driver before any work."""
    from vitray.models import describe_trained

    labels, prep, _ = describe_trained(model_uri)
    return labels, prep


def predict(ds: Any, model: str | bytes, prep: Any, options: PredictOptions, batch_size: int, workers: int = 1,
            gpus_per_worker: float = 0.0, keep: Sequence[str] = ()) -> Any:
    """Decode/resize (tasks) → model (actor pool): id, error_kind, error, pred, score, probs, attention.

    `model`: a trained model's URI (PyTorch), or the bytes of its ONNX export (onnxruntime).
    `keep`: input columns carried along (evaluation keeps `label` and `bbox`). The pixels go on
    only where maps are asked for (scoring's overlays).
    """
    import ray.data

    return (ds
            # Half a CPU slot: reading waits on storage much of the time, and resources that
            # differ from the actors' keep Ray Data from fusing decode into them (an actor
            # holding a GPU would then decode one batch at a time while the GPU waits).
            .map_batches(prepare_images, fn_kwargs={"size": prep.size, "channels": prep.channels, "keep": tuple(keep)},
                         batch_size=64, batch_format="numpy", num_cpus=0.5)
            .map_batches(OnnxPredictor if isinstance(model, bytes) else Predictor, fn_constructor_args=(model, options),
                         batch_size=batch_size,
                         batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                         num_gpus=gpus_per_worker or None))


def predict_in_process(source: Any, ids: Sequence[str] | None, model: str | bytes, prep: Any,
                       options: PredictOptions, batch_size: int, keep: Sequence[str] = ()) -> Iterator[dict]:
    """`predict` without Ray: the same stages over the source's images in this process, batch by batch."""
    from vitray.data.readers import iter_encoded

    predictor = (OnnxPredictor if isinstance(model, bytes) else Predictor)(model, options)
    for encoded in iter_encoded(source, ids):
        prepared = prepare_images(encoded, prep.size, prep.channels, tuple(keep))
        for start in range(0, len(prepared["id"]), batch_size):
            yield predictor({k: v[start:start + batch_size] for k, v in prepared.items()})


def prepare_images(batch: dict[str, np.ndarray], size: int, channels: int,
                   keep: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Decode and resize; an image that fails keeps its row (a blank image and its error kind)."""
    from vitray.data.preprocess import resize_image
    from vitray.data.readers import decode_batch

    decoded = decode_batch(batch)
    n = len(decoded["id"])
    images = np.zeros((n, size, size, channels), dtype=np.uint8)
    kinds = np.array(["" if k is None else str(k) for k in decoded["error_kind"]], dtype=object)
    messages = np.array(["" if m is None else str(m) for m in decoded["error"]], dtype=object)
    for i, image in enumerate(decoded["image"]):
        if image is None:
            continue
        try:
            images[i] = resize_image(np.asarray(image), size, channels)
        except Exception as exc:  # one odd image must not fail the whole run
            kinds[i], messages[i] = "corrupt", f"cannot convert: {str(exc).splitlines()[0][:200]}"
    return {"id": decoded["id"], "image": images, "error_kind": kinds, "error": messages,
            **{name: decoded[name] for name in keep}}


class _Stage:
    """What both engines share: rows that failed to decode skip the model (pred -1, NaN scores)."""

    options: PredictOptions
    labels: list[str]
    grid: tuple[int, int]
    embedding_size: int
    policy: Any = None  # vitray.decisions.policy.Policy of a calibrated model, when decisions are asked for
    anomaly: Any = None  # vitray.anomaly.AnomalyScorer, when a bank is given

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error_kind"] == "" if "error_kind" in batch else np.ones(len(batch["image"]), dtype=bool)
        out = self._predict(batch) if ok.all() else self._skip_failed(batch, ok)
        if self.anomaly is not None:
            if "anomaly_map" not in out:  # the bank's own encoder, on the images the model saw
                out["anomaly_map"] = self.anomaly({"image": batch["image"], "error_kind": np.where(ok, "", "x")}
                                                  )["anomaly_map"]
            out.update(self.anomaly.columns(out["anomaly_map"]))
        if self.options.needs_features:
            from vitray.decisions.drift import image_statistics

            out["image_stats"] = image_statistics(batch["image"])
        if self.options.attention == "none":
            del out["image"]  # only overlays need the pixels downstream
        if self.policy is not None:
            out.update(decision_columns(self.policy, out["logits"], out["embedding"], out["image_stats"],
                                        out.get("anomalous")))
        if self.options.needs_features and not self.options.features:
            del out["logits"], out["embedding"], out["image_stats"]
        return out

    def _skip_failed(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
        """The model sees only the rows that decoded; the others get NaN and pred -1."""
        n, cells = len(ok), self.grid[0] * self.grid[1]
        out = dict(batch)
        out["pred"] = np.full(n, -1, dtype=np.int64)
        out["score"] = np.full(n, np.nan, dtype=np.float32)
        out["probs"] = np.full((n, len(self.labels)), np.nan, dtype=np.float32)
        out["attention"] = np.full((n, cells), np.nan, dtype=np.float32)
        keys = ["pred", "score", "probs", "attention"]
        if ok.any():
            part = self._predict({k: v[ok] for k, v in batch.items()})
            for key in ("logits", "embedding", "anomaly_map"):
                if key in part:
                    out[key] = np.full((n, part[key].shape[1]), np.nan, dtype=np.float32)
                    keys.append(key)
            for key in keys:
                out[key][ok] = part[key]
        elif self.options.needs_features:
            out["logits"] = np.full((n, len(self.labels)), np.nan, dtype=np.float32)
            out["embedding"] = np.full((n, self.embedding_size), np.nan, dtype=np.float32)
        return out

    def _predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class Predictor(_Stage):
    """Ray Data UDF (PyTorch): uint8 (B, S, S, C) `image` batches in; pred, score, probs (and maps) out."""

    def __init__(self, model_uri: str, options: PredictOptions = PredictOptions()) -> None:
        import torch

        from vitray.attention import register_weights_attention
        from vitray.models import load_trained

        # Torch's CPU threads stay as Ray gives them (1 per CPU the actor asks for). Ray Data
        # builds the actor on its main thread and runs its calls on another: with two threads
        # set here, loading the model would start one OpenMP pool and the first call a second,
        # and libgomp, once its pools hold more threads than there are cores, stops spinning
        # between parallel regions (small ops took twice as long in such an actor).
        self.options = options
        # Rollout takes the heads fused inside the attention; grad-rollout needs them apart.
        self.weights_attention = register_weights_attention(
            options.head_fusion if options.method == "rollout" else None)
        # With a map for every image, one pass with attention weights gives the logits and
        # the maps; otherwise SDPA, switched to weights only for the images that get a map.
        self.one_pass = options.attention == "all" and options.method == "rollout"
        self.model, self.prep, self.labels = load_trained(
            model_uri, attn_implementation=self.weights_attention if self.one_pass else "sdpa")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # On a CPU a few dozen images at a time keep a layer's activations (and weights) nearer
        # the caches (docs/benchmarks.md#what-the-scoring-rate-rests-on); a GPU wants the whole batch.
        cpu = self.device.type != "cuda"
        self.map_chunk = MAP_CHUNK_CPU if cpu else None
        self.forward_chunk = FORWARD_CHUNK_CPU if cpu else None
        self.model.to(self.device)
        self.amp = self.device.type == "cuda"
        self.negative = self.labels.index(NEGATIVE_LABEL) if NEGATIVE_LABEL in self.labels else None
        patch = self.model.config.patch_size
        self.grid = (self.prep.size // patch, self.prep.size // patch)
        self.embedding_size = int(self.model.config.hidden_size)
        self._embeddings: list[Any] = []
        self._anomaly_maps: list[np.ndarray] = []
        if options.anomaly:
            from vitray.anomaly.scorer import AnomalyScorer

            # A bank fitted on this classifier's backbone scores from the classifier's own pass.
            self.anomaly = AnomalyScorer(options.anomaly, backbone=(self.model.vit, self.prep))
        if options.decisions:
            from vitray.decisions.policy import load_policy
            from vitray.models.building import local_model_dir

            self.policy = load_policy(local_model_dir(model_uri), self.labels)
        if options.needs_features:  # the classifier's input, whichever path (SDPA, maps, chunks) ran the model
            self.model.classifier.register_forward_hook(
                lambda module, inputs, output: self._embeddings.append(inputs[0].detach()))

    def _predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from vitray.data.preprocess import normalize
        from vitray.rollout import attention_maps

        images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device, non_blocking=True)
        x = normalize(images, self.prep.mean, self.prep.std)
        self._embeddings.clear()
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.one_pass:
                maps, logits = attention_maps(self.model, x, "rollout", self.options.head_fusion,
                                              self.options.discard_ratio, chunk=self.map_chunk)
            else:
                logits = torch.cat([self._forward(part) for part in x.split(self.forward_chunk or max(1, len(x)))])
        logits = logits.float()
        probs = torch.softmax(logits, dim=-1)
        score, pred = probs.max(dim=-1)
        out = dict(batch)
        out["pred"] = pred.cpu().numpy().astype(np.int64)
        out["score"] = score.cpu().numpy().astype(np.float32)
        out["probs"] = probs.cpu().numpy().astype(np.float32)
        if self.options.needs_features:
            out["logits"] = logits.cpu().numpy().astype(np.float32)
            out["embedding"] = torch.cat(self._embeddings).float().cpu().numpy()[:len(logits)]
        out["attention"] = (maps.reshape(len(maps), -1).float().cpu().numpy() if self.one_pass
                            else self._maps(x, out["pred"]))
        if self._anomaly_maps:
            out["anomaly_map"] = np.concatenate(self._anomaly_maps)
            self._anomaly_maps.clear()
        return out

    def _forward(self, x: Any) -> Any:
        """The logits of a pass; with a bank of this backbone, its anomaly maps from the same pass."""
        if self.anomaly is None or not self.anomaly.shared:
            return self.model(pixel_values=x).logits
        result = self.model(pixel_values=x, output_hidden_states=True)
        self._anomaly_maps.append(self.anomaly.score_hidden_states(result.hidden_states)["anomaly_map"])
        return result.logits

    def _maps(self, x: Any, pred: np.ndarray) -> np.ndarray:
        """(B, rows*cols) maps; rows without a map are NaN (written as null)."""
        from vitray.rollout import attention_maps

        n = len(pred)
        maps = np.full((n, self.grid[0] * self.grid[1]), np.nan, dtype=np.float32)
        mode = self.options.attention
        if mode == "none" or n == 0:
            return maps
        want = np.ones(n, dtype=bool) if mode == "all" or self.negative is None else pred != self.negative
        if not want.any():
            return maps
        # SDPA returns no attention weights: switch only for the images that get a map.
        self.model.set_attn_implementation(self.weights_attention)
        try:
            m, _ = attention_maps(self.model, x[np.flatnonzero(want)], method=self.options.method,
                                  head_fusion=self.options.head_fusion, discard_ratio=self.options.discard_ratio,
                                  chunk=self.map_chunk)
        finally:
            self.model.set_attn_implementation("sdpa")
        maps[want] = m.reshape(int(want.sum()), -1).float().cpu().numpy()
        return maps


class OnnxPredictor(_Stage):
    """Ray Data UDF (onnxruntime) over a `vitray export` graph: the same rows in and out as `Predictor`.

    `model` is the graph's bytes (they travel to every actor through Ray's object store).
    Maps come from the graph's `attention` output: rollout with mean head fusion.
    """

    def __init__(self, model: bytes, options: PredictOptions = PredictOptions()) -> None:
        import onnxruntime as ort

        self.options = options
        # One intra-op thread per CPU the actor holds, as torch's actors run; a GPU where there is one.
        settings = ort.SessionOptions()
        settings.intra_op_num_threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(model, settings, providers=providers)
        meta = json.loads(self.session.get_modelmeta().custom_metadata_map["vitray"])
        self.labels, self.grid = list(meta["labels"]), tuple(meta["grid"])
        self.has_maps = meta.get("attention") == "rollout"
        self.negative = self.labels.index(NEGATIVE_LABEL) if NEGATIVE_LABEL in self.labels else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        if options.needs_features and "embedding" not in self.output_names:
            raise ValueError("the ONNX model has no `logits` and `embedding` outputs: export it again")
        if options.decisions:
            self.policy = policy_of_export(model, self.labels)
        if options.anomaly:  # beside the graph: the bank's encoder in PyTorch
            from vitray.anomaly.scorer import AnomalyScorer

            self.anomaly = AnomalyScorer(options.anomaly)
        self.embedding_size = int(self.session.get_outputs()[self.output_names.index("embedding")].shape[1]) \
            if "embedding" in self.output_names else 0

    def _predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(batch["image"])
        outputs = dict(zip(self.output_names, self.session.run(None, {"images": images})))
        probs = outputs["probs"].astype(np.float32)
        out = dict(batch)
        out["pred"] = probs.argmax(axis=1).astype(np.int64)
        out["score"] = probs.max(axis=1).astype(np.float32)
        out["probs"] = probs
        maps = np.full((len(probs), self.grid[0] * self.grid[1]), np.nan, dtype=np.float32)
        mode = self.options.attention
        if mode != "none" and self.has_maps:
            want = np.ones(len(probs), dtype=bool) if mode == "all" or self.negative is None \
                else out["pred"] != self.negative
            maps[want] = outputs["attention"][want]
        out["attention"] = maps
        if self.options.needs_features:
            out["logits"] = outputs["logits"].astype(np.float32)
            out["embedding"] = outputs["embedding"].astype(np.float32)
        return out


def policy_of_export(model: bytes, labels: list[str]) -> Any:
    """The calibration an ONNX export carries (vitray.export), as a policy; None without one."""
    import tempfile

    from vitray.decisions.policy import load_policy
    from vitray.export import calibration_files

    files = calibration_files(model)
    if files is None:
        return None
    with tempfile.TemporaryDirectory(prefix="vitray-calibration-") as folder:
        for name, data in files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        return load_policy(folder, labels)


def decision_columns(policy: Any, logits: np.ndarray, embeddings: np.ndarray, stats: np.ndarray,
                     anomalous: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A calibrated model's decision columns; rows without logits (unreadable images) get none.

    `anomalous`: per image, above the anomaly bank's threshold (an image decided OK goes to REVIEW).
    """
    n, ok = len(logits), np.isfinite(logits).all(axis=1)
    k = policy.reference.projections.shape[1]
    cols = {"decision": np.full(n, None, dtype=object), "reason": np.full(n, None, dtype=object),
            "defect_score": np.full(n, np.nan, np.float32), "ood_score": np.full(n, np.nan, np.float32),
            "probs_calibrated": np.full(logits.shape, np.nan, np.float32),
            "drift_projection": np.full((n, k), np.nan, np.float32)}
    if ok.any():
        for key, values in policy.apply(logits[ok], embeddings[ok], stats[ok],
                                        None if anomalous is None else anomalous[ok]).items():
            cols[key][ok] = values
    return cols
