"""Fine-tuning policies (full, head, last:K, lora:R) and how many parameters each really trains."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import ViTConfig, ViTForImageClassification

from vitray.models.building import build_model, pretrained_config, source_kind
from vitray.models.specs import parse_finetune

def apply_finetune(model: ViTForImageClassification, policy: str) -> torch.nn.Module:
    """Mark what trains: "full", "head" (classifier), "last:K" (last K layers, final norm, head), "lora:R".

    LoRA (rank R, alpha 2R, dropout 0.1) goes on the attention query and value projections, as in
    the LoRA paper and peft's image-classification recipe; the new head trains in full
    (modules_to_save). "lora" returns a peft `PeftModel` wrapping `model`; the others return `model`.
    """
    layers = model.vit.layers if hasattr(model.vit, "layers") else model.vit.encoder.layer
    kind, value = parse_finetune(policy, num_layers=len(layers))
    if kind == "lora":
        from peft import LoraConfig, get_peft_model  # only here: its import costs every other run ~0.15 s

        config = LoraConfig(r=value, lora_alpha=2 * value, lora_dropout=0.1,
                            target_modules=_attention_targets(model), modules_to_save=["classifier"])
        return get_peft_model(model, config)
    model.requires_grad_(kind == "full")
    trainable: list[torch.nn.Module] = [model.classifier]
    if kind == "last":
        trainable += [*layers[-value:], model.vit.layernorm]
    for module in trainable:
        module.requires_grad_(True)
    return model


def _attention_targets(model: torch.nn.Module) -> list[str]:
    # transformers 5 names the projections q_proj/v_proj; 4.x named them query/value.
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]


@dataclass(frozen=True)
class ParamReport:
    """Parameter counts of a model as it trains."""

    total: int
    trainable: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "trainable": self.trainable, "share": self.share}


def param_report(model: torch.nn.Module) -> ParamReport:
    """Total and trainable parameters (for LoRA: base + adapters + the head's trainable copy)."""
    params = list(model.parameters())
    return ParamReport(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))


def params_for(spec: str | None, finetune: str = "full", n_labels: int | None = None,
               image_size: int | None = None, channels: int = 3) -> dict:
    """`param_report(...).to_dict()` of a model under a fine-tune policy, from its config alone.

    No weights are read (the model is built on the meta device), so a hub model costs one small
    download. The head has `n_labels` outputs: by default a pretrained model's own, 5 for a preset.
    """
    with torch.device("meta"):
        if source_kind(spec) == "preset":
            model, _ = build_model(spec, [str(i) for i in range(n_labels or 5)], image_size, channels)
        else:
            vit_config = ViTConfig.from_dict(pretrained_config(spec))
            if n_labels:
                vit_config.num_labels = n_labels
            model = ViTForImageClassification(vit_config)
    return param_report(apply_finetune(model, finetune)).to_dict()
