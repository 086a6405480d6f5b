"""Backbone weights from local disk only: a file, a folder, or a name looked up in the local caches.

Nothing is downloaded. `model.pretrained` is a `.safetensors`/`.pth`/`.pt`/`.bin` file (or a folder
holding `model.safetensors` or `pytorch_model.bin`, e.g. a Hugging Face snapshot), or a weights name:
a torchvision weights name (`IMAGENET1K_V1`) looked up in the torch hub cache
(`$TORCH_HOME/hub/checkpoints/`), or a timm pretrained tag (`dino`, `default`) looked up in the
Hugging Face hub cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`) and the torch
hub cache. When the weights are not on disk the run stops with one line saying where they were
expected, or, with `model.pretrained_required=false`, warns and keeps the random initialisation.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from unidml.errors import UserError

log = logging.getLogger(__name__)
NO_WEIGHTS = ("", "none", "None", "random")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_KEYS = ("state_dict", "model", "teacher")  # training checkpoints nest the weights under one of these
KEY_PREFIXES = ("module.", "backbone.", "_orig_mod.")  # DDP, wrapper-model and torch.compile prefixes


def looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.endswith(WEIGHT_SUFFIXES) or Path(spec).exists()


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hf_cached_file(repo_id: str, filenames: Sequence[str]) -> tuple[Path | None, Path]:
    """(the first of `filenames` in the local snapshot of `repo_id` or None, the repo's cache folder)."""
    folder = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    ref = folder / "refs" / "main"
    snapshots = [folder / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    snapshots += sorted((folder / "snapshots").glob("*")) if (folder / "snapshots").is_dir() else []
    for snapshot in snapshots:
        for name in filenames:
            if (snapshot / name).is_file():
                return snapshot / name, folder
    return None, folder


def weights_file_in(path: Path) -> Path:
    """`path` itself, or the weights file inside a folder (a Hugging Face snapshot or a plain folder)."""
    if not path.is_dir():
        return path
    for name in FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return found[0] if len(found) == 1 else path / FOLDER_FILES[0]


def missing(spec: str, places: Iterable[Path], required: bool) -> None:
    """Weights `spec` are not on disk: raise (one line naming where they were looked for) or warn."""
    where = " or ".join(str(p) for p in places)
    message = f"model.pretrained: weights '{spec}' not found on disk at {where} (no downloads are made)"
    if required:
        raise UserError(message + "; place the file there, give a file path, or set model.pretrained_required=false")
    log.warning("%s; continuing from random initialisation", message)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: unwrapped from a training checkpoint, wrapper prefixes removed."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: name it in one line
        raise UserError(f"{path}: cannot load weights ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a state dict of tensors (found {type(obj).__name__})")
    state = {}
    for key, value in obj.items():
        for prefix in KEY_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    return state


def fit_state_dict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str,
                   ignore: Sequence[str] = ()) -> None:
    """Load `state` into `module` exactly (keys under the `ignore` prefixes, e.g. the ImageNet head, dropped)."""
    prefixes = tuple(f"{p}." for p in ignore)
    weights = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    expected = module.state_dict()
    wrong_shape = [k for k, v in weights.items() if k in expected and expected[k].shape != v.shape]
    if wrong_shape:
        k = wrong_shape[0]
        raise UserError(f"{path}: weights do not fit '{arch}' ({len(wrong_shape)} tensors of another shape, e.g. "
                        f"'{k}' {tuple(weights[k].shape)} vs {tuple(expected[k].shape)})")
    result = module.load_state_dict(weights, strict=False)
    bad = [k for k in result.missing_keys + result.unexpected_keys if not k.startswith(prefixes)]
    if bad:
        raise UserError(f"{path}: weights do not fit '{arch}' ({len(result.missing_keys)} missing and "
                        f"{len(result.unexpected_keys)} unexpected keys, e.g. '{bad[0]}')")


def load_file_into(module: nn.Module, path: Path, spec: str, arch: str, required: bool,
                   ignore: Sequence[str] = (), adapt=None) -> bool:
    """Load the weights file `path` (named by `spec`) into `module`; `adapt(state)` may reshape tensors first."""
    path = weights_file_in(path)
    if not path.is_file():
        missing(spec, [path], required)
        return False
    state = read_state_dict(path)
    fit_state_dict(module, adapt(state) if adapt else state, path, arch, ignore)
    log.info("loaded %s weights from %s", arch, path)
    return True
