"""Backbone registry: torchvision and timm backbones, pooling, per-family policies, model validation."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from unidml.config import ConfigError, ModelConfig
from unidml.errors import UserError
from unidml.models import build_model, check_model_config, list_models
from unidml.models.pooling import AvgPool, GeM
from unidml.run_config import load_run_config

pytest.importorskip("timm")


def model_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"arch": "resnet18", **overrides})


@pytest.mark.parametrize("arch, pooling, size, width", [
    ("resnet18", "gem", 32, 512), ("timm/resnet18", "gem", 32, 512), ("timm/vit_tiny_patch16_224", "auto", 32, 192),
    ("timm/vit_tiny_patch16_224", "avg", 48, 192), ("timm/vit_tiny_patch16_224", "cls", 32, 192),
])
def test_backbones_give_one_embedding_per_image(arch, pooling, size, width):
    assert check_model_config(model_cfg(arch=arch, pooling=pooling), size) == width
    model = build_model(model_cfg(arch=arch, pooling=pooling, embedding_dim=24), image_size=size).eval()
    assert model(torch.randn(3, 3, size, size)).shape == (3, 24)


def test_pooling_exact_small_cases():
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    assert torch.equal(AvgPool(num_prefix_tokens=1)(tokens), tokens[:, 1:].sum(1) / 3)  # sums of 3 small ints: exact
    maps = torch.rand(2, 5, 3, 3) + 0.1
    # p = 1 is the mean; a large p tends to the maximum (1e-5: float32 rounding of pow/mean/root over 9 values).
    assert torch.allclose(GeM(p=1.0)(maps), maps.mean((2, 3)), atol=1e-5)
    assert torch.allclose(GeM(p=200.0)(maps), maps.amax((2, 3)), rtol=0.02)
    gem = GeM()
    gem(maps).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0  # p is learned


def test_vit_is_built_for_the_data_image_size_and_layernorm_trains():
    model = build_model(model_cfg(arch="timm/vit_tiny_patch16_224", freeze_bn=True), image_size=48)
    assert model.backbone.pos_embed.shape == (1, 1 + 3 * 3, 192)
    model.eval().train()
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.training for m in norms)


def test_timm_cnn_batchnorm_is_frozen():
    model = build_model(model_cfg(arch="timm/resnet18", freeze_bn=True), image_size=32)
    model.eval().train()
    bn2d = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn2d and not any(m.training for m in bn2d)
    before = bn2d[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, bn2d[0].running_mean)


def test_layer_indices_from_input_to_output():
    resnet = build_model(model_cfg(arch="resnet18"), image_size=32)
    assert resnet.layer_of["conv1.weight"] == 0 and resnet.layer_of["layer1.0.conv1.weight"] == 1
    assert resnet.layer_of["layer4.1.bn2.bias"] == 8  # 2 blocks in each of 4 stages
    vit = build_model(model_cfg(arch="timm/vit_tiny_patch16_224"), image_size=32)
    assert vit.layer_of["patch_embed.proj.weight"] == vit.layer_of["cls_token"] == 0
    assert [vit.layer_of[f"blocks.{i}.attn.qkv.weight"] for i in (0, 11)] == [1, 12]
    assert vit.layer_of["norm.weight"] == 12  # timm groups the final norm with the last block
    assert {"pos_embed", "cls_token"} <= vit.backbone_no_weight_decay


@pytest.mark.parametrize("arch, pooling, fragment", [
    ("googlenet", "auto", "not a torchvision ResNet"),
    ("efficientnet_b0", "auto", "did you mean timm/efficientnet_b0"),
    ("timm/vit_tiny_patch16_2244", "auto", "unknown timm model 'vit_tiny_patch16_2244' .*timm/vit_tiny_patch16_224"),
    ("timm/vit_tiny_patch16_224", "gem", "'gem' does not apply"),
    ("resnet18", "cls", "'cls' does not apply"),
    ("timm/swin_tiny_patch4_window7_224", "avg", "NHWC"),
])
def test_unbuildable_models_are_one_line_errors(arch, pooling, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        check_model_config(model_cfg(arch=arch, pooling=pooling), 56)
    assert "\n" not in str(info.value)


def test_config_time_model_validation():
    with pytest.raises(ConfigError, match="model.arch: 'googlenet'") as info:
        load_run_config("configs/quickstart.yaml", ["model.arch=googlenet"])
    assert "\n" not in str(info.value)
    # An image size the patch grid cannot take is caught before any work, too, naming the patch size.
    with pytest.raises(ConfigError, match="data.image_size: 8 px is smaller than the 16 px"):
        load_run_config("configs/quickstart_vit.yaml", ["data.image_size=8", "data.resize_size=8"])


@pytest.mark.parametrize("arch, stem, stride", [("resnet18", False, 32), ("resnet18", True, 8),
                                                ("timm/resnet18", False, 32)])
def test_images_below_the_backbone_downsampling_are_refused_naming_the_minimum(arch, stem, stride):
    """An image smaller than one cell of the last feature map trains on padding (image_size=1 gave
    R@1 9.4): refused with the minimum, which itself passes; the override is named as the source."""
    cfg = model_cfg(arch=arch, small_input_stem=stem)
    assert check_model_config(cfg, stride) > 0
    with pytest.raises(UserError) as info:
        check_model_config(cfg, stride - 1)
    assert str(info.value).startswith(f"data.image_size: {stride - 1} px is smaller than the {stride} px")
    assert str(info.value).endswith(f"use data.image_size >= {stride}")
    with pytest.raises(ConfigError) as info:
        load_run_config("configs/quickstart.yaml", ["data.image_size=1", "data.resize_size=1"])
    assert str(info.value).startswith("override 'data.image_size=1': data.image_size: 1 px")


def test_list_models():
    names = list_models()
    assert "resnet50" in names and "timm/vit_small_patch16_224" in names and "googlenet" not in names
    assert list_models("vit_tiny_patch16_224") == ["timm/vit_tiny_patch16_224"]


def test_models_command_lists_backbones_and_weight_locations(tmp_path, monkeypatch, capsys):
    import argparse

    from unidml.launcher.commands import models

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    parser = argparse.ArgumentParser()
    models.add_arguments(parser)
    assert models.run(parser.parse_args([])) == 0
    out = capsys.readouterr().out
    assert "resnet50\n" in out and "timm models as timm/NAME" in out
    assert models.run(parser.parse_args(["vit_tiny_patch16_224", "--weights"])) == 0
    assert f"timm/vit_tiny_patch16_224.augreg_in21k  not on disk (looked in {tmp_path}" in capsys.readouterr().out
    with pytest.raises(UserError, match="no backbone matches 'nothing_like_this'"):
        models.run(parser.parse_args(["nothing_like_this"]))
