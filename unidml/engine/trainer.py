"""The training loop: data -> embedding network -> loss -> optimizer step, evaluated per epoch.

A plain loop in the torchtitan spirit: everything it needs is built in `Trainer.__init__` from
the config, `fit` runs epochs, evaluates, checkpoints and records. The loss module (which owns
the CE classifier, proxies or centers) is wrapped together with the network in `TrainStep`, so
the backend (`engine.backend`: single | ddp | deepspeed, see `backends`) reduces, steps and
checkpoints its parameters too.

Determinism: the torch RNG is reseeded at every epoch start from (seed, epoch, rank), the data
backends reseed their augmentations per epoch, and checkpoints are written at epoch ends, so a
resumed run repeats exactly what an uninterrupted run does (docs/cluster.md).
"""
from __future__ import annotations

import itertools
import logging
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from unidml.config import to_yaml
from unidml.data_pipeline import build_dataset, build_eval_loader, build_train_loader
from unidml.engine.backends import build_backend
from unidml.engine.distributed import DistEnv, mean_over_ranks
from unidml.engine.embed_chunks import CachedGradients, chunked_step
from unidml.engine.faults import KillSwitch
from unidml.engine.model import build_model
from unidml.engine.profiling import device_memory_mib, step_profiler
from unidml.engine.run_record import RunRecord, write_text_atomic
from unidml.errors import UserError
from unidml.evaluation import evaluate_model, extract_embeddings
from unidml.evaluation.diagnostics import diagnostic_sample, mi_diagnostics
from unidml.kernels import build_loss_from_config
from unidml.seeding import derived_seed

log = logging.getLogger(__name__)


PROJECTOR_POINTS = 300  # eval embeddings in the TensorBoard projector snapshot


