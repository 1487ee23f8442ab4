"""ViT image classifiers: from-scratch presets, pretrained loading, fine-tune policies, export.

Every model is a plain transformers `ViTForImageClassification`; its preprocessing
(`Preprocessing`) is saved beside it, so an exported folder scores like the trained model.

From-scratch presets (`--model NAME`); image size, patch size and channels follow the data:

| preset    | hidden | layers | heads | MLP  | default size / patch | parameters                            |
|-----------|--------|--------|-------|------|----------------------|---------------------------------------|
| vit-tiny  | 64     | 4      | 4     | 128  | 32 px / 4            | 0.14 M (28 px grey) - 0.20 M (224 px) |
| vit-small | 192    | 6      | 6     | 768  | 64 px / 8            | 2.7 M (28 px) - 2.9 M (224 px)        |
| vit-base  | 768    | 12     | 12    | 3072 | 224 px / 16          | 85.8 M (ViT-B/16 shape, 224 px)       |
(parameters with 5 classes; vit-base is for GPU benchmarks)

`preprocessing` holds `Preprocessing`; `building` the presets and pretrained loading for
training; `trained` loading a trained model (checked) and exporting one; `finetune` the
fine-tune policies and parameter counts.
"""
from transformers.utils import logging as hf_logging

from vitray.models.building import (DEFAULT_PRESET, PRESETS, auto_patch_size, build_model, init_position_embeddings,
                                    input_size_for, preprocessing_for)
from vitray.models.finetune import ParamReport, apply_finetune, param_report, params_for, parse_finetune
from vitray.models.preprocessing import CONFIG_FILE, PREPROCESSOR_FILE, Preprocessing
from vitray.models.trained import describe_trained, export_model, load_trained

# Per-shard "Loading weights" / "Writing model shards" bars, once per actor and export, are noise
# in a batch job's log (and interleave across Ray workers).
hf_logging.disable_progress_bar()

__all__ = ["CONFIG_FILE", "DEFAULT_PRESET", "PREPROCESSOR_FILE", "PRESETS", "ParamReport", "Preprocessing",
           "apply_finetune", "auto_patch_size", "build_model", "describe_trained", "export_model",
           "init_position_embeddings", "input_size_for", "load_trained", "param_report", "params_for",
           "parse_finetune", "preprocessing_for"]
