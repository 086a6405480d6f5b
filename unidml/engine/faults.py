"""Test-only fault injection, driven by environment variables that nothing sets in normal runs.

`UNIDML_TEST_KILL=RANK:EPOCH:MARKER` (e.g. `1:1:/tmp/killed`): rank RANK kills itself at its first
optimizer step after the checkpoint of epoch EPOCH was written, unless the file MARKER exists (it is
created just before the kill, so a restarted group runs through). This exercises `torchrun
--max-restarts` recovery from the last checkpoint.

`UNIDML_TEST_CHECKPOINT_FAULT=N:STAGE:ACTION` (e.g. `3:prev_linked:kill`): during this process's
N-th checkpoint write, at STAGE (`writing`, `written`, `best_linked`, `prev_linked`, `last_renamed`,
`done`; see `checkpoint.save_epoch`), either SIGKILL the process (`kill`) or fail as a full disk would
(`enospc`). This exercises crash safety inside the write sequence.
"""
from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "UNIDML_TEST_KILL"
CHECKPOINT_ENV_VAR = "UNIDML_TEST_CHECKPOINT_FAULT"
CHECKPOINT_STAGES = ("writing", "written", "best_linked", "prev_linked", "last_renamed", "done")


@dataclass(frozen=True)
class KillSwitch:
    rank: int
    epoch: int
    marker: Path

    @classmethod
    def from_env(cls, rank: int) -> "KillSwitch | None":
        spec = os.environ.get(ENV_VAR, "")
        if not spec:
            return None
        want_rank, epoch, marker = spec.split(":", 2)
        return cls(int(want_rank), int(epoch), Path(marker)) if int(want_rank) == rank else None

    def after_step(self, checkpointed_epoch: int) -> None:
        """Called after each optimizer step with the epoch of the newest checkpoint."""
        if checkpointed_epoch == self.epoch and not self.marker.exists():
            self.marker.write_text(f"rank {self.rank} killed after the epoch-{self.epoch} checkpoint\n")
            os.kill(os.getpid(), signal.SIGKILL)


_writes = {"count": 0}


def checkpoint_point(stage: str) -> None:
    """A point inside a checkpoint write; acts only when `UNIDML_TEST_CHECKPOINT_FAULT` names it."""
    if stage == "writing":
        _writes["count"] += 1
    spec = os.environ.get(CHECKPOINT_ENV_VAR, "")
    if not spec:
        return
    number, want_stage, action = spec.split(":")
    if int(number) != _writes["count"] or want_stage != stage:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