class TrainStep(nn.Module):
    """Embedding network and loss as one module: `forward(images, labels)` returns the loss.

    With `cached` (the replay pass of `engine.embed_chunks`) it returns instead the surrogate
    scalar whose gradient is the cached full-batch gradient.
    """

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None,
                cached: CachedGradients | None = None) -> torch.Tensor:
        embeddings = self.model(images)
        if cached is not None:
            return cached.surrogate(embeddings)
        return self.loss(embeddings, labels)


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
        if cfg.engine.channels_last and cfg.engine.backend != "deepspeed":
            # DeepSpeed flattens/broadcasts parameters as contiguous buffers: there only inputs go channels_last.
            self.module = self.module.to(memory_format=torch.channels_last)
        self.steps_per_epoch = len(self.loader) // cfg.train.grad_accum
        if cfg.engine.embed_chunks > cfg.train.batch_size // env.world_size:
            raise UserError(f"engine.embed_chunks={cfg.engine.embed_chunks} exceeds the per-rank batch "
                            f"({cfg.train.batch_size // env.world_size} images)")
        self.backend = build_backend(self.module, cfg, env, self.steps_per_epoch * cfg.train.epochs,
                                     self.steps_per_epoch)
        self.eval_loaders = self._eval_loaders()
        # MI diagnostics (issue 7): a fixed sample of whole training classes, embedded by rank 0 at each evaluation.
        self.diagnostic_sample = diagnostic_sample(train_set)
        self.diagnostic_loader = build_eval_loader(cfg.data, self.diagnostic_sample.images, batch_size=cfg.eval.batch_size,
                                                   rank=0, world_size=1, device=self.device)
        self.record = RunRecord(run_dir, env.is_main, cfg.eval.split)
        self.epoch = 0
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.kill_switch = KillSwitch.from_env(env.rank)

    # ----------------------------------------------------------------- set-up

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
        """The trainer's part of a checkpoint (the backend adds optimizer, schedule and scaler)."""
        return {
            "config": to_yaml(self.cfg),
            "model": self.module.model.state_dict(),
            "loss": self.module.loss.state_dict(),
            "loader": self.loader.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "skipped_total": self.skipped_total,
            "history": self.record.history,
        }

    def save(self, is_best: bool) -> None:
        self.backend.save(self._state(), self.run_dir / "checkpoints", is_best)

    def resume(self) -> None:
        """Continue from `train.resume` (auto | PATH); refuse to overwrite a run that was not asked to resume."""
        mode = self.cfg.train.resume
        directory = self.run_dir / "checkpoints"
        if mode == "never":
            if (directory / "last.pt").exists():
                raise UserError(f"{self.run_dir}: already holds a run; pass --out NEW_DIR or train.resume=auto")
            return
        found = self.backend.restore(directory if mode == "auto" else Path(mode))
        if found is None:
            if mode != "auto":
                raise UserError(f"train.resume: {mode}: no checkpoint there")
            return
        state, path = found
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
            diagnostics = mi_diagnostics(self.module.model, self.module.loss, self.diagnostic_loader,
                                         self.diagnostic_sample.class_prior, metric=self.cfg.eval.metric,
                                         device=self.device, precision=self.cfg.engine.precision)
            self.record.scalars(self.epoch, diagnostics, "diagnostics")
            extra = {**extra, **diagnostics}
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
        trace_dir = self.run_dir / "profile" if self.cfg.engine.profile and self.env.is_main else None
        with step_profiler(trace_dir, self.device) as profile_step:
            for epoch in range(self.epoch, self.cfg.train.epochs):
                epoch_means = self.train_epoch(epoch, profile_step)
                self.epoch = epoch + 1
                due = self.epoch % self.cfg.eval.every == 0 or self.epoch == self.cfg.train.epochs
                is_best = self.evaluate(epoch_means) if due else False
                self.save(is_best)
        self.embedding_snapshot()
        self.record.close()
        return {"epochs": self.record.history, "best": self.record.best()}

    def embedding_snapshot(self) -> None:
        """TensorBoard projector: up to PROJECTOR_POINTS embeddings (with labels) of rank 0's share of
        the selection split's queries, at the current epoch."""
        if self.record.writer is None:
            return
        loader = self.eval_loaders[self.cfg.eval.split][0]
        batches = -(-PROJECTOR_POINTS // self.cfg.eval.batch_size)
        found = extract_embeddings(self.module.model, itertools.islice(loader, batches), device=self.device,
                                   precision=self.cfg.engine.precision)
        vectors, labels = found.vectors[:PROJECTOR_POINTS], found.labels[:PROJECTOR_POINTS]
        self.record.writer.add_embedding(torch.as_tensor(vectors), metadata=[int(v) for v in labels],
                                         global_step=self.epoch, tag=f"{self.cfg.eval.split}_embeddings")

    def _optimizer_step(self) -> float:
        """Step through the backend; a step it did not apply (non-finite gradient) is counted, and
        `engine.max_skipped_steps` of them in a row stop the run (the last checkpoint stays intact)."""
        outcome = self.backend.step()
        if outcome.applied:
            self.consecutive_skips = 0
        else:
            self.skipped_total += 1
            self.consecutive_skips += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step, self.consecutive_skips)
            if self.consecutive_skips >= self.cfg.engine.max_skipped_steps:
                raise UserError(f"engine.max_skipped_steps: {self.consecutive_skips} consecutive non-finite steps at "
                                f"step {self.step}; stopping (last good checkpoint kept in {self.run_dir / 'checkpoints'})")
        self.step += 1
        return outcome.grad_norm

    def _micro_batch(self, images: torch.Tensor, labels: torch.Tensor, last_micro: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (chunked with `engine.embed_chunks`); returns its loss."""
        chunks = self.cfg.engine.embed_chunks
        if chunks > 1:
            return chunked_step(self.backend, images, labels, chunks, sync_last=last_micro)
        with self.backend.sync(last_micro):
            loss = self.backend.forward(images, labels)
            self.backend.backward(loss)
        return loss.detach()

    def train_epoch(self, epoch: int, profile_step: Callable[[], None] = lambda: None) -> dict[str, float]:
        """One pass over the loader; returns the epoch's mean training loss and loss terms."""
        cfg, env = self.cfg, self.env
        self.loader.set_epoch(epoch)
        torch.manual_seed(derived_seed(cfg.train.seed, epoch, env.rank))
        self.module.train()
        accum = cfg.train.grad_accum
        images_per_step = cfg.train.batch_size * accum  # global images per optimizer step
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not env.is_main, leave=False, dynamic_ncols=True)
        wait = busy = 0.0
        images_seen = 0
        sums: dict[str, torch.Tensor] = {}
        tick = time.perf_counter()
        for micro, (images, labels) in enumerate(self.loader):
            fetched = time.perf_counter()
            wait += fetched - tick
            if cfg.engine.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last_micro = (micro + 1) % accum == 0
            loss = self._micro_batch(images, labels, last_micro)
            for key, value in {"train_loss": loss, **getattr(self.module.loss, "terms", {})}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            if not last_micro:
                tick = time.perf_counter()
                busy += tick - fetched
                continue
            grad_norm = self._optimizer_step()
            profile_step()
            if self.kill_switch is not None:
                self.kill_switch.after_step(epoch)
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
        return mean_over_ranks({key: float(total) / len(self.loader) for key, total in sums.items()}, env)

    def _log_step(self, loss: torch.Tensor, grad_norm: float, images_seen: int, wait: float, busy: float, bar: tqdm) -> None:
        elapsed = wait + busy
        values = {
            "loss": float(loss.detach()),
            **{k: float(v) for k, v in getattr(self.module.loss, "terms", {}).items()},
            "lr": self.backend.lr,
            "images_per_s": images_seen / elapsed,
            "data_wait_pct": 100.0 * wait / elapsed,
            "step_time_ms": 1000.0 * elapsed / max(1, bar.n),
            "grad_norm": grad_norm,
            "loss_scale": self.backend.loss_scale,
            "skipped_steps": self.skipped_total,
            **device_memory_mib(self.device),
        }
        self.record.scalars(self.step, values, "train")
        bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{values['images_per_s']:.0f}")

