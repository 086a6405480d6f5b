"""Weights & Biases, offline unless an API key is set; its files land in `RUN_DIR/wandb/`.

`log.wandb.mode: auto` is online when W&B has an API key (`WANDB_API_KEY`, or the one `wandb login`
keeps in ~/.netrc) and offline otherwise, so a run never stops to ask for a login; an offline run is
uploaded later with `wandb sync RUN_DIR/wandb/offline-run-*`. `WANDB_MODE`, when set, decides instead.
Per-step scalars are plotted against `step`, per-epoch values against `epoch` (`define_metric`); a
study's runs share its `group`.
"""
from __future__ import annotations

import logging
import netrc
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from unidml.engine.trackers.base import FINISHED, RunLabels

log = logging.getLogger(__name__)
STEP, EPOCH = "step", "epoch"


def has_api_key() -> bool:
    """Whether W&B can log in without asking: `WANDB_API_KEY`, or a ~/.netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """`log.wandb.mode` with `auto` decided: `WANDB_MODE` when set, else online with an API key, offline without."""
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")


class WandbTracker:
    """One W&B run; `run_id` given resumes it (`resume="allow"`)."""

    name = "wandb"

    def __init__(self, section: Any, run_dir: Path, labels: RunLabels, run_id: str | None = None) -> None:
        import wandb

        mode = resolve_mode(str(section.mode))
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.run = wandb.init(
            project=str(section.project), entity=str(section.entity) or None, dir=str(run_dir), mode=mode,
            name=labels.name or run_dir.name, group=labels.group or None, tags=list(labels.tags.values()) or None,
            id=run_id, resume="allow" if run_id else None, reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, save_code=False))
        self.run_id = self.run.id
        self._defined: set[str] = set()
        where = Path(self.run.dir).parent
        log.info("W&B run %s %s in %s%s", self.run_id, mode, where,
                 f" (upload: wandb sync {where})" if mode == "offline" else "")

    def _log(self, values: dict[str, float], axis: str, at: int) -> None:
        """Log `values` plotted against `axis` (= `at`): each tag prefix is tied to its axis once."""
        for tag in values:
            prefix = tag.split("/", 1)[0]
            if prefix not in self._defined:
                self._defined.add(prefix)
                self.run.define_metric(axis, hidden=True)
                self.run.define_metric(f"{prefix}/*", step_metric=axis)
        self.run.log({**values, axis: at})

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self._log(values, STEP, step)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        self._log(values, EPOCH, epoch)

    def log_summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def log_artifact(self, path: Path, folder: str = "") -> None:
        """A copy in the run's files folder, under `folder` (W&B uploads that folder when the run ends, or
        `wandb sync` does for an offline run)."""
        target = Path(self.run.dir) / folder / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)

    def finish(self, status: str) -> None:
        self.run.summary["outcome"] = status
        self.run.finish(exit_code=0 if status == FINISHED else 1)
