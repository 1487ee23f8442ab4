"""Models: presets, pretrained folders with a new head, fine-tune policies, export and reload."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoImageProcessor, BertConfig, ViTConfig, ViTForImageClassification, ViTModel

from vitray.errors import VitrayError
from vitray.models import (Preprocessing, apply_finetune, auto_patch_size, build_model, describe_trained,
                           export_model, load_trained, param_report, params_for, parse_finetune)

LABELS = ["passed", "Xplus", "Xminus", "Yplus", "Yminus"]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny ImageNet-style checkpoint: 1000 classes and its own mean/std, as a hub model has."""
    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=1000)
    ViTForImageClassification(config).save_pretrained(folder)
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                 "size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def tiny(labels=LABELS, channels=3, size=32):
    torch.manual_seed(0)
    return build_model("vit-tiny", labels, image_size=size, channels=channels)


def logits(model, prep, n=2):
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(pixel_values=torch.randn(n, prep.channels, prep.size, prep.size)).logits


def test_presets_have_the_documented_sizes():
    assert 100_000 <= param_report(tiny()[0]).total <= 250_000
    assert 1_000_000 <= param_report(build_model("vit-small", LABELS, 64)[0]).total <= 3_000_000
    with torch.device("meta"):  # the shape is what matters, not 86M random numbers
        base, prep = build_model("vit-base", LABELS)
    assert (base.config.hidden_size, base.config.num_hidden_layers, base.config.patch_size, prep.size) == \
        (768, 12, 16, 224)
    assert 85_000_000 < param_report(base).total < 87_000_000


@pytest.mark.parametrize("size,patch", [(8, 2), (28, 4), (32, 4), (48, 6), (64, 8), (96, 12), (224, 16),
                                        (384, 16)])
def test_auto_patch_size_gives_a_grid_of_about_seven_or_more(size, patch):
    assert auto_patch_size(size) == patch


def test_tiny_images_are_upsampled_for_a_finer_grid():
    from vitray.models import input_size_for

    assert [input_size_for(n) for n in (8, 12, 16, 28, 64)] == [32, 32, 16, 28, 64]
    model, prep = build_model(None, LABELS, input_size_for(8), channels=1)
    assert (prep.size, model.config.patch_size) == (32, 4)


def test_auto_patch_size_refuses_sizes_without_a_usable_divisor():
    with pytest.raises(VitrayError, match="227.*such as 224"):
        auto_patch_size(227)


def test_default_model_is_sized_for_the_data():
    model, prep = build_model(None, LABELS, image_size=28, channels=1)
    assert (model.config.image_size, model.config.patch_size, model.config.num_channels) == (28, 4, 1)
    assert model.config.id2label == dict(enumerate(LABELS))
    assert prep == Preprocessing(28, 1, (0.5,), (0.5,))
    assert logits(model, prep).shape == (2, len(LABELS))


def test_preset_takes_size_and_channels_from_the_data():
    model, prep = build_model("vit-small", LABELS, image_size=64, channels=3, attn_implementation="eager")
    assert (model.config.hidden_size, model.config.patch_size, prep.size) == (192, 8, 64)
    assert model.config._attn_implementation == "eager"


