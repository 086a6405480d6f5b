"""Claiming a run directory: one writer at a time, and a finished or crashed run is never overwritten.

`claim_run_dir` takes an exclusive `flock` on `RUN_DIR/.lock` (the file holds the writer's PID, so a
second writer is refused with one line naming it; the kernel releases the lock when the process
dies, even by SIGKILL), removes temp files a killed writer left, and, unless the run resumes,
refuses a directory that already holds any checkpoint or a `metrics.json`. A run directory that
cannot be created (a regular file on the way, a read-only or unwritable place) is one line naming it.
The lock is advisory
and per host; on network file systems it holds where the file system supports `flock` (NFSv4).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import Iterator

from unidml.engine.checkpoint import remove_temp_files
from unidml.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class RunDirLocked(UserError):
    """Another process is writing into the run directory."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return f"PID {text}" if text.isdigit() else "a process whose PID is not recorded yet"


def _unusable(run_dir: Path, exc: OSError) -> UserError:
    if isinstance(exc, FileExistsError) or exc.errno == errno.ENOTDIR:
        on_way = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), run_dir)
        why = f"{on_way} is a regular file, not a directory"
    else:
        why = exc.strerror or str(exc)
    return UserError(f"{run_dir}: cannot create the run directory ({why}); pass --out DIR in a writable place")


def _lock_file(run_dir: Path) -> int:
    """The run directory created if needed, and its lock file opened (one line when it cannot be)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _unusable(run_dir, exc) from None


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock of `run_dir` for the duration of the block."""
    fd = _lock_file(run_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLocked(f"{run_dir}: in use by another run ({_holder(fd)}); wait for it to finish "
                               f"or pass --out NEW_DIR") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def existing_run(run_dir: Path) -> list[Path]:
    """What marks `run_dir` as holding a run: checkpoints (any file under `checkpoints/`, DeepSpeed
    tags included) and `metrics.json`."""
    found = [run_dir / "metrics.json"] if (run_dir / "metrics.json").is_file() else []
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        found += sorted(p for p in checkpoints.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    return found


def refuse_existing_run(run_dir: Path) -> None:
    """One line when `run_dir` already holds a run (the caller did not ask to resume it)."""
    found = existing_run(run_dir)
    if found:
        names = ", ".join(str(p.relative_to(run_dir)) for p in found[:3]) + (" ..." if len(found) > 3 else "")
        raise UserError(f"{run_dir}: already holds a run ({names}); pass train.resume=auto to continue it "
                        f"or --out NEW_DIR for a new one")


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, resume: str, is_main: bool) -> Iterator[None]:
    """The run directory for one training: locked by the main rank, stray temp files removed, and
    checked not to hold a run unless `resume` is `auto` or a path. Other ranks only check."""
    lock = run_lock(run_dir) if is_main else contextlib.nullcontext()
    with lock:
        if is_main:
            for stray in remove_temp_files(run_dir) + remove_temp_files(run_dir / "checkpoints"):
                log.info("removed %s (left by an interrupted write)", stray)
        if resume == "never":
            refuse_existing_run(run_dir)
        yield
