"""The training loop: data -> embedding network -> loss -> optimizer step, evaluated per epoch.

The trainer only orchestrates, in torchtitan's shape: `Trainer.__init__` builds the parts from the
config (data, model, loss, backend, evaluator), `fit` runs epochs, `train_epoch` iterates the loader
and `train_step` does one micro-batch. The parts own their decisions: the backend (`engine.backend`)
how gradients become updates, the `StepMeter` timing and logged scalars, the `Evaluator` evaluation
and diagnostics, the `RunGuard` when a run must stop, the `RunRecord` what the run leaves behind.

Determinism: the torch RNG is reseeded at every epoch start from (seed, epoch, rank), the data
backends reseed their augmentations per epoch, and checkpoints are written at epoch ends, so a
resumed run repeats exactly what an uninterrupted run does (docs/cluster.md).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from unidml.config import check_runtime, to_yaml
from unidml.data_pipeline import build_dataset, build_train_loader
from unidml.engine.accumulation import check_groups, ends_group, group_size, steps_in_epoch
from unidml.engine.backends import build_backend
from unidml.engine.distributed import DistEnv, mean_over_ranks
from unidml.engine.embed_chunks import chunked_step, chunking_record
from unidml.engine.evaluator import Evaluator
from unidml.engine.guards import RunGuard
from unidml.engine.meter import StepMeter
from unidml.engine.optim import lr_scaling_line
from unidml.engine.profiling import device_memory_mib, step_profiler
from unidml.engine.run_dir import claim_run_dir
from unidml.engine.run_log import RunLog
from unidml.engine.run_record import RunRecord, query_counts, write_text_atomic
from unidml.engine.trackers import RunLabels
from unidml.engine.train_step import TrainStep
from unidml.errors import UserError
from unidml.evaluation.knn import announce_faiss
from unidml.losses import build_loss_from_config
from unidml.models import build_model
from unidml.runtime.determinism import configure_determinism
from unidml.runtime.memory_format import channels_last
from unidml.runtime.precision import precision_of, settle_precision, warn_if_emulated
from unidml.seeding import derived_seed, seed_everything

log = logging.getLogger(__name__)


class Trainer:
    """Builds a run from its config and trains it (one process, or one rank of a DDP group)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, env: DistEnv, labels: RunLabels | None = None) -> None:
        """`labels` name and group the run in its trackers (a study's trial); a plain run needs none."""
        check_runtime(cfg, env)
        self.run_log = RunLog(env.is_main)  # from here on, what the run logs also goes to RUN_DIR/train.log
        cfg = settle_precision(cfg)
        warn_if_emulated(precision_of(cfg), env.device)
        self.cfg, self.run_dir, self.env, self.labels = cfg, run_dir, env, labels
        self.device = env.device
        seed_everything(cfg.train.seed)
        configure_determinism(cfg.train.deterministic, self.device)
        self.dataset = build_dataset(cfg.data, seed=cfg.train.seed)
        train_set = self.dataset.train
        self.loader = build_train_loader(
            cfg.data, train_set, global_batch_size=cfg.train.batch_size, rank=env.rank,
            world_size=env.world_size, seed=cfg.train.seed, run_dir=run_dir, device=self.device)
        if len(self.loader) < cfg.train.grad_accum:
            raise UserError(f"train.batch_size: {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum} "
                            f"leaves no full step in an epoch of {len(train_set)} images")
        check_groups(len(self.loader), cfg.train.grad_accum, cfg.engine.backend)
        model = build_model(cfg.model, image_size=cfg.data.image_size)
        loss = build_loss_from_config(OmegaConf.to_container(cfg.loss, resolve=True), num_classes=train_set.num_classes,
                                      embedding_dim=model.embedding_dim, device=self.device)
        self.module = TrainStep(model, loss).to(self.device)
        self.layout = channels_last(cfg.engine.channels_last, self.device, cfg.engine.backend, model)
        if self.layout.weights:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.steps_per_epoch = steps_in_epoch(len(self.loader), cfg.train.grad_accum)
        self.backend = build_backend(self.module, cfg, env, self.steps_per_epoch * cfg.train.epochs)
        scaling = lr_scaling_line(cfg.train)
        if scaling and env.is_main:
            log.info(scaling)
        self.evaluator = Evaluator(cfg, self.dataset, env, train_set=train_set)
        if env.is_main:
            announce_faiss(self.device)
        self.record = RunRecord(run_dir, env.is_main, cfg.eval.split)
        self.record.embed_chunks = chunking_record(self.module.model, cfg.engine.embed_chunks, env.is_main)
        self.guard = RunGuard(cfg.engine.max_skipped_steps, self.record, run_dir / "checkpoints")
        self.epoch = 0
        self.step = 0

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
            "skipped_total": self.guard.skipped_total,
            "history": self.record.history,
        }

    def save(self, is_best: bool) -> None:
        """Checkpoint, then metrics.json: the record never lists an epoch that no checkpoint holds."""
        self.backend.save(self._state(), self.run_dir / "checkpoints", is_best)
        self.record.flush()

    def resume(self) -> None:
        """Continue from `train.resume` (auto | PATH); `never` starts afresh (`claim_run_dir` refused a
        directory that already holds a run)."""
        mode = self.cfg.train.resume
        if mode == "never":
            return
        found = self.backend.restore(self.run_dir / "checkpoints" if mode == "auto" else Path(mode))
        if found is None:
            if mode != "auto":
                raise UserError(f"train.resume: {mode}: no checkpoint there")
            return
        state, path = found
        self.loader.load_state_dict(state["loader"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.guard.skipped_total = state["skipped_total"]
        self.record.history = list(state["history"])
        if self.env.is_main:
            log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

    # ------------------------------------------------------------- evaluation
    def evaluate(self, extra: dict[str, float]) -> bool:
        """Evaluate every split pair; record it (with `extra`); return whether this epoch is the new best."""
        results = self.evaluator.evaluate(self.module.model)
        if self.env.is_main:
            split = self.evaluator.selection
            order = [split] + [name for name in results if name != split]
            summary = " | ".join(f"{name}: " + ", ".join(f"{k}={v:.2f}" for k, v in results[name].items()
                                                         if k.startswith("recall@")) for name in order)
            line = f"epoch {self.epoch} {summary} {query_counts(results[split])}"
            tqdm.write(line)
            self.run_log.note(line)
            diagnostics = self.evaluator.diagnostics(self.module.model, self.module.loss)
            self.record.epoch_scalars(self.epoch, diagnostics, "diagnostics")
            extra = {**extra, **diagnostics}
        return self.record.add_evaluation(self.epoch, self.step, results, extra)

    # --------------------------------------------------------------- training
    def fit(self) -> dict:
        """Train to `train.epochs`, evaluating before training and every `eval.every` epochs, with the
        run directory claimed (locked, checked not to hold another run) and the trackers open throughout."""
        with claim_run_dir(self.run_dir, str(self.cfg.train.resume), self.env.is_main), \
                self.run_log.writing_to(self.run_dir), self.record.tracking(self.cfg, self.labels):
            return self._fit()

    def _fit(self) -> dict:
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
                self.guard.after_epoch(self.module, epoch + 1, self.step)
                self.epoch = epoch + 1
                due = self.epoch % self.cfg.eval.every == 0 or self.epoch == self.cfg.train.epochs
                is_best = self.evaluate(epoch_means) if due else False
                self.save(is_best)
        if self.record.writer is not None:
            self.evaluator.projector(self.module.model, self.record.writer, self.epoch)
        self.record.close()
        return {"epochs": self.record.history, "best": self.record.best()}

    def train_epoch(self, epoch: int, profile_step: Callable[[], None] = lambda: None) -> dict[str, float]:
        """One pass over the loader; returns the epoch's mean training loss and loss terms."""
        cfg = self.cfg
        self.loader.set_epoch(epoch)
        torch.manual_seed(derived_seed(cfg.train.seed, epoch, self.env.rank))
        self.module.train()
        accum = cfg.train.grad_accum
        meter = StepMeter(self.steps_per_epoch, cfg.train.batch_size * accum, f"epoch {epoch + 1}/{cfg.train.epochs}",
                          self.env.is_main)
        num_micro = len(self.loader)
        for micro, (images, labels) in enumerate(meter.timed(self.loader)):
            ends_step = ends_group(micro, num_micro, accum)
            self.backend.set_group(group_size(micro, num_micro, accum))
            loss, grad_norm = self.train_step(images, labels, ends_step)
            meter.add({"train_loss": loss, **self._loss_terms()})
            if ends_step:
                profile_step()
            meter.done(stepped=ends_step)
            if ends_step and (self.step % cfg.train.log_every == 0 or micro + 1 == num_micro):
                self._log_step(meter, loss, grad_norm)
        meter.close()
        if meter.images:
            rates = meter.rates()
            self.record.throughput = {"images_per_s": rates["images_per_s"], "data_wait_pct": rates["data_wait_pct"],
                                      "skipped_steps": self.guard.skipped_total,
                                      "replaced_images": self.loader.bad_images}
        return mean_over_ranks(meter.means(len(self.loader)), self.env)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, ends_step: bool) -> tuple[torch.Tensor, float]:
        """Forward and backward of one micro-batch (chunked with `engine.embed_chunks`); when it ends an
        accumulation group, also the optimizer step. Returns (its loss, the step's gradient norm or NaN)."""
        if self.layout.inputs:
            images = images.contiguous(memory_format=torch.channels_last)
        chunks = self.cfg.engine.embed_chunks
        if chunks > 1:
            loss = chunked_step(self.backend, images, labels, chunks, sync_last=ends_step)
        else:
            with self.backend.sync(ends_step):
                loss = self.backend.forward(images, labels)
                self.backend.backward(loss)
            loss = loss.detach()
        if not ends_step:
            return loss, float("nan")
        outcome = self.backend.step()
        self.guard.after_step(outcome, self.epoch, self.step)
        self.step += 1
        return loss, outcome.grad_norm

    def _loss_terms(self) -> dict[str, torch.Tensor]:
        return getattr(self.module.loss, "terms", {})

    def _log_step(self, meter: StepMeter, loss: torch.Tensor, grad_norm: float) -> None:
        terms = self._loss_terms()
        read = torch.stack([loss.float(), *(v.float() for v in terms.values())]).tolist()  # one device read
        values = {
            "loss": read[0],
            **dict(zip(terms, read[1:])),
            "lr": self.backend.lr,
            **meter.rates(),
            "grad_norm": grad_norm,
            "loss_scale": self.backend.loss_scale,
            "skipped_steps": self.guard.skipped_total,
            **device_memory_mib(self.device),
        }
        self.record.scalars(self.step, values, "train")
        meter.show(values)