def test_pretrained_folder_gets_a_new_head_and_keeps_its_backbone(pretrained_dir):
    original = ViTForImageClassification.from_pretrained(pretrained_dir)
    for spec in (str(pretrained_dir), f"file://{pretrained_dir}"):
        model, prep = build_model(spec, LABELS, image_size=64, channels=1)
        assert model.classifier.out_features == len(LABELS)
        assert model.config.id2label == dict(enumerate(LABELS))
        assert model.config.label2id == {name: i for i, name in enumerate(LABELS)}
        for name, tensor in original.vit.state_dict().items():
            assert torch.equal(model.vit.state_dict()[name], tensor), name
        # A pretrained model keeps its input size, channels and its own normalisation.
        assert prep == Preprocessing(32, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_pretrained_folder_without_preprocessor_config_uses_half(tmp_path, pretrained_dir):
    ViTForImageClassification.from_pretrained(pretrained_dir).save_pretrained(tmp_path)
    _, prep = build_model(str(tmp_path), LABELS)
    assert prep == Preprocessing.default(32, 3)


def test_hub_id_offline_fails_fast_in_one_line():
    start = time.monotonic()
    with pytest.raises(VitrayError) as err:
        build_model("google/vit-base-patch16-224", LABELS)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "\n" not in message and "google/vit-base-patch16-224" in message and "unreachable" in message


@pytest.mark.parametrize("spec,match", [("vit-huge", "unknown model 'vit-huge'"),
                                        ("./no/such/folder", "model folder not found")])
def test_unknown_model_names_say_what_is_accepted(spec, match):
    with pytest.raises(VitrayError, match=match):
        build_model(spec, LABELS)


def test_non_vit_folder_is_refused(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    for load in (lambda: build_model(str(tmp_path), LABELS), lambda: load_trained(str(tmp_path))):
        with pytest.raises(VitrayError, match=r"not a ViT image classifier \(model_type=bert\)"):
            load()


def test_duplicate_labels_are_refused():
    with pytest.raises(VitrayError, match="not unique"):
        build_model(None, ["a", "b", "a"], 32)


def trainable(model, policy):
    return param_report(apply_finetune(model, policy)).trainable


def test_finetune_policies_train_progressively_more():
    model, _ = tiny()
    total = param_report(model).total
    head = trainable(model, "head")
    last1 = trainable(model, "last:1")
    full = trainable(model, "full")
    assert head == 64 * len(LABELS) + len(LABELS)
    assert head < last1 < trainable(model, "last:4") < full == total
    assert {n for n, p in apply_finetune(model, "head").named_parameters() if p.requires_grad} == \
        {"classifier.weight", "classifier.bias"}


def test_lora_trains_adapters_and_the_head_only():
    model, _ = tiny()
    head = trainable(model, "head")
    peft_model = apply_finetune(model, "lora:4")
    report = param_report(peft_model)
    assert head < report.trainable < 0.1 * report.total
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "classifier" in n for n in names)
    # transformers names ViT's projections q_proj / v_proj from 5.x on, query / value before.
    assert any(q in n for n in names for q in ("q_proj.lora_A", "query.lora_A"))
    assert any(v in n for n in names for v in ("v_proj.lora_B", "value.lora_B"))


@pytest.mark.parametrize("policy", ["last:0", "lora:x", "lora:0", "partial", "last:", "last:5"])
def test_bad_finetune_policies_are_one_line_errors(policy):
    with pytest.raises(VitrayError, match="--finetune"):
        apply_finetune(tiny()[0], policy)  # tiny has 4 layers: last:5 is too many


def test_parse_finetune():
    assert parse_finetune("full") == ("full", None)
    assert parse_finetune("last:2", num_layers=4) == ("last", 2)
    assert parse_finetune("lora:8") == ("lora", 8)


def test_param_report_dict():
    assert param_report(tiny()[0]).to_dict()["share"] == 1.0


def test_lora_export_merges_into_a_plain_model(tmp_path):
    model, prep = tiny()
    peft_model = apply_finetune(model, "lora:4")
    with torch.no_grad():  # LoRA's B starts at zero; make the adapters and the head matter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0, 0.5)
    expected = logits(peft_model, prep)
    export_model(peft_model, prep, str(tmp_path / "model"))

    plain = ViTForImageClassification.from_pretrained(tmp_path / "model")
    assert torch.allclose(logits(plain, prep), expected, atol=1e-5)
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "modules_to_save" in k]
    # The model under training is left unmerged: training can go on after a checkpoint.
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_export_then_load_trained_round_trip(tmp_path):
    model, prep = tiny(channels=1, size=28)
    expected = logits(model, prep)
    export_model(torch.nn.DataParallel(model), prep, str(tmp_path / "model"))  # wrapper removed on export

    loaded, loaded_prep, labels = load_trained(str(tmp_path / "model"), attn_implementation="eager")
    assert labels == LABELS
    assert loaded_prep == prep
    assert loaded.config._attn_implementation == "eager"
    assert torch.allclose(logits(loaded, loaded_prep), expected, atol=1e-5)


def test_exported_preprocessing_loads_in_transformers(tmp_path):
    model, _ = tiny()
    prep = Preprocessing(32, 3, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    export_model(model, prep, str(tmp_path))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert (processor.size["height"], processor.size["width"]) == (32, 32)
    assert tuple(processor.image_mean) == prep.mean and tuple(processor.image_std) == prep.std
    assert Preprocessing.load(str(tmp_path)) == prep


def test_load_trained_explains_what_is_wrong(tmp_path):
    with pytest.raises(VitrayError, match="model folder not found"):
        load_trained(str(tmp_path / "missing"))
    with pytest.raises(VitrayError, match="no config.json"):
        load_trained(str(tmp_path))
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=4)).save_pretrained(tmp_path / "backbone")
    with pytest.raises(VitrayError, match="not a ViTForImageClassification"):
        load_trained(str(tmp_path / "backbone"))


def test_presets_start_with_two_dimensional_position_embeddings():
    model, _ = tiny(size=32)  # 4 px patches: an 8x8 grid, hidden 64
    table = model.vit.embeddings.position_embeddings.detach()[0]
    assert torch.all(table[0] == 0)  # the CLS token has no place
    grid = table[1:].reshape(8, 8, 64)
    # The first quarter is sin(x·ω): the same down a column, different along a row; the third, sin(y·ω).
    assert torch.allclose(grid[0, :, :16], grid[5, :, :16]) and not torch.allclose(grid[:, 0, :16], grid[:, 5, :16])
    assert torch.allclose(grid[:, 0, 32:48], grid[:, 5, 32:48])
    assert grid[0, 1, 0].item() == pytest.approx(math.sin(1.0))  # x = 1, ω₀ = 1
    # Nearby patches are more alike than distant ones: the model sees where each patch is from the start.
    near = torch.dot(grid[3, 3], grid[3, 4])
    far = torch.dot(grid[3, 3], grid[3, 7])
    assert near > far
    assert model.vit.embeddings.position_embeddings.requires_grad  # still learned


