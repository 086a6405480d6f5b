"""engine.backend=deepspeed: ZeRO stage 0/1/2 around the whole `TrainStep` (network + loss parameters).

The DeepSpeed JSON (`--deepspeed FILE` / `engine.deepspeed_config`) says how to shard (ZeRO stage,
buckets); the run config says what to train: batch sizes, accumulation, clipping and precision are
filled in from `train.*` / `engine.precision` (a JSON value that contradicts them is refused).
Precision: `engine.precision=bf16` uses DeepSpeed's `torch_autocast` (fp32 master weights, bf16
compute: the same numerics as the single/DDP engine); a JSON with `"bf16": {"enabled": true}`
opts into DeepSpeed's native bf16 weights instead; fp16 uses DeepSpeed's native fp16 with dynamic
loss scaling (its overflow steps are skipped and counted). Checkpoints use DeepSpeed's own
`save_checkpoint` / `load_checkpoint` (one tag per epoch under `checkpoints/deepspeed/`, the two
newest kept); rank 0 also writes the weights-only `last.pt` / `best.pt` that `unidml eval` reads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from unidml.engine import checkpoint
from unidml.engine.backends.base import StepOutcome
from unidml.engine.distributed import DistEnv
from unidml.engine.optim import build_optimizer, build_scheduler
from unidml.errors import UserError
from unidml.runtime.collectives import backend_for, barrier, process_group_active
from unidml.runtime.precision import precision_of

log = logging.getLogger(__name__)
KEEP_TAGS = 2
TAG_PREFIX = "epoch"


def _read_json(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: DeepSpeed config not found")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON (line {exc.lineno}): {exc.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be an object")
    return data


def _fill(data: dict[str, Any], key: str, value: Any, source: str, origin: str) -> None:
    """Set `key` from the run config; a JSON value other than "auto" must agree with it."""
    given = data.get(key, "auto")
    if given != "auto" and given != value:
        raise UserError(f"{source}: '{key}' is {given} but the run config gives {value} ({origin}); "
                        f"remove it or set it to \"auto\"")
    data[key] = value


def deepspeed_config(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for this run: the JSON file completed from the run config."""
    source = cfg.engine.deepspeed_config
    data = _read_json(source)
    micro = cfg.train.batch_size // world_size
    accum = cfg.train.grad_accum
    _fill(data, "train_micro_batch_size_per_gpu", micro, source, "train.batch_size / world size")
    _fill(data, "gradient_accumulation_steps", accum, source, "train.grad_accum")
    _fill(data, "train_batch_size", micro * accum * world_size, source, "train.batch_size x train.grad_accum")
    _fill(data, "gradient_clipping", float(cfg.train.grad_clip), source, "train.grad_clip")
    native = [name for name in ("bf16", "fp16") if data.get(name, {}).get("enabled", False) is True]
    precision = precision_of(cfg).name
    if native and native != [precision]:
        raise UserError(f"{source}: enables DeepSpeed {'/'.join(native)} but engine.precision={precision}")
    if precision == "bf16" and not native:
        data.setdefault("torch_autocast", {"enabled": True, "dtype": "bfloat16"})
    elif precision == "fp16" and not native:
        data["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    stage = data.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise UserError(f"{source}: zero_optimization.stage={stage}; unidml supports ZeRO stages 0, 1 and 2")
    data.setdefault("zero_allow_untested_optimizer", True)  # the recipe's SGD is not on DeepSpeed's list
    data.setdefault("steps_per_print", 10**9)
    return data


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DeepSpeedBackend:
    """A `TrainBackend` over a DeepSpeed engine (not chunkable: `config.validate` refuses embed_chunks > 1)."""

    def __init__(self, module: nn.Module, cfg: DictConfig, env: DistEnv, total_steps: int) -> None:
        import deepspeed

        if not process_group_active():  # a one-process DeepSpeed run still needs a process group
            dist.init_process_group(backend_for(env.device), init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1)
        for key, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
            os.environ.setdefault(key, str(value))  # DeepSpeed reads them even when the group exists
        self.env = env
        self.config = deepspeed_config(cfg, env.world_size)
        self.module = module
        optimizer = build_optimizer(module, cfg.train)
        schedule = lambda opt: build_scheduler(opt, cfg.train.warmup_iters, total_steps)  # noqa: E731
        # DeepSpeed would take LOCAL_RANK as the device index: give it the index unidml chose
        # (runtime.device.cuda_index: 0 where each process sees only its own GPU).
        args = argparse.Namespace(device_rank=env.device.index) if env.device.type == "cuda" else None
        self.engine, _, _, _ = deepspeed.initialize(args=args, model=module, optimizer=optimizer,
                                                    lr_scheduler=schedule, config=self.config,
                                                    dist_init_required=False)
        if cfg.engine.compile:
            self.engine.compile()
        self.native_dtype = next(self.engine.module.parameters()).dtype

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Loss of one micro-batch (DeepSpeed applies its own autocast; native bf16/fp16 weights get
        inputs of their dtype)."""
        return self.engine(images.to(self.native_dtype), labels)

    def set_group(self, micro_batches: int) -> None:
        """Nothing to set: DeepSpeed divides by its gradient_accumulation_steps, and the trainer refuses
        an epoch whose micro-batches leave a shorter group."""

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed reduces at its accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; between accumulation boundaries DeepSpeed's `step` only counts."""
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> StepOutcome:
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        return StepOutcome(grad_norm, self.engine.skipped_steps == skipped_before)

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def loss_scale(self) -> float:
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0)) if self.engine.fp16_enabled() else 1.0

    # ------------------------------------------------------------- checkpoints
    def save(self, state: dict[str, Any], directory: Path, is_best: bool) -> None:
        """Every rank saves its DeepSpeed shard for this epoch's tag; rank 0 adds the weights-only
        unidml files and drops tags older than the newest `KEEP_TAGS`."""
        ds_dir = directory / "deepspeed"
        tag = f"{TAG_PREFIX}{state['epoch']:04d}"
        client = {k: v for k, v in state.items() if k not in ("model", "loss")}
        self.engine.save_checkpoint(str(ds_dir), tag=tag, client_state=client)
        barrier()
        if self.env.is_main:
            checkpoint.save_epoch(state, directory, is_best)
            for old in _tags(ds_dir)[:-KEEP_TAGS]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()

    def restore(self, source: Path) -> tuple[dict[str, Any], Path] | None:
        """Load the newest loadable tag under `source/deepspeed` (or the tag directory `source`);
        a tag that fails to load is reported and the previous one is tried."""
        if (source / "mp_rank_00_model_states.pt").exists():
            candidates = [source]
        else:
            candidates = list(reversed(_tags(source / "deepspeed")))
        errors = []
        for tag_dir in candidates:
            try:
                path, client = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            except Exception as exc:  # DeepSpeed raises assorted types for unreadable shards
                detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                errors.append(f"{tag_dir}: {detail}")
                log.warning("%s; trying the previous DeepSpeed checkpoint", errors[-1])
                continue
            if path is None:
                errors.append(f"{tag_dir}: not loadable")
                continue
            return client, tag_dir
        if errors:
            raise checkpoint.CheckpointError(f"{source}: no usable DeepSpeed checkpoint ({'; '.join(errors)})")
        return None


def _tags(ds_dir: Path) -> list[Path]:
    """Saved epoch tags, oldest first."""
    if not ds_dir.is_dir():
        return []
    return sorted(p for p in ds_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
