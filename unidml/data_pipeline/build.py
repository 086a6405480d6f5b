"""What the trainer calls: `build_dataset`, `build_train_loader`, `build_eval_loader`."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from unidml.data_pipeline.dataset import DatasetDescription, ImageSet
from unidml.data_pipeline.images import BadImageLog
from unidml.data_pipeline.loaders import EvalLoader, TrainLoader, shard_bounds
from unidml.data_pipeline.readers import read_dataset
from unidml.data_pipeline.samplers import build_sampler
from unidml.data_pipeline.splits import carve_validation
from unidml.data_pipeline.transforms import Recipe
from unidml.errors import UserError
from unidml.extras import announce_fallback, installed, require
from unidml.seeding import derived_seed

log = logging.getLogger(__name__)
# `data.dataset` values generated into `data.root` from `data.synthetic`, and the module generating each
GENERATED = {"synthetic": "unidml.data_pipeline.synthetic", "glyphs": "unidml.data_pipeline.glyphs"}


def build_dataset(data_cfg: Any, seed: int = 0) -> DatasetDescription:
    """Read `data.dataset` under `data.root` (generating the synthetic set first if absent or stale) and carve
    the optional class-disjoint validation split (`data.val_classes`, chosen by `seed`). What was derived
    (a missing test split, the validation split) is logged, one line each."""
    root = str(data_cfg.root or "")
    if data_cfg.dataset in GENERATED and root:  # returns at once when `root` already holds these parameters
        from unidml.data_pipeline.synthetic import generate_dataset, read_marker

        path, generator = Path(root), GENERATED[data_cfg.dataset]
        if path.is_dir() and any(path.iterdir()) and read_marker(path, generator) is None:
            raise UserError(f"data.root {root}: holds files but no {data_cfg.dataset} dataset (no synthetic.json of "
                            f"that generator); point data.root at a new folder, or set data.dataset for the "
                            f"format it holds")

        s = data_cfg.synthetic
        generate_dataset(path, classes=int(s.classes), per_class=int(s.per_class), size=int(s.size),
                         seed=int(s.seed), test_fraction=float(s.test_fraction), generator=generator)
    dataset = read_dataset(str(data_cfg.dataset), root, str(data_cfg.list_file or ""))
    dataset = carve_validation(dataset, float(data_cfg.val_classes), seed)
    for note in dataset.notes:
        log.info("data: %s", note)
    return dataset


def resolve_backend(name: str) -> str:
    """`auto` → DALI when it is installed (faster on CPU too, see docs/benchmarks.md), else torchvision
    (said once); an explicit choice is checked."""
    if name not in ("auto", "dali", "torchvision"):
        raise UserError(f"data.backend: '{name}' is not one of auto, dali, torchvision")
    if name == "dali":
        require("nvidia.dali", "data.backend=dali")
    if name != "auto":
        return name
    if installed("nvidia.dali"):
        return "dali"
    announce_fallback("nvidia.dali", "the torchvision loader")
    return "torchvision"


def _backend(data_cfg: Any, images: ImageSet, labels, *, train: bool, batch_size: int, device: torch.device,
             seed: int):
    recipe = Recipe.from_config(data_cfg)
    workers = int(data_cfg.num_workers)
    if resolve_backend(str(data_cfg.backend)) == "dali":
        from unidml.data_pipeline.dali_backend import DaliBackend

        return DaliBackend(images.paths, labels, recipe, train=train, batch_size=batch_size,
                           num_threads=max(1, workers), device=device, seed=seed,
                           max_pixels=int(data_cfg.max_pixels))
    from unidml.data_pipeline.torchvision_backend import TorchvisionBackend
    from unidml.data_pipeline.transforms import torchvision_transform

    return TorchvisionBackend(images.paths, labels, torchvision_transform(recipe, train), num_workers=workers,
                              device=device, seed=seed, decode_device=device if device.type == "cuda" else None,
                              substitute=train, max_pixels=int(data_cfg.max_pixels))


def _bad_log(data_cfg: Any, run_dir: Path | None, rank: int) -> BadImageLog:
    filename = "bad_images.txt" if rank == 0 else f"bad_images.rank{rank}.txt"
    return BadImageLog(str(data_cfg.on_error), run_dir, filename)


def build_train_loader(data_cfg: Any, imageset: ImageSet, *, global_batch_size: int, rank: int, world_size: int,
                       seed: int, run_dir: Path | None, device: torch.device) -> TrainLoader:
    """Per-rank training loader (batch = global_batch_size // world_size, contiguous labels)."""
    if global_batch_size % world_size:
        raise UserError(f"train.batch_size={global_batch_size} is not divisible by the world size {world_size}")
    batch_size = global_batch_size // world_size
    labels = imageset.contiguous_labels()
    sampler = build_sampler(str(data_cfg.sampler), labels, batch_size=batch_size, rank=rank,
                            world_size=world_size, seed=seed, m_per_class=int(data_cfg.m_per_class))
    backend = _backend(data_cfg, imageset, labels, train=True, batch_size=batch_size, device=device,
                       seed=derived_seed(seed, rank))
    return TrainLoader(sampler, backend, _bad_log(data_cfg, run_dir, rank))


def build_eval_loader(data_cfg: Any, imageset: ImageSet, *, batch_size: int, rank: int, world_size: int,
                      device: torch.device, run_dir: Path | None = None) -> EvalLoader:
    """This rank's contiguous shard of `imageset` with the test transform: (images, labels, indices)."""
    start, end = shard_bounds(len(imageset), rank, world_size)
    backend = _backend(data_cfg, imageset, imageset.labels, train=False, batch_size=batch_size, device=device,
                       seed=derived_seed(rank))
    return EvalLoader(backend, start, end, batch_size, _bad_log(data_cfg, run_dir, rank))
