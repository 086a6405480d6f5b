"""What the trainer calls: `build_dataset`, `build_train_loader`, `build_eval_loader`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from unidml.config.rules import per_rank_batch
from unidml.data_pipeline.dataset import DatasetDescription, ImageSet
from unidml.data_pipeline.images import BadImageLog
from unidml.data_pipeline.loaders import EvalLoader, TrainLoader, shard_bounds
from unidml.data_pipeline.readers import read_dataset
from unidml.data_pipeline.samplers import build_sampler
from unidml.data_pipeline.splits import carve_validation
from unidml.data_pipeline.transforms import Recipe
from unidml.errors import UserError
from unidml.extras import announce_fallback, installed, require
from unidml.registry import DATA_BACKENDS, DATASETS
from unidml.seeding import derived_seed

log = logging.getLogger(__name__)


def build_dataset(data_cfg: Any, seed: int = 0) -> DatasetDescription:
    """Read `data.dataset` under `data.root` (generating the synthetic set first if absent or stale) and carve
    the optional class-disjoint validation split (`data.val_classes`, chosen by `seed`). What was derived
    (a missing test split, the validation split) is logged, one line each."""
    root = str(data_cfg.root or "")
    reader = DATASETS.get(str(data_cfg.dataset), None)  # an unknown name is refused by read_dataset below
    generator = reader.generator if reader is not None else None
    if generator and root:  # returns at once when `root` already holds these parameters
        from unidml.data_pipeline.synthetic import generate_dataset, read_marker

        path = Path(root)
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


@dataclass(frozen=True)
class DataBackend:
    """A registered `data.backend`: its factory and the optional package it needs (None: always there)."""

    build: Callable[..., Any]
    package: str | None = None


def _dali(data_cfg: Any, images: ImageSet, labels, recipe: Recipe, *, train: bool, batch_size: int,
          device: torch.device, seed: int):
    from unidml.data_pipeline.dali_backend import DaliBackend

    return DaliBackend(images.paths, labels, recipe, train=train, batch_size=batch_size,
                       num_threads=max(1, int(data_cfg.num_workers)), device=device, seed=seed,
                       max_pixels=int(data_cfg.max_pixels))


def _torchvision(data_cfg: Any, images: ImageSet, labels, recipe: Recipe, *, train: bool, batch_size: int,
                 device: torch.device, seed: int):
    from unidml.data_pipeline.torchvision_backend import TorchvisionBackend
    from unidml.data_pipeline.transforms import torchvision_transform

    return TorchvisionBackend(images.paths, labels, torchvision_transform(recipe, train),
                              num_workers=int(data_cfg.num_workers), device=device, seed=seed,
                              decode_device=device if device.type == "cuda" else None, substitute=train,
                              max_pixels=int(data_cfg.max_pixels))


# In order of preference for `data.backend=auto`: the first whose package is installed (DALI is faster on
# CPU too, see docs/benchmarks.md); the last needs nothing optional.
DATA_BACKENDS.add("dali", DataBackend(_dali, package="nvidia.dali"))
DATA_BACKENDS.add("torchvision", DataBackend(_torchvision))


def resolve_backend(name: str) -> str:
    """`auto` → the first registered backend whose package is installed (a fallback is said once); an
    explicit choice is checked."""
    if name != "auto":
        backend = DATA_BACKENDS.get(name, None)
        if backend is None:
            raise UserError(f"data.backend: '{name}' is not one of auto, {', '.join(DATA_BACKENDS.names())}")
        if backend.package:
            require(backend.package, f"data.backend={name}")
        return name
    usable = [n for n, b in DATA_BACKENDS.items() if b.package is None or installed(b.package)]
    for skipped, backend in DATA_BACKENDS.items():
        if skipped == usable[0]:
            break
        announce_fallback(backend.package, f"the {usable[0]} loader")
    return usable[0]


def _backend(data_cfg: Any, images: ImageSet, labels, *, train: bool, batch_size: int, device: torch.device,
             seed: int):
    backend = DATA_BACKENDS[resolve_backend(str(data_cfg.backend))]
    return backend.build(data_cfg, images, labels, Recipe.from_config(data_cfg), train=train,
                         batch_size=batch_size, device=device, seed=seed)


def _bad_log(data_cfg: Any, run_dir: Path | None, rank: int) -> BadImageLog:
    filename = "bad_images.txt" if rank == 0 else f"bad_images.rank{rank}.txt"
    return BadImageLog(str(data_cfg.on_error), run_dir, filename)


def build_train_loader(data_cfg: Any, imageset: ImageSet, *, global_batch_size: int, rank: int, world_size: int,
                       seed: int, run_dir: Path | None, device: torch.device) -> TrainLoader:
    """Per-rank training loader (batch = global_batch_size // world_size, contiguous labels)."""
    batch_size = per_rank_batch(global_batch_size, world_size)
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
