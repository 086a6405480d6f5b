"""Engine building blocks: LR schedule, parameter groups, frozen BN, pretrained loading, checkpoints."""

import pickle

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from unidml.config import ModelConfig
from unidml.engine import checkpoint
from unidml.engine.optim import optimizer_groups, warmup_cosine
from unidml.errors import UserError
from unidml.models import build_model


def model_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"arch": "resnet18", **overrides})


def test_warmup_then_cosine_to_zero():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    values = [warmup_cosine(s, 10, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_weight_decay_on_1d_parameters():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = optimizer_groups(module, 0.1, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4


def test_frozen_bn2d_stays_in_eval_mode_after_train():
    model = build_model(model_cfg(freeze_bn=True))
    model.eval().train()
    bn2d = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn2d and not any(m.training for m in bn2d)
    assert model.feature_bn.training  # the embedding BN1d trains
    before = bn2d[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, bn2d[0].running_mean)
    assert all(m.weight.requires_grad for m in bn2d)  # affine still trained


def test_embedding_dim_projection_and_small_stem():
    model = build_model(model_cfg(embedding_dim=64, small_input_stem=True, feature_bn=False)).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert model.backbone.conv1.stride == (1, 1)


def test_pretrained_from_file_and_from_local_torch_cache(tmp_path, monkeypatch):
    source = build_model(model_cfg(pretrained="")).backbone.state_dict()
    source = {k: v + 1.0 if v.is_floating_point() else v for k, v in source.items()}
    source["fc.weight"], source["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": source}, path)
    loaded = build_model(model_cfg(pretrained=str(path)))
    assert torch.equal(loaded.backbone.conv1.weight, source["conv1.weight"])

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(UserError, match="not found on disk at .*resnet18-f37072fd.pth"):
        build_model(model_cfg(pretrained="IMAGENET1K_V1"))
    random_init = build_model(model_cfg(pretrained="ResNet18_Weights.IMAGENET1K_V1", pretrained_required=False))
    assert not torch.equal(random_init.backbone.conv1.weight, source["conv1.weight"])
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source, cache / "resnet18-f37072fd.pth")
    cached = build_model(model_cfg(pretrained="IMAGENET1K_V1"))
    assert torch.equal(cached.backbone.layer4[1].bn2.bias, source["layer4.1.bn2.bias"])


@pytest.mark.parametrize("spec, fragment", [("NOT_A_WEIGHT", "neither an existing file"),
                                            ("/nonexistent/w.pth", "not found on disk")])
def test_pretrained_errors_are_one_line(spec, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        build_model(model_cfg(pretrained=spec))
    assert "\n" not in str(info.value)


def test_pretrained_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(UserError, match="do not fit 'resnet18'"):
        build_model(model_cfg(pretrained=str(path)))


def test_checkpoint_atomic_rotation_and_corruption_fallback(tmp_path):
    directory = tmp_path / "checkpoints"
    checkpoint.save_epoch({"step": 1, "w": torch.ones(3)}, directory, is_best=False)
    checkpoint.save_epoch({"step": 2, "w": torch.full((3,), 2.0)}, directory, is_best=False)
    assert sorted(p.name for p in directory.iterdir()) == ["last.pt", "prev.pt"]  # no temp files left
    state, path = checkpoint.load_latest(directory)
    assert state["step"] == 2 and path.name == "last.pt"

    last = directory / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match="last.pt: truncated: .*the write was cut short"):
        checkpoint.load(last)
    state, path = checkpoint.load_latest(directory)
    assert state["step"] == 1 and path.name == "prev.pt" and torch.equal(state["w"], torch.ones(3))

    (directory / "prev.pt").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"):
        checkpoint.load_latest(directory)
    assert checkpoint.load_latest(tmp_path / "empty") is None


def test_checkpoint_refuses_foreign_file(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not a unidml checkpoint"):
        checkpoint.load(path)


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    directory = tmp_path / "c"
    checkpoint.save_atomic({"step": 1}, directory / "last.pt")
    with pytest.raises((AttributeError, pickle.PicklingError)):  # which one depends on the pickler
        checkpoint.save_atomic({"bad": lambda: None}, directory / "last.pt")  # not picklable
    assert checkpoint.load(directory / "last.pt")["step"] == 1
    assert [p.name for p in directory.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_backend_step_reports_the_norm_and_clips_only_when_asked(clip):
    from unidml.engine.backends import TorchBackend
    from unidml.engine.distributed import init_distributed
    from unidml.run_config import load_run_config

    cfg = load_run_config(None, [f"train.grad_clip={clip}", "train.lr=0.5", "train.momentum=0", "train.weight_decay=0",
                             "train.warmup_iters=1", "engine.precision=fp32"])
    module = nn.Linear(3, 2)
    backend = TorchBackend(module, cfg, init_distributed("cpu"), total_steps=10)
    grads = [torch.full_like(p, 2.0) for p in module.parameters()]
    before = [p.detach().clone() for p in module.parameters()]
    for p, g in zip(module.parameters(), grads):
        p.grad = g.clone()
    outcome = backend.step()
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    assert outcome.applied and outcome.grad_norm == pytest.approx(norm)
    scale = min(1.0, clip / norm) if clip else 1.0
    for p, b, g in zip(module.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.5 * scale * g)
