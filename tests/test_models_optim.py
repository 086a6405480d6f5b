"""Optimizers: SGD/AdamW, per-role learning rates (backbone, head, loss), layer-wise decay, weight-decay exemptions."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from unidml.config import ConfigError, ModelConfig, TrainConfig
from unidml.engine.optim import build_optimizer, build_scheduler, optimizer_groups, warmup_cosine
from unidml.models import EmbeddingNet, build_model
from unidml.run_config import load_run_config


class ModelAndLoss(nn.Module):
    """What the trainer hands the optimizer: the embedding network and a loss with its own parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = nn.Linear(model.embedding_dim, 7, bias=False)  # stands for a classifier / proxies


def lr_of(groups: list[dict], module: nn.Module) -> dict[str, tuple[float, float]]:
    """Parameter name -> (lr, weight decay) of its group."""
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in module.named_parameters()}


def test_per_role_learning_rates_and_decay_exemptions():
    model = build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                        {"arch": "resnet18", "embedding_dim": 16, "pooling": "gem"}), 32)
    module = ModelAndLoss(model)
    got = lr_of(optimizer_groups(module, 0.1, 1e-4, backbone_lr_mult=0.5, head_lr_mult=2.0, loss_lr_mult=100.0), module)
    assert got["model.backbone.layer3.0.conv1.weight"] == (0.05, 1e-4)
    assert got["model.backbone.bn1.weight"] == (0.05, 0.0)  # 1-d: not decayed
    assert got["model.projection.weight"] == (0.2, 1e-4) and got["model.pool.p"] == (0.2, 0.0)
    assert got["loss.weight"] == (pytest.approx(10.0), 1e-4)
    groups = optimizer_groups(module, 0.1, 1e-4)
    # Without layer decay one group per role and decay: {backbone, head} x {decay, no decay} + the loss's matrix.
    assert sorted(g["name"] for g in groups) == ["backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay",
                                                 "loss/decay"]


def test_layer_decay_on_a_vit_follows_timm_layer_groups():
    pytest.importorskip("timm")
    model = build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                        {"arch": "timm/vit_tiny_patch16_224", "feature_bn": False}), 32)
    module = ModelAndLoss(model)
    decay, lr = 0.75, 1e-3
    got = lr_of(optimizer_groups(module, lr, 0.05, layer_decay=decay), module)
    top = 12  # layers: 0 = patch/position embedding, 1..12 = blocks (the final norm shares block 12's rate)
    for i in (0, 5, 11):
        assert got[f"model.backbone.blocks.{i}.mlp.fc1.weight"] == (pytest.approx(lr * decay ** (top - (i + 1))), 0.05)
    assert got["model.backbone.patch_embed.proj.weight"][0] == pytest.approx(lr * decay ** top)
    assert got["model.backbone.pos_embed"] == (pytest.approx(lr * decay ** top), 0.0)  # exempt from weight decay
    assert got["model.backbone.cls_token"][1] == 0.0
    assert got["model.backbone.norm.weight"] == (pytest.approx(lr), 0.0)
    assert got["loss.weight"] == (lr, 0.05)  # the loss is outside the backbone: no decay of its rate


def test_adamw_and_sgd_step_and_the_schedule_scales_every_group():
    model = EmbeddingNet(nn.Linear(4, 3), feature_dim=3, feature_bn=False)
    module = ModelAndLoss(model)
    for name, kind in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"optimizer": name, "lr": 0.1, "loss_lr_mult": 10.0,
                                                                   "momentum": 0.9})
        optimizer = build_optimizer(module, cfg)
        assert isinstance(optimizer, kind)
        before = module.loss.weight.detach().clone()
        module.loss(model(torch.randn(5, 4))).square().sum().backward()
        scheduler = build_scheduler(optimizer, warmup_iters=10, total_iters=100)
        optimizer.step()
        optimizer.zero_grad()
        assert not torch.equal(before, module.loss.weight)
        scheduler.step()
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(group["initial_lr"] * warmup_cosine(1, 10, 100))
        assert sorted({g["initial_lr"] for g in optimizer.param_groups}) == pytest.approx([0.1, 1.0])  # model, loss


@pytest.mark.parametrize("override, fragment", [
    ("train.layer_decay=0", "train.layer_decay"), ("train.loss_lr_mult=-1", "train.loss_lr_mult"),
    ("train.momentum=0", "train.nesterov"), ("train.optimizer=adagrad", "train.optimizer"),
    ("model.pooling=max", "model.pooling"),
])
def test_optimizer_keys_are_validated(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_run_config("configs/quickstart.yaml", [override])  # quickstart uses Nesterov SGD
