"""Crash-safe checkpoints: one write to a temp file, then renames; load with `weights_only=True`.

A run keeps `last.pt` (newest), `prev.pt` (the one before, so a corrupted newest file never loses
the run) and `best.pt` (the model of the best evaluated epoch). `save_epoch` writes the new state
once (temp file, fsync) and only then links and renames: `best.pt` is pointed at it, the current
`last.pt` gets a temp second name, the temp file replaces `last.pt`, and that second name replaces
`prev.pt`, each in one rename. At every instant `last.pt` is a complete checkpoint (old or new) and
`prev.pt` a distinct older one, and a full disk or a file-size limit (`ulimit -f`) fails the write
before anything is touched. Loading refuses a corrupt, truncated, unsafe or foreign file with one
line naming it and the cause; `load_latest` falls back to `prev.pt`, and when resuming it moves the
file that failed aside (`last.pt.corrupt-<time>`) so that it never becomes a generation.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from unidml.errors import UserError

log = logging.getLogger(__name__)
FORMAT = "unidml-checkpoint-v1"
TEMP_SUFFIX = ".tmp"
QUARANTINE = ".corrupt-"  # `last.pt.corrupt-20260101T120000`: a file that failed to load when resuming
# OS errors that mean "no room for this file", what each is called, and what frees the room
NO_ROOM = {errno.ENOSPC: ("disk full", "free space"), errno.EDQUOT: ("disk quota exceeded", "free space"),
           errno.EFBIG: ("file-size limit reached (ulimit -f)", "raise the limit")}
ZIP_MAGIC = b"PK\x03\x04"  # every file torch.save writes is a zip archive


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, truncated, corrupt, unsafe or not ours) or written."""


# The named points of a checkpoint write, in order (see `save_epoch`). An observer is called at each one;
# the crash-safety tests pass one that kills the process or fails as a full disk would at a chosen point.
WRITE_STAGES = ("writing", "written", "best_linked", "prev_linked", "last_renamed", "done")
WriteObserver = Callable[[str], None]


def unobserved(stage: str) -> None:
    """The observer of a normal write: nothing happens at any stage."""


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


def _os_error(exc: BaseException) -> OSError | None:
    """The OS error behind `exc`, also when torch wraps it (its zip writer turns a failed write into
    `RuntimeError: ... unexpected pos`, with the `OSError` as context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _write_failed(path: Path, exc: OSError) -> CheckpointError:
    """One line for an OS error while writing `path` (disk full and file-size limit said plainly)."""
    if exc.errno in NO_ROOM:
        what, remedy = NO_ROOM[exc.errno]
        return CheckpointError(f"{path}: {what} while writing the checkpoint; the previous checkpoints in "
                               f"{path.parent} are intact ({remedy}, then rerun with train.resume=auto)")
    return CheckpointError(f"{path}: cannot write the checkpoint ({exc.strerror or exc})")


def _write_temp(state: dict[str, Any], path: Path, observe: WriteObserver) -> Path:
    """`state` serialised into a fsynced temp file beside `path` (removed again on any failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path.parent, path.name)
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            observe("writing")
            handle.flush()
            os.fsync(handle.fileno())
        observe("written")
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        os_error = _os_error(exc) if isinstance(exc, Exception) else None
        if os_error is not None:
            raise _write_failed(path, os_error) from None
        raise
    return tmp


def _second_name(source: Path, target: Path) -> Path:
    """A temp name beside `target` for the file `source` (a hard link; a copy where the file system
    has none). The files are never modified in place, so sharing one inode is safe."""
    tmp = _temp_name(target.parent, target.name)
    tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        shutil.copyfile(source, tmp)
    return tmp


def _link_into_place(source: Path, target: Path) -> None:
    """Make `target` name the same file as `source` in one rename."""
    tmp = None
    try:
        tmp = _second_name(source, target)
        os.replace(tmp, target)
    except OSError as exc:
        raise _write_failed(target, exc) from None
    finally:  # rename(2) between two links of one file does nothing and leaves `tmp`
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def save_atomic(state: dict[str, Any], path: Path, observe: WriteObserver = unobserved) -> None:
    """Write `state` to `path` so that a crash leaves either the old file or the new one, never half."""
    tmp = _write_temp(state, path, observe)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, exc) from None
    _fsync_directory(path.parent)


