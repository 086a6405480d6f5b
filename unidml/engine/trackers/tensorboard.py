"""TensorBoard (`RUN_DIR/tb`): scalars under the same tags as ever, the config and the best epoch as text."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


class TensorBoardTracker:
    """A `SummaryWriter` on `run_dir/tb`; `writer` is also what the embedding projector writes to."""

    name = "tensorboard"
    run_id = None

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log_config(self, config: dict[str, Any]) -> None:
        self.writer.add_text("config", f"```\n{yaml.safe_dump(config, sort_keys=False)}```")

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self.log_scalars(epoch, values)
        self.writer.flush()

    def log_summary(self, values: dict[str, Any]) -> None:
        self.writer.add_text("best", f"```\n{json.dumps(values, indent=2)}\n```")

    def log_artifact(self, path: Path, folder: str = "") -> None:
        """Nothing to copy: TensorBoard reads its event files beside the run directory's own."""

    def finish(self, status: str) -> None:
        self.writer.close()
