"""Test-only fault injection: nothing in the product reads these settings.

In this process, `checkpoint_fault(spec)` is the observer `checkpoint.save_epoch`/`save_atomic` take:
`N:STAGE:ACTION` (e.g. `3:prev_linked:kill`) acts during this process's N-th checkpoint write, at STAGE (one
of `checkpoint.WRITE_STAGES`), by SIGKILLing the process (`kill`) or failing as a full disk would (`enospc`).
`inject_checkpoint_fault(spec, patch)` makes every checkpoint write of the process use it.
`inject_kill(spec, rank, patch)`: `RANK:EPOCH:MARKER` (e.g. `1:1:/tmp/killed`) makes rank RANK SIGKILL itself
at its first optimizer step after the checkpoint of epoch EPOCH was written, unless MARKER exists (created
just before the kill, so a restarted group runs through), exercising `torchrun --max-restarts` recovery.

For a child process, run this file instead of `python -m unidml` (also under torchrun); it reads the specs
from `UNIDML_TEST_CHECKPOINT_FAULT` and `UNIDML_TEST_KILL`, installs them and runs the command line:

    UNIDML_TEST_CHECKPOINT_FAULT=2:writing:enospc python tests/fault_injection.py train --config ...
"""
from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from unidml.engine import checkpoint

SCRIPT = str(Path(__file__).resolve())
CHECKPOINT_FAULT = "UNIDML_TEST_CHECKPOINT_FAULT"
KILL = "UNIDML_TEST_KILL"
Patch = Callable[[Any, str, Any], None]  # setattr, or pytest's monkeypatch.setattr


def checkpoint_fault(spec: str) -> checkpoint.WriteObserver:
    """The write observer acting at write N, STAGE (`N:STAGE:kill|enospc`); writes are counted from 1."""
    number, want_stage, action = spec.split(":")
    assert want_stage in checkpoint.WRITE_STAGES and action in ("kill", "enospc"), spec
    writes = {"count": 0}

    def observe(stage: str) -> None:
        if stage == "writing":
            writes["count"] += 1
        if writes["count"] != int(number) or stage != want_stage:
            return
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return observe


def inject_checkpoint_fault(spec: str, patch: Patch = setattr) -> None:
    """Every later `save_epoch`/`save_atomic` of this process is observed by `checkpoint_fault(spec)`."""
    observe = checkpoint_fault(spec)
    patch(checkpoint, "save_epoch", functools.partial(checkpoint.save_epoch, observe=observe))
    patch(checkpoint, "save_atomic", functools.partial(checkpoint.save_atomic, observe=observe))


def inject_kill(spec: str, rank: int, patch: Patch = setattr) -> None:
    """Rank RANK SIGKILLs itself after its first optimizer step of epoch EPOCH (the epoch-EPOCH checkpoint
    is the newest then), unless MARKER exists."""
    from unidml.engine.trainer import Trainer

    want_rank, epoch, marker = spec.split(":", 2)
    if int(want_rank) != rank:
        return
    marker_path, train_step = Path(marker), Trainer.train_step

    def killing_step(self: Trainer, images: Any, labels: Any, ends_step: bool) -> Any:
        out = train_step(self, images, labels, ends_step)
        if ends_step and self.epoch == int(epoch) and not marker_path.exists():
            marker_path.write_text(f"rank {rank} killed after the epoch-{epoch} checkpoint\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    patch(Trainer, "train_step", killing_step)


def main() -> int:
    from unidml.launcher.cli import main as unidml_main

    if os.environ.get(CHECKPOINT_FAULT):
        inject_checkpoint_fault(os.environ[CHECKPOINT_FAULT])
    if os.environ.get(KILL):
        inject_kill(os.environ[KILL], int(os.environ.get("RANK", "0")))
    return unidml_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
