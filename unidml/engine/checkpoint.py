"""Crash-safe checkpoints: one write to a temp file, then renames; load with `weights_only=True`.

A run keeps `last.pt` (newest), `prev.pt` (the one before, so a corrupted newest file never loses
the run) and `best.pt` (the model of the best evaluated epoch). `save_epoch` writes the new state
once (temp file, fsync) and only then links and renames: `best.pt` is pointed at it, the current
`last.pt` is linked to `prev.pt`, and the temp file replaces `last.pt` in one rename. At every
instant `last.pt` is a complete checkpoint (old or new), and a full disk fails the write before
anything is touched. Loading refuses a corrupt, truncated, unsafe or foreign file with one line
naming it, and `load_latest` falls back to `prev.pt`.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from unidml.engine import faults
from unidml.errors import UserError

log = logging.getLogger(__name__)
FORMAT = "unidml-checkpoint-v1"
TEMP_SUFFIX = ".tmp"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, truncated, corrupt, unsafe or not ours) or written."""


def _fsync_directory(directory: Path) -> None:
    """Make the renames in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    return Path(tmp)


def _write_failed(path: Path, exc: OSError) -> CheckpointError:
    """One line for an OS error while writing `path` (disk full said plainly)."""
    if exc.errno in DISK_FULL:
        return CheckpointError(f"{path}: disk full while writing the checkpoint; the previous checkpoints in "
                               f"{path.parent} are intact (free space, then rerun with train.resume=auto)")
    return CheckpointError(f"{path}: cannot write the checkpoint ({exc.strerror or exc})")


def _write_temp(state: dict[str, Any], path: Path) -> Path:
    """`state` serialised into a fsynced temp file beside `path` (removed again on any failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path.parent, path.name)
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            faults.checkpoint_point("writing")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_failed(path, exc) from None
        raise
    faults.checkpoint_point("written")
    return tmp


