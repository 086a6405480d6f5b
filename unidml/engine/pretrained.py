"""Load backbone weights from local disk only: a file path or a torchvision weights name.

Nothing is downloaded: a torchvision name is looked up in the local torch hub cache
(`$TORCH_HOME/hub/checkpoints/<file of the weights' URL>`). When the weights are not on disk the
run stops with one line saying where they were expected, or, with `model.pretrained_required=false`,
warns and keeps the random initialisation.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from unidml.errors import UserError

log = logging.getLogger(__name__)
NO_WEIGHTS = ("", "none", "None", "random")


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith((".pth", ".pt", ".bin")) or Path(spec).exists()


def resolve_weights_file(spec: str, arch: str) -> Path:
    """The local file that `model.pretrained=spec` refers to (it may not exist)."""
    if _looks_like_path(spec):
        return Path(spec).expanduser()
    try:
        if "." in spec:
            weights = torchvision.models.get_weight(spec)
        else:
            weights = torchvision.models.get_model_weights(arch)[spec]
    except (KeyError, ValueError, AttributeError):
        raise UserError(f"model.pretrained: '{spec}' is neither an existing file nor a torchvision weights name "
                        f"for '{arch}' (e.g. IMAGENET1K_V1 or ResNet50_Weights.IMAGENET1K_V1)") from None
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _state_dict_from(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a state dict (found {type(obj).__name__})")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in obj.items()}


def load_pretrained(backbone: nn.Module, spec: str, arch: str, required: bool = True) -> bool:
    """Load `spec` into `backbone` (classifier `fc.*` keys may differ); return whether weights were loaded."""
    if spec in NO_WEIGHTS:
        return False
    path = resolve_weights_file(spec, arch)
    if not path.is_file():
        message = f"model.pretrained: weights '{spec}' not found on disk at {path} (no downloads are made)"
        if required:
            raise UserError(message + "; place the file there or set model.pretrained_required=false")
        log.warning("%s; continuing from random initialisation", message)
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: name it in one line
        raise UserError(f"{path}: cannot load weights ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    weights = {k: v for k, v in _state_dict_from(state, path).items() if not k.startswith("fc.")}
    try:
        result = backbone.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise UserError(f"{path}: weights do not fit '{arch}' ({str(exc).splitlines()[-1].strip()})") from None
    bad = [k for k in result.missing_keys + result.unexpected_keys if not k.startswith("fc.")]
    if bad:
        raise UserError(f"{path}: weights do not fit '{arch}' ({len(bad)} mismatched keys, e.g. '{bad[0]}')")
    return True