def test_a_from_scratch_model_attends_unevenly_from_the_first_step():
    """At transformers' std-0.02 init a 64-wide model's attention is uniform (each weight within ~6% of 1/N):
    runs then wait at chance for a seed-dependent number of epochs. vitray's init breaks it up from the start."""
    torch.manual_seed(0)
    model, _ = build_model(None, ["a", "b", "c"], image_size=64, channels=3, attn_implementation="eager")
    attentions = model(pixel_values=torch.randn(8, 3, 64, 64), output_attentions=True).attentions
    for layer in attentions:
        tokens = layer.shape[-1]
        assert (layer.amax(-1) * tokens).mean() > 2  # the most-attended token gets over twice a uniform share
    projection = model.vit.embeddings.patch_embeddings.projection.weight
    fan_in, fan_out = projection[0].numel(), projection.shape[0]
    assert projection.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.1)


def test_describe_trained_checks_the_weights_without_reading_them(tmp_path):
    model, prep = tiny(channels=1, size=28)
    folder = tmp_path / "model"
    export_model(model, prep, str(folder))
    assert describe_trained(str(folder)) == (LABELS, prep, model.config.patch_size)

    # config.json and the weights disagree: refused, as load_trained does.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, intermediate_size=2 * config["intermediate_size"])))
    with pytest.raises(VitrayError, match="do not match config.json"):
        describe_trained(str(folder))
    (folder / "config.json").write_text(json.dumps(config))

    # A weights file cut short (an interrupted copy) is caught from its header.
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(VitrayError, match="cut short"):
        describe_trained(str(folder))

    # Weights in PyTorch's own format.
    weights.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert describe_trained(str(folder)) == (LABELS, prep, model.config.patch_size)


def test_preprocessing_reads_hub_style_processor_configs():
    deit_like = {"do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256},
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    assert Preprocessing.from_dict(deit_like).size == 224
    assert Preprocessing.from_dict({"size": 64, "image_mean": 0.2, "image_std": 0.3}, channels=1) == \
        Preprocessing(64, 1, (0.2,), (0.3,))
    assert Preprocessing.from_dict({"size": {"height": 8, "width": 8}, "do_normalize": False}).mean == (0.0,) * 3
    grey = Preprocessing.from_dict({"size": 8, "image_mean": [0.2, 0.4, 0.6], "image_std": [0.5] * 3}, channels=1)
    assert grey.mean == pytest.approx((0.4,))


def test_preprocessing_without_a_file_defaults_from_config(tmp_path):
    ViTConfig(image_size=48, num_channels=1).save_pretrained(tmp_path)
    assert Preprocessing.load(str(tmp_path)) == Preprocessing.default(48, 1)


def test_params_for_reads_only_the_config(tmp_path, pretrained_dir):
    assert params_for("vit-tiny", "full", image_size=32) == param_report(tiny()[0]).to_dict()
    own = params_for(str(pretrained_dir), "head")  # the checkpoint's own 1000-class head
    assert own["trainable"] == 32 * 1000 + 1000
    lora = params_for(str(pretrained_dir), "lora:2", n_labels=5)
    assert 5 * 33 < lora["trainable"] < 0.1 * lora["total"]


@pytest.mark.s3
def test_models_round_trip_through_s3(s3_prefix, tmp_path, monkeypatch, pretrained_dir):
    monkeypatch.setenv("VITRAY_MODEL_CACHE", str(tmp_path / "cache"))
    model, prep = tiny()
    uri = f"{s3_prefix}/run/model"
    export_model(apply_finetune(model, "lora:2"), prep, uri)
    loaded, loaded_prep, labels = load_trained(uri)
    assert (labels, loaded_prep) == (LABELS, prep)
    assert torch.allclose(logits(loaded, prep), logits(model, prep), atol=1e-5)

    # The same prefix overwritten with another model is fetched again, not served from the cache.
    export_model(ViTForImageClassification.from_pretrained(pretrained_dir), Preprocessing.default(32), uri)
    assert load_trained(uri)[0].config.num_labels == 1000
    fine_tuned, _ = build_model(uri, ["ok", "bad"])
    assert fine_tuned.classifier.out_features == 2
    with pytest.raises(VitrayError, match="model not found"):
        load_trained(f"{s3_prefix}/nothing")


@pytest.mark.parametrize("spec,size,channels", [(None, 32, 3), ("vit-small", None, 1), ("vit-tiny", 48, 3)])
def test_preprocessing_for_matches_what_build_model_gives(spec, size, channels):
    from vitray.models import preprocessing_for

    _, prep = build_model(spec, LABELS, size, channels=channels)
    assert preprocessing_for(spec, size, channels) == prep


def test_preprocessing_for_a_saved_model_reads_no_weights(tmp_path):
    from vitray.models import preprocessing_for

    model, prep = build_model("vit-tiny", LABELS, 24, channels=1)
    export_model(model, prep, str(tmp_path / "m"))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not weights")  # never opened
    assert preprocessing_for(str(tmp_path / "m")) == prep
    (tmp_path / "bad").mkdir()
    with pytest.raises(VitrayError, match="no config.json"):
        preprocessing_for(str(tmp_path / "bad"))
