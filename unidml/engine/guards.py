"""When a run must stop: too many consecutive skipped steps, or a model that is no longer finite.

Either way the last good checkpoint stays in place and `metrics.json` says why the run stopped.
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from unidml.engine.backends import StepOutcome
from unidml.engine.checkpoint import first_non_finite
from unidml.engine.run_record import RunRecord
from unidml.errors import UserError

log = logging.getLogger(__name__)


class RunGuard:
    """Counts skipped optimizer steps (`engine.max_skipped_steps` in a row stop the run) and checks
    the weights at each epoch end."""

    def __init__(self, max_skipped_steps: int, record: RunRecord, checkpoints: Path, skipped_total: int = 0) -> None:
        self.max_skipped_steps = max_skipped_steps
        self.record = record
        self.checkpoints = checkpoints
        self.skipped_total = skipped_total
        self.consecutive = 0

    def after_step(self, outcome: StepOutcome, epoch: int, step: int) -> None:
        """Count a step the backend did not apply (non-finite gradient); stop after too many in a row."""
        if outcome.applied:
            self.consecutive = 0
            return
        self.skipped_total += 1
        self.consecutive += 1
        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, self.consecutive)
        if self.consecutive >= self.max_skipped_steps:
            self._stop(f"engine.max_skipped_steps: {self.consecutive} consecutive non-finite steps at step {step}; "
                       f"stopping (last good checkpoint kept in {self.checkpoints})", epoch, step)

    def after_epoch(self, module: nn.Module, epoch: int, step: int) -> None:
        """Stop before evaluating or checkpointing a model whose weights or statistics are not finite."""
        bad = first_non_finite(module)
        if bad is not None:
            self._stop(f"train: the model diverged in epoch {epoch} (non-finite values in {bad}); stopping, last good "
                       f"checkpoint kept in {self.checkpoints} (lower train.lr or set train.grad_clip)", epoch, step)

    def _stop(self, message: str, epoch: int, step: int) -> None:
        self.record.stop("non_finite", message, epoch, step)
        raise UserError(message)
