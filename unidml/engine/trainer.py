"""The training loop: data -> embedding network -> loss -> optimizer step, evaluated per epoch.

A plain loop in the torchtitan spirit: everything it needs is built in `Trainer.__init__` from
the config, `fit` runs epochs, evaluates, checkpoints and records. The loss module (which owns
the CE classifier, proxies or centers) is wrapped together with the network in `TrainStep`, so
DDP reduces its gradients and checkpoints carry it.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from unidml.config import to_yaml
from unidml.data_pipeline import build_dataset, build_eval_loader, build_train_loader
from unidml.engine import checkpoint
from unidml.engine.distributed import DistEnv, barrier
from unidml.engine.model import build_model
from unidml.engine.optim import build_optimizer, build_scheduler
from unidml.engine.precision import autocast, grad_scaler
from unidml.engine.run_record import RunRecord, write_text_atomic
from unidml.errors import UserError
from unidml.evaluation import evaluate_model
from unidml.kernels import build_loss_from_config

log = logging.getLogger(__name__)


class TrainStep(nn.Module):
    """Embedding network and loss as one module: `forward(images, labels)` returns the loss."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model(images), labels)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on `parts` (seed, epoch, rank): resumable, rank-distinct."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds a run from its config and trains it (one process, or one rank of a DDP group)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, env: DistEnv) -> None:
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        self.device = env.device
        seed_everything(cfg.train.seed)
        self.dataset = build_dataset(cfg.data, seed=cfg.train.seed)
        train_set = self.dataset.train
        self.loader = build_train_loader(
            cfg.data, train_set, global_batch_size=cfg.train.batch_size, rank=env.rank,
            world_size=env.world_size, seed=cfg.train.seed, run_dir=run_dir, device=self.device)
        if len(self.loader) < cfg.train.grad_accum:
            raise UserError(f"train.batch_size: {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum} "
                            f"leaves no full step in an epoch of {len(train_set)} images")
        model = build_model(cfg.model)
        loss = build_loss_from_config(OmegaConf.to_container(cfg.loss, resolve=True),
                                      num_classes=train_set.num_classes, embedding_dim=model.embedding_dim)
        self.module = TrainStep(model, loss).to(self.device)
        if cfg.engine.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.module, cfg.train)
        self.steps_per_epoch = len(self.loader) // cfg.train.grad_accum
        self.scheduler = build_scheduler(self.optimizer, cfg.train.warmup_iters, self.steps_per_epoch * cfg.train.epochs)
        self.scaler = grad_scaler(self.device, cfg.engine.precision)
        self.wrapped = self._wrap(self.module)
        self.eval_loaders = self._eval_loaders()
        self.record = RunRecord(run_dir, env.is_main, cfg.eval.split)
        self.epoch = 0
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0

    # ----------------------------------------------------------------- set-up
    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.env.distributed:
            return module
        if self.cfg.engine.sync_bn:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        device_ids = [self.env.local_rank] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, bucket_cap_mb=25,
                                                   gradient_as_bucket_view=True)

    def _eval_loaders(self) -> dict[str, tuple]:
        loaders = {}
        for name, (query, gallery) in self.dataset.eval_pairs.items():
            build = lambda split: build_eval_loader(  # noqa: E731  (same arguments for both sides)
                self.cfg.data, self.dataset.splits[split], batch_size=self.cfg.eval.batch_size,
                rank=self.env.rank, world_size=self.env.world_size, device=self.device)
            loaders[name] = (build(query), build(gallery) if gallery else None)
        if self.cfg.eval.split not in loaders:
            raise UserError(f"eval.split: '{self.cfg.eval.split}' is not evaluated for this dataset "
                            f"(available: {', '.join(loaders)}; 'val' needs data.val_classes > 0)")
        return loaders

    # ------------------------------------------------------------- checkpoint
    def _state(self) -> dict:
        return {
            "config": to_yaml(self.cfg),
            "model": self.module.model.state_dict(),
            "loss": self.module.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loader": self.loader.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "skipped_total": self.skipped_total,
            "history": self.record.history,
        }

    def save(self, is_best: bool) -> None:
        if self.env.is_main:
            directory = self.run_dir / "checkpoints"
            state = self._state()
            checkpoint.save_rotating(state, directory)
            if is_best:
                checkpoint.save_atomic(state, directory / "best.pt")
        barrier(self.env)

    def resume(self) -> None:
        """Continue from `train.resume` (auto | PATH); refuse to overwrite a run that was not asked to resume."""
        mode = self.cfg.train.resume
        directory = self.run_dir / "checkpoints"
        if mode == "never":
            if (directory / "last.pt").exists():
                raise UserError(f"{self.run_dir}: already holds a run; pass --out NEW_DIR or train.resume=auto")
            return
        if mode == "auto":
            found = checkpoint.load_latest(directory)
            if found is None:
                return
            state, path = found
        else:
            state, path = checkpoint.load(mode), Path(mode)
        self.module.model.load_state_dict(state["model"])
        self.module.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.skipped_total = state["skipped_total"]
        self.record.history = list(state["history"])
        if self.env.is_main:
            log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

    # ------------------------------------------------------------- evaluation
    def evaluate(self, extra: dict[str, float]) -> bool:
        """Evaluate every split pair; record it (with `extra`); return whether this epoch is the new best."""
        results = {}
        for name, (query_loader, gallery_loader) in self.eval_loaders.items():
            results[name] = evaluate_model(
                self.module.model, query_loader, gallery_loader, ks=list(self.cfg.eval.ks),
                metrics=list(self.cfg.eval.metrics), metric=self.cfg.eval.metric,
                memory_budget_mb=self.cfg.eval.memory_budget_mb, device=self.device,
                precision=self.cfg.engine.precision)
        if self.env.is_main:
            summary = ", ".join(f"{k}={v:.2f}" for k, v in results[self.cfg.eval.split].items() if k.startswith("recall@"))
            tqdm.write(f"epoch {self.epoch} {self.cfg.eval.split}: {summary}")
        return self.record.add_evaluation(self.epoch, self.step, results, extra)

    # --------------------------------------------------------------- training
    def fit(self) -> dict:
        """Train to `train.epochs`, evaluating before training and every `eval.every` epochs."""
        self.resume()
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(to_yaml(self.cfg), self.run_dir / "config.yaml")
        if not any(entry["epoch"] == self.epoch for entry in self.record.history):
            self.save(is_best=self.evaluate({}))
        for epoch in range(self.epoch, self.cfg.train.epochs):
            train_loss = self.train_epoch(epoch)
            self.epoch = epoch + 1
            due = self.epoch % self.cfg.eval.every == 0 or self.epoch == self.cfg.train.epochs
            is_best = self.evaluate({"train_loss": train_loss}) if due else False
            self.save(is_best)
        self.record.close()
        return {"epochs": self.record.history, "best": self.record.best()}

    def _optimizer_step(self) -> float:
        """Unscale, clip, and step unless a gradient is non-finite (then skip and count)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = float(nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
        if math.isfinite(grad_norm):
            self.scaler.step(self.optimizer)
            self.consecutive_skips = 0
        else:
            self.skipped_total += 1
            self.consecutive_skips += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step, self.consecutive_skips)
            if self.consecutive_skips >= self.cfg.engine.max_skipped_steps:
                raise UserError(f"engine.max_skipped_steps: {self.consecutive_skips} consecutive non-finite steps at "
                                f"step {self.step}; stopping (last good checkpoint kept in {self.run_dir / 'checkpoints'})")
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return grad_norm

    def train_epoch(self, epoch: int) -> float:
        """One pass over the loader; returns the epoch's mean training loss."""
        cfg, env = self.cfg, self.env
        self.loader.set_epoch(epoch)
        torch.manual_seed(derived_seed(cfg.train.seed, epoch, env.rank))
        self.wrapped.train()
        accum = cfg.train.grad_accum
        images_per_step = cfg.train.batch_size * accum  # global images per optimizer step
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not env.is_main, leave=False, dynamic_ncols=True)
        wait = busy = 0.0
        images_seen = 0
        loss_sum = torch.zeros((), device=self.device)
        tick = time.perf_counter()
        for micro, (images, labels) in enumerate(self.loader):
            fetched = time.perf_counter()
            wait += fetched - tick
            if cfg.engine.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last_micro = (micro + 1) % accum == 0
            sync = self.wrapped.no_sync() if env.distributed and not last_micro else contextlib.nullcontext()
            with sync:
                with autocast(self.device, cfg.engine.precision):
                    loss = self.wrapped(images, labels)
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float()
            if not last_micro:
                tick = time.perf_counter()
                busy += tick - fetched
                continue
            grad_norm = self._optimizer_step()
            tick = time.perf_counter()
            busy += tick - fetched
            images_seen += images_per_step
            bar.update(1)
            if self.step % cfg.train.log_every == 0 or micro + 1 == len(self.loader):
                self._log_step(loss, grad_norm, images_seen, wait, busy, bar)
        bar.close()
        if images_seen:
            self.record.throughput = {"images_per_s": images_seen / (wait + busy),
                                      "data_wait_pct": 100.0 * wait / (wait + busy),
                                      "skipped_steps": self.skipped_total}
        return float(loss_sum) / len(self.loader)

    def _log_step(self, loss: torch.Tensor, grad_norm: float, images_seen: int, wait: float, busy: float, bar: tqdm) -> None:
        elapsed = wait + busy
        values = {
            "loss": float(loss.detach()),
            **{k: float(v) for k, v in getattr(self.module.loss, "terms", {}).items()},
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": images_seen / elapsed,
            "data_wait_pct": 100.0 * wait / elapsed,
            "step_time_ms": 1000.0 * elapsed / max(1, bar.n),
            "grad_norm": grad_norm,
            "loss_scale": self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
            "skipped_steps": self.skipped_total,
        }
        self.record.scalars(self.step, values, "train")
        bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{values['images_per_s']:.0f}")