def _link_into_place(source: Path, target: Path) -> None:
    """Make `target` name the same file as `source` in one rename (a hard link; a copy where the file
    system has none). The files are never modified in place, so sharing one inode is safe."""
    tmp = _temp_name(target.parent, target.name)
    tmp.unlink()
    try:
        try:
            os.link(source, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise _write_failed(target, exc) from None
    finally:  # rename(2) between two links of one file does nothing and leaves `tmp`
        tmp.unlink(missing_ok=True)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that a crash leaves either the old file or the new one, never half."""
    tmp = _write_temp(state, path)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, exc) from None
    _fsync_directory(path.parent)


def save_epoch(state: dict[str, Any], directory: Path, is_best: bool) -> Path:
    """Save `state` as the new `last.pt` (and `best.pt` when `is_best`), keeping the current
    `last.pt` as `prev.pt`. Written once; every later step is a link or a rename, so a kill at any
    point leaves a complete `last.pt` (the old or the new one) and at most a stray temp file."""
    last = directory / "last.pt"
    tmp = _write_temp(state, last)
    try:
        if is_best:
            _link_into_place(tmp, directory / "best.pt")
            faults.checkpoint_point("best_linked")
        if last.exists():
            _link_into_place(last, directory / "prev.pt")
            faults.checkpoint_point("prev_linked")
        os.replace(tmp, last)
    except OSError as exc:
        raise _write_failed(last, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(directory)
    faults.checkpoint_point("done")
    return last


def first_non_finite(module: torch.nn.Module) -> str | None:
    """Name of the first floating-point parameter or buffer of `module` holding NaN or inf (None if
    all are finite): what must never be evaluated as a result or checkpointed over a good model."""
    for name, tensor in module.state_dict().items():
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def remove_temp_files(directory: Path) -> list[Path]:
    """Delete temp files a killed writer left in `directory` (call it while holding the run lock)."""
    if not directory.is_dir():
        return []
    stray = [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.is_file()]
    for path in stray:
        path.unlink(missing_ok=True)
    return stray


def _load_error(path: Path, exc: Exception) -> CheckpointError:
    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        marker = "Unsupported global: "
        what = text[text.index(marker) + len(marker):].split(" was not", 1)[0] if marker in text else "code"
        return CheckpointError(f"{path}: refused: the file contains pickled Python objects ({what}) that a unidml "
                               f"checkpoint never holds; nothing in it was executed. Use only checkpoints "
                               f"written by unidml")
    detail = text.splitlines()[0] if text else type(exc).__name__
    return CheckpointError(f"{path}: corrupt or truncated checkpoint ({detail[:200]})")


def load(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint (CPU tensors); raise CheckpointError naming the file when unusable."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; name a checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _load_error(path, exc) from None
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


def load_source(source: Path) -> tuple[dict[str, Any], Path] | None:
    """A checkpoint directory's newest usable file, or one file by any name; None when there is none."""
    if source.is_dir():
        return load_latest(source)
    if not source.exists():
        return None
    return load(source), source


def stored_config(state: Mapping[str, Any], path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The run config a checkpoint carries (with `overrides`); one line when it is missing or unusable."""
    from unidml.config import ConfigError, load_config_text

    text = state.get("config")
    if not isinstance(text, str) or not text.strip():
        raise CheckpointError(f"{path}: the checkpoint carries no run config (key 'config'); "
                              f"it was not written by `unidml train`")
    try:
        return load_config_text(text, source=f"{path} (stored config)", overrides=overrides)
    except ConfigError:
        raise
    except Exception as exc:  # YAML syntax errors and the like in a hand-edited checkpoint
        raise CheckpointError(f"{path}: the stored run config is unreadable ({type(exc).__name__})") from None


def describe_mismatch(expected: Mapping[str, torch.Tensor], stored: Mapping[str, Any]) -> str:
    """What differs between a module's state dict and a stored one, in a few words (first difference)."""
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    for key, tensor in expected.items():
        value = stored.get(key)
        if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(tensor.shape):
            return (f"'{key}' is {'x'.join(map(str, value.shape)) or 'scalar'} in the checkpoint but "
                    f"{'x'.join(map(str, tensor.shape)) or 'scalar'} here")
    parts = [f"{what} {keys[0]!r}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if parts:
        return ", ".join(parts)
    return "incompatible tensors"


def load_module_state(module: torch.nn.Module, stored: Any, path: str | Path, part: str, hint: str = "") -> None:
    """`module.load_state_dict(stored)`, or one line naming the checkpoint, the `part` (model, loss)
    and the first difference (a shape, a missing key) when the checkpoint does not fit."""
    if not isinstance(stored, Mapping):
        raise CheckpointError(f"{path}: no {part} state in the checkpoint")
    try:
        module.load_state_dict(stored)
    except (RuntimeError, KeyError, ValueError):
        detail = describe_mismatch(module.state_dict(), stored)
        raise CheckpointError(f"{path}: the checkpoint's {part} does not fit this {part}: {detail}"
                              f"{'; ' + hint if hint else ''}") from None


def config_difference(stored: DictConfig, current: DictConfig, keys: Sequence[str]) -> str:
    """`key=stored` pairs of the `keys` whose value differs between two configs (for mismatch hints)."""
    diffs = []
    for key in keys:
        old, new = OmegaConf.select(stored, key), OmegaConf.select(current, key)
        if old != new:
            diffs.append(f"{key}={old} (this run: {new})")
    return ("the checkpoint was trained with " + ", ".join(diffs)) if diffs else ""


MODEL_KEYS = ("model.arch", "model.embedding_dim", "model.small_input_stem", "model.feature_bn")
LOSS_KEYS = ("loss.name", "data.dataset", "data.root", "data.list_file", "data.val_classes", "model.embedding_dim")


def _hint(state: Mapping[str, Any], path: str | Path, current: DictConfig, keys: Sequence[str]) -> str:
    try:
        return config_difference(stored_config(state, path), current, keys)
    except UserError:
        return ""


def restore_modules(model: torch.nn.Module, loss: torch.nn.Module, state: Mapping[str, Any], path: str | Path,
                    cfg: DictConfig) -> None:
    """Load a training checkpoint's network and loss state (classifier, proxies, centers) into this
    run's modules; one line naming what differs when the checkpoint belongs to another setup."""
    load_module_state(model, state.get("model"), path, "model", _hint(state, path, cfg, MODEL_KEYS))
    load_module_state(loss, state.get("loss"), path, "loss", _hint(state, path, cfg, LOSS_KEYS) or
                      "a different class count or loss")


def load_optimizer_state(optimizer: Any, stored: Any, path: str | Path) -> None:
    """`optimizer.load_state_dict(stored)`, or one line when the parameter groups differ."""
    try:
        optimizer.load_state_dict(stored)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the checkpoint's optimizer state does not fit this run "
                              f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None


def load_for_inference(checkpoint_path: str | Path, overrides: Sequence[str] = ()
                       ) -> tuple[torch.nn.Module, DictConfig]:
    """The checkpoint's embedding network in eval mode and its run config (with `overrides` applied)."""
    from unidml.models import build_model
    from unidml.runtime.device import device_type
    from unidml.runtime.memory_format import channels_last

    state = load(checkpoint_path)
    cfg = stored_config(state, checkpoint_path, overrides)
    model_cfg = OmegaConf.merge(cfg.model, {"pretrained": ""})  # the checkpoint carries the weights
    model = build_model(model_cfg, image_size=int(cfg.data.image_size))
    hint = config_difference(stored_config(state, checkpoint_path), cfg,
                             ("model.arch", "model.embedding_dim", "model.small_input_stem"))
    load_module_state(model, state.get("model"), checkpoint_path, "model",
                      hint or "the stored config does not describe the stored weights")
    device = device_type(str(cfg.engine.device))  # where the commands that load it compute
    if channels_last(cfg.engine.channels_last, device, cfg.engine.backend, model).weights:
        # The memory format the run trained and evaluated in (see Trainer): another one changes low-precision
        # rounding, and with it near-tied neighbours, so evaluation would not reproduce the run's figures.
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), cfg
