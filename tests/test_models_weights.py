"""Backbone weights from local files and caches only: torchvision and timm formats, position-embedding
resampling, and one-line errors for missing weights or weights of another architecture."""
from __future__ import annotations

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from safetensors.torch import save_file

from unidml.config import ModelConfig
from unidml.errors import UserError
from unidml.models import build_model

timm = pytest.importorskip("timm")


def model_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"feature_bn": False, **overrides})


def randomised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Distinct values everywhere (BN statistics included), so a tensor loaded into the wrong place shows."""
    g = torch.Generator().manual_seed(0)
    return {k: (torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v) for k, v in state.items()}


def test_timm_resnet50_loads_torchvision_and_timm_state_dicts(tmp_path):
    source = randomised(torchvision.models.resnet50().state_dict())  # torchvision format, with its fc head
    torch.save({"state_dict": source}, tmp_path / "tv.pth")
    images = torch.randn(2, 3, 32, 32)
    reference = build_model(model_cfg(arch="resnet50", pretrained=str(tmp_path / "tv.pth")), 32).eval()
    from_tv = build_model(model_cfg(arch="timm/resnet50", pretrained=str(tmp_path / "tv.pth")), 32).eval()
    # Same architecture, same weights; 1e-4 relative: float32 convolutions may use different algorithms per module.
    with torch.no_grad():
        want = reference(images)
        assert torch.allclose(from_tv(images), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    save_file({k: v.contiguous() for k, v in from_tv.backbone.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    from_timm = build_model(model_cfg(arch="timm/resnet50", pretrained=str(tmp_path / "timm.safetensors")), 32).eval()
    assert all(torch.equal(a, b) for a, b in zip(from_timm.state_dict().values(), from_tv.state_dict().values()))


def test_vit_position_embeddings_are_resampled_to_the_image_size(tmp_path):
    source = randomised(timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict())
    cls_pos, patch_value = source["pos_embed"][:, :1].clone(), 0.25
    source["pos_embed"][:, 1:] = patch_value  # a constant field stays constant under any interpolation
    save_file(source, str(tmp_path / "vit.safetensors"))
    model = build_model(model_cfg(arch="timm/vit_tiny_patch16_224", pretrained=str(tmp_path / "vit.safetensors")), 48)
    pos = model.backbone.pos_embed.detach()
    assert pos.shape == (1, 1 + 9, 192) and torch.equal(pos[:, :1], cls_pos)
    assert torch.allclose(pos[:, 1:], torch.full_like(pos[:, 1:], patch_value), atol=1e-6)  # bicubic weights sum to 1
    assert torch.equal(model.backbone.blocks[3].attn.qkv.weight, source["blocks.3.attn.qkv.weight"])


def fake_hf_snapshot(cache, repo: str, state: dict[str, torch.Tensor]) -> None:
    """The layout huggingface_hub leaves in its cache: refs/main names the snapshot holding the file."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc123")
    save_file(state, str(folder / "snapshots" / "abc123" / "model.safetensors"))


def test_pretrained_tag_from_the_local_hf_cache_or_a_one_line_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    arch = "timm/vit_tiny_patch16_224.augreg_in21k"
    with pytest.raises(UserError, match=r"weights 'default' not found on disk at .*models--timm--vit_tiny_patch16_224"
                                        r"\.augreg_in21k \(no downloads") as info:
        build_model(model_cfg(arch=arch, pretrained="default"), 32)
    assert "\n" not in str(info.value)
    random_init = build_model(model_cfg(arch=arch, pretrained="default", pretrained_required=False), 32)
    assert "continuing from random initialisation" in caplog.text
    source = randomised(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).state_dict())
    fake_hf_snapshot(tmp_path / "hf", "timm/vit_tiny_patch16_224.augreg_in21k", source)
    cached = build_model(model_cfg(arch=arch, pretrained="default"), 32)
    assert torch.equal(cached.backbone.patch_embed.proj.weight, source["patch_embed.proj.weight"])
    assert not torch.equal(random_init.backbone.patch_embed.proj.weight, source["patch_embed.proj.weight"])
    by_tag = build_model(model_cfg(arch="timm/vit_tiny_patch16_224", pretrained="augreg_in21k"), 32)
    assert torch.equal(by_tag.backbone.cls_token, source["cls_token"])


def test_dino_weights_missing_names_both_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"models--timm--vit_small_patch16_224\.dino or .*torch/hub/checkpoints/"
                                        r"dino_deitsmall16_pretrain\.pth"):
        build_model(model_cfg(arch="timm/vit_small_patch16_224.dino", pretrained="default"), 32)


@pytest.mark.parametrize("arch, source_arch, fragment", [
    ("timm/resnet50", "resnet18", "do not fit 'timm/resnet50' .*tensors of another shape"),
    ("timm/resnet18", "vit", "do not fit 'timm/resnet18' .*missing and .* unexpected keys"),
    ("resnet18", "vit", "do not fit 'resnet18'"),
])
def test_weights_of_another_architecture_are_refused(tmp_path, arch, source_arch, fragment):
    state = (timm.create_model("vit_tiny_patch16_224").state_dict() if source_arch == "vit"
             else torchvision.models.get_model(source_arch).state_dict())
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(UserError, match=fragment) as info:
        build_model(model_cfg(arch=arch, pretrained=str(tmp_path / "other.pth")), 32)
    assert "\n" not in str(info.value)


def test_unknown_tag_and_foreign_file_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no pretrained tag 'nope' for 'vit_tiny_patch16_224' .*augreg_in21k"):
        build_model(model_cfg(arch="timm/vit_tiny_patch16_224", pretrained="nope"), 32)
    with pytest.raises(UserError, match="names weights of 'resnet50', not of 'vit_tiny_patch16_224'"):
        build_model(model_cfg(arch="timm/vit_tiny_patch16_224", pretrained="resnet50.a1_in1k"), 32)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="junk.safetensors: cannot load weights"):
        build_model(model_cfg(arch="timm/resnet18", pretrained=str(tmp_path / "junk.safetensors")), 32)
