"""`unidml export`: ONNX and TorchScript exports of ResNet-18 and ViT-Tiny embedding networks match PyTorch."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from unidml.errors import UserError
from unidml.launcher.commands import export
from unidml.registry import EXPORT_FORMATS
from unidml.run_config import load_run_config

pytest.importorskip("timm")
BASE = ["data.synthetic.classes=4", "data.synthetic.per_class=3", "data.synthetic.size=32", "data.image_size=32",
        "data.resize_size=32", "data.num_workers=0", "data.backend=torchvision", "model.pretrained=''",
        "engine.device=cpu", "data.val_classes=0", "eval.split=test"]
ARCHS = {"resnet18": ["model.arch=resnet18", "model.embedding_dim=16"],
         "vit_tiny": ["model.arch=timm/vit_tiny_patch16_224", "model.pooling=avg"]}


def command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    return export.run(parser.parse_args(argv))


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory) -> Path:
    from unidml.config import to_yaml
    from unidml.engine.checkpoint import save_atomic
    from unidml.models import build_model

    root = tmp_path_factory.mktemp(request.param)
    cfg = load_run_config(None, BASE + ARCHS[request.param] + [f"data.root={tmp_path_factory.getbasetemp() / 'data'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size).train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    save_atomic({"config": to_yaml(cfg), "model": model.state_dict()}, root / "best.pt")
    return root / "best.pt"


def reference(checkpoint: Path, images: torch.Tensor) -> np.ndarray:
    from unidml.run_config import load_for_inference

    model, _ = load_for_inference(checkpoint)
    with torch.no_grad():
        return model.float()(images).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", EXPORT_FORMATS.names())
def test_export_matches_pytorch_on_other_batch_sizes(checkpoint, fmt, tmp_path, capsys):
    out = tmp_path / f"net.{fmt}"
    assert command(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    diff = float(re.search(r"max abs difference vs PyTorch .*: ([0-9.e+-]+)", printed).group(1))
    assert diff <= 1e-4
    # Independently of the command's own check: a batch size it did not use (the dynamic batch axis).
    images = torch.randn(3, 3, 32, 32)
    if fmt == "onnx":
        import onnxruntime
        got = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
            None, {"images": images.numpy()})[0]
    else:
        with torch.no_grad():
            got = torch.jit.load(str(out)).eval()(images).numpy()
    # 1e-4: the float32 bound the command enforces (different kernels, same arithmetic up to rounding).
    assert np.abs(got - reference(checkpoint, images)).max() <= 1e-4


def test_export_fails_above_the_tolerance(checkpoint, tmp_path):
    with pytest.raises(UserError, match="differs from PyTorch by .* > --tolerance -1") as info:
        command(["--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(tmp_path / "n.pt"),
                 "--tolerance", "-1"])
    assert "\n" not in str(info.value)