def save_epoch(state: dict[str, Any], directory: Path, is_best: bool, observe: WriteObserver = unobserved) -> Path:
    """Save `state` as the new `last.pt` (and `best.pt` when `is_best`), keeping the current
    `last.pt` as `prev.pt`. Written once; every later step is a link or a rename, so a kill or a
    failure at any point leaves a complete `last.pt` (the old or the new one), a distinct older
    `prev.pt`, and at most stray temp files."""
    last, prev = directory / "last.pt", directory / "prev.pt"
    tmp = _write_temp(state, last, observe)
    kept: Path | None = None  # the current last.pt under a temp name, until it replaces prev.pt
    placed = False
    try:
        if is_best:
            _link_into_place(tmp, directory / "best.pt")
            observe("best_linked")
        if last.exists():
            kept = _second_name(last, prev)
            observe("prev_linked")
        os.replace(tmp, last)
        placed = True
        observe("last_renamed")
        if kept is not None:
            os.replace(kept, prev)
    except OSError as exc:
        if not placed:
            raise _write_failed(last, exc) from None
        raise CheckpointError(f"{last}: the new checkpoint is in place, but keeping the previous one as "
                              f"{prev.name} failed ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
        if kept is not None:  # renaming one link of a file over another leaves both
            kept.unlink(missing_ok=True)
    _fsync_directory(directory)
    observe("done")
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


def _not_torch(path: Path) -> str | None:
    """Why `path` cannot be a file torch.save wrote (empty, no zip header, a cut-off zip), or None."""
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        return f"not a PyTorch checkpoint: no zip archive header (the file starts with bytes {head.hex()})"
    if not zipfile.is_zipfile(path):
        return f"truncated: the zip archive has no end (directory missing; {size} bytes), the write was cut short"
    return None


GLOBAL_MARKERS = ("Unsupported global: ", "unsupported GLOBAL ")  # torch's words for a refused import


def _refused_global(text: str) -> str | None:
    """The Python object a weights-only load refused to import ("GLOBAL posix.system"), or None."""
    for marker in GLOBAL_MARKERS:
        if marker in text:
            name = text[text.index(marker) + len(marker):].split()[0]
            return name if marker.startswith("Unsupported") else f"GLOBAL {name}"
    return None


def _load_error(path: Path, exc: Exception) -> CheckpointError:
    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        what = _refused_global(text)
        if what is not None:
            return CheckpointError(f"{path}: refused: the file contains pickled Python objects ({what}) that a "
                                   f"unidml checkpoint never holds; nothing in it was executed. Use only "
                                   f"checkpoints written by unidml")
        after = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else ""
        reason = next((line.strip() for line in after.splitlines() if line.strip()), "unreadable")
        return CheckpointError(f"{path}: corrupt checkpoint: its pickled data is malformed ({reason[:160]}); "
                               f"nothing in it was executed")
    detail = text.splitlines()[0] if text else type(exc).__name__
    return CheckpointError(f"{path}: corrupt or truncated checkpoint ({detail[:200]})")


def load(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint (CPU tensors); raise CheckpointError naming the file and the cause when unusable."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; name a checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        problem = _not_torch(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from None
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _load_error(path, exc) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a unidml checkpoint")
    return state


def _quarantine(path: Path) -> None:
    """Move a file that failed to load aside (`NAME.corrupt-<time>`), so that the next save cannot make
    it `prev.pt`: a generation is always a file that loaded or that this run wrote."""
    target = path.with_name(f"{path.name}{QUARANTINE}{time.strftime('%Y%m%dT%H%M%S')}")
    try:
        os.replace(path, target)
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable, and it cannot be moved aside ({exc.strerror or exc}); "
                              f"move or delete it, then rerun") from None
    log.warning("%s: moved aside as %s (it failed to load)", path, target.name)


def load_latest(directory: Path, quarantine: bool = False) -> tuple[dict[str, Any], Path] | None:
    """Newest usable checkpoint in `directory` (`last.pt`, else `prev.pt`), or None when there is none.
    With `quarantine` (the writer of a resumed run), a file that failed to load before the one that
    loaded is moved aside."""
    candidates = [directory / "last.pt", directory / "prev.pt"]
    failed = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            state = load(path)
        except CheckpointError as exc:
            log.warning("%s; trying the previous checkpoint", exc)
            failed.append(path)
            continue
        if quarantine:
            for bad in failed:
                _quarantine(bad)
        return state, path
    if any(p.exists() for p in candidates):
        raise CheckpointError(f"{directory}: no usable checkpoint (last.pt and prev.pt are both unreadable)")
    return None


def load_source(source: Path, quarantine: bool = False) -> tuple[dict[str, Any], Path] | None:
    """A checkpoint directory's newest usable file (see `load_latest`), or one file by any name; None
    when there is none."""
    if source.is_dir():
        return load_latest(source, quarantine)
    if not source.exists():
        return None
    return load(source), source


def stored_config_text(state: Mapping[str, Any], path: str | Path) -> str:
    """The YAML run config a checkpoint carries; one line when it has none (`unidml.run_config.stored_run_config`
    loads and checks it)."""
    text = state.get("config")
    if not isinstance(text, str) or not text.strip():
        raise CheckpointError(f"{path}: the checkpoint carries no run config (key 'config'); "
                              f"it was not written by `unidml train`")
    return text


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


def stored_config_difference(state: Mapping[str, Any], path: str | Path, current: DictConfig,
                             keys: Sequence[str]) -> str:
    """What the checkpoint's stored config sets differently among `keys` ("" when it cannot be read)."""
    try:
        stored = yaml.safe_load(stored_config_text(state, path))
        return config_difference(OmegaConf.create(stored), current, keys) if isinstance(stored, dict) else ""
    except (UserError, yaml.YAMLError):
        return ""


def restore_modules(model: torch.nn.Module, loss: torch.nn.Module, state: Mapping[str, Any], path: str | Path,
                    cfg: DictConfig) -> None:
    """Load a training checkpoint's network and loss state (classifier, proxies, centers) into this
    run's modules; one line naming what differs when the checkpoint belongs to another setup."""
    load_module_state(model, state.get("model"), path, "model", stored_config_difference(state, path, cfg, MODEL_KEYS))
    load_module_state(loss, state.get("loss"), path, "loss", stored_config_difference(state, path, cfg, LOSS_KEYS) or
                      "a different class count or loss")


def load_optimizer_state(optimizer: Any, stored: Any, path: str | Path) -> None:
    """`optimizer.load_state_dict(stored)`, or one line when the parameter groups differ."""
    try:
        optimizer.load_state_dict(stored)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the checkpoint's optimizer state does not fit this run "
                              f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
