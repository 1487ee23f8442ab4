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

`specs` reads what a --model or --finetune string names (the presets too) without torch;
`preprocessing` holds `Preprocessing`; `building` builds presets and loads pretrained models
for training; `trained` loads a trained model (checked) and exports one; `finetune` applies
the fine-tune policies and counts parameters.

The names below load their module on first use (PEP 562), so that checking options does not
import PyTorch and transformers.
"""
from vitray.lazy import lazy_names

_HOMES = {
    "specs": ("DEFAULT_PRESET", "PRESETS", "parse_finetune"),
    "building": ("auto_patch_size", "build_model", "init_linear_layers", "init_position_embeddings",
                 "input_size_for", "preprocessing_for"),
    "finetune": ("ParamReport", "apply_finetune", "param_report", "params_for"),
    "preprocessing": ("CONFIG_FILE", "PREPROCESSOR_FILE", "Preprocessing"),
    "trained": ("describe_trained", "export_model", "load_trained"),
}
__all__, __getattr__ = lazy_names(__name__, globals(), _HOMES)
