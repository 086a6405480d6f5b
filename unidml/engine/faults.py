"""Test-only fault injection: a rank that SIGKILLs itself once, mid-epoch, after a given checkpoint.

Set `UNIDML_TEST_KILL=RANK:EPOCH:MARKER` (e.g. `1:1:/tmp/killed`): rank RANK kills itself at its
first optimizer step after the checkpoint of epoch EPOCH was written, unless the file MARKER exists
(it is created just before the kill, so a restarted group runs through). This exercises
`torchrun --max-restarts` recovery from the last checkpoint; nothing reads it in normal runs.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "UNIDML_TEST_KILL"


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
