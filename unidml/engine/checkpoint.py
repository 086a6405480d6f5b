"""Atomic checkpoints: write to a temp file, fsync, rename; load with `weights_only=True`.

A run keeps `last.pt` (newest), `prev.pt` (the one before, so a corrupted newest file never
loses the run) and `best.pt` (the model of the best evaluated epoch). Loading refuses a corrupt,
truncated or foreign file with one line naming it, and `load_latest` falls back to `prev.pt`.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from unidml.errors import UserError

log = logging.getLogger(__name__)
FORMAT = "unidml-checkpoint-v1"


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, truncated, corrupt or not ours)."""


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that a crash leaves either the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_rotating(state: dict[str, Any], directory: Path) -> Path:
    """Save as `last.pt`, keeping the previous `last.pt` as `prev.pt`."""
    last = directory / "last.pt"
    if last.exists():
        os.replace(last, directory / "prev.pt")
    save_atomic(state, last)
    return last


def load(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint (CPU tensors); raise CheckpointError naming the file when unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({detail[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a unidml checkpoint")
    return state


def load_latest(directory: Path) -> tuple[dict[str, Any], Path] | None:
    """Newest usable checkpoint in `directory` (`last.pt`, else `prev.pt`), or None when there is none."""
    candidates = [directory / "last.pt", directory / "prev.pt"]
    for path in candidates:
        if not path.exists():
            continue
        try:
            return load(path), path
        except CheckpointError as exc:
            log.warning("%s; trying the previous checkpoint", exc)
    if any(p.exists() for p in candidates):
        raise CheckpointError(f"{directory}: no usable checkpoint (last.pt and prev.pt are both unreadable)")
    return None


def load_for_inference(checkpoint_path: str | Path, overrides: Sequence[str] = ()) -> tuple[torch.nn.Module, DictConfig]:
    """The checkpoint's embedding network in eval mode and its run config (with `overrides` applied)."""
    from unidml.config import load_config_text
    from unidml.engine.model import build_model

    state = load(checkpoint_path)
    cfg = load_config_text(state["config"], source=str(checkpoint_path), overrides=overrides)
    model_cfg = OmegaConf.merge(cfg.model, {"pretrained": ""})  # the checkpoint carries the weights
    model = build_model(model_cfg)
    model.load_state_dict(state["model"])
    return model.eval(), cfg
