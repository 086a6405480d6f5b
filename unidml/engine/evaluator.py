"""The evaluation side of a run, shared by `unidml train`, `unidml eval` and `unidml search`.

An `Evaluator` owns the loaders of the evaluated split pairs (each rank its shard), the check that
the requested split exists, the mutual-information diagnostics on a fixed sample of training
classes, and the TensorBoard projector snapshot. The retrieval itself is `unidml.evaluation`;
`embed_images` serves a single process without a dataset (`unidml search --gallery DIR`).
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from unidml.data_pipeline import build_eval_loader
from unidml.data_pipeline.dataset import DatasetDescription, ImageSet
from unidml.engine.distributed import DistEnv
from unidml.errors import UserError
from unidml.evaluation import evaluate_model, extract_embeddings
from unidml.evaluation.diagnostics import diagnostic_sample, mi_diagnostics
from unidml.evaluation.evaluate import Embeddings
from unidml.evaluation.rerank import rerank_settings
from unidml.runtime.precision import precision_of

PROJECTOR_POINTS = 300  # eval embeddings in the TensorBoard projector snapshot


def eval_pair(dataset: DatasetDescription, split: str, option: str = "eval.split") -> tuple[str, str | None]:
    """(query split, gallery split or None for self-retrieval) of evaluation pair `split`; a split the
    dataset does not evaluate is a one-line error naming `option` (the key or flag that asked for it)."""
    if split not in dataset.eval_pairs:
        raise UserError(f"{option}: '{split}' is not evaluated for dataset '{dataset.name}' "
                        f"(available: {', '.join(dataset.eval_pairs)}; 'val' needs data.val_classes > 0)")
    return dataset.eval_pairs[split]


def check_split_sizes(dataset: DatasetDescription, query: str, gallery: str | None) -> None:
    """One line, before any work, when an evaluation split is too small to rank anything: a
    self-retrieval split needs two images, a query/gallery pair one of each."""
    for name, needed in ((query, 2 if gallery is None else 1), (gallery, 1)):
        if name is not None and len(dataset.splits[name]) < needed:
            raise UserError(f"{dataset.root}: split '{name}' has {len(dataset.splits[name])} images; evaluating it "
                            f"needs at least {needed}")


def eval_loader(cfg: DictConfig, images: ImageSet, device: torch.device, rank: int = 0, world_size: int = 1) -> Any:
    """A loader of `images` with the run's test transform: this rank's shard of `world_size` shards."""
    return build_eval_loader(cfg.data, images, batch_size=int(cfg.eval.batch_size), rank=rank, world_size=world_size,
                             device=device)


def embed_images(cfg: DictConfig, model: nn.Module, images: ImageSet, device: torch.device, *,
                 normalize: bool) -> Embeddings:
    """Embeddings of all of `images` in this process, through the run's test transform and precision."""
    return extract_embeddings(model, eval_loader(cfg, images, device), device=device, precision=precision_of(cfg),
                              normalize=normalize)


class Evaluator:
    """Retrieval metrics of a model on a dataset's evaluation pairs, with this run's eval settings.

    `split=None` evaluates every pair of the dataset (training: `eval.split` selects the best epoch),
    a name evaluates only that pair (`unidml eval --split`). With `train_set`, rank 0 also computes the
    MI diagnostics at each evaluation.
    """

    def __init__(self, cfg: DictConfig, dataset: DatasetDescription, env: DistEnv, *, split: str | None = None,
                 option: str = "eval.split", train_set: ImageSet | None = None) -> None:
        self.cfg, self.dataset, self.env = cfg, dataset, env
        self.precision = precision_of(cfg)
        self.selection = split or str(cfg.eval.split)
        self.pairs = {name: eval_pair(dataset, name, option) for name in ([split] if split else dataset.eval_pairs)}
        eval_pair(dataset, self.selection, option)
        for query, gallery in self.pairs.values():
            check_split_sizes(dataset, query, gallery)
        self.loaders = {name: (self.loader(dataset.splits[query]),
                               self.loader(dataset.splits[gallery]) if gallery else None)
                        for name, (query, gallery) in self.pairs.items()}
        self.diagnostic_sample = diagnostic_sample(train_set) if train_set is not None else None
        self.diagnostic_loader = (self.loader(self.diagnostic_sample.images, sharded=False)
                                  if self.diagnostic_sample is not None else None)

    def loader(self, images: ImageSet, *, sharded: bool = True) -> Any:
        """An eval loader over `images` (this rank's shard, or all of them when not `sharded`)."""
        rank, world = (self.env.rank, self.env.world_size) if sharded else (0, 1)
        return eval_loader(self.cfg, images, self.env.device, rank, world)

    def _names(self, pair: str) -> tuple[str, str]:
        """How the one-line evaluation errors name the query and gallery splits of `pair`."""
        query, gallery = self.pairs[pair]
        return f"split '{query}'", f"split '{gallery or query}'"

    def evaluate(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Metrics of every evaluated pair (the same dict on every rank); unreadable images are left
        out of queries and gallery and counted (`unreadable_images`). An eval.* setting the retrieval
        cannot use is one line."""
        eval_cfg = self.cfg.eval
        rerank = rerank_settings(eval_cfg.rerank)
        try:
            return {name: evaluate_model(model, query, gallery, ks=list(eval_cfg.ks), metrics=list(eval_cfg.metrics),
                                         metric=str(eval_cfg.metric), memory_budget_mb=float(eval_cfg.memory_budget_mb),
                                         device=self.env.device, precision=self.precision,
                                         names=self._names(name), rerank=rerank)
                    for name, (query, gallery) in self.loaders.items()}
        except ValueError as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"evaluation: {exc}") from None

    def unreadable(self) -> list[str]:
        """Paths of the images the last evaluation left out as unreadable (every rank's shard)."""
        from unidml.runtime.collectives import process_group_active

        mine = sorted({path for pair in self.loaders.values() for loader in pair if loader is not None
                       for path in loader.unreadable.values()})
        if not process_group_active():
            return mine
        parts: list[list[str]] = [[] for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(parts, mine)
        return sorted({path for part in parts for path in part})

    def diagnostics(self, model: nn.Module, loss: nn.Module) -> dict[str, float]:
        """MI diagnostics of the embeddings of the training sample (call on rank 0 only)."""
        if self.diagnostic_sample is None:
            return {}
        return mi_diagnostics(model, loss, self.diagnostic_loader, self.diagnostic_sample.class_prior,
                              metric=str(self.cfg.eval.metric),
                              device=self.env.device, precision=self.precision)

    def projector(self, model: nn.Module, writer: Any, epoch: int) -> None:
        """TensorBoard projector: up to PROJECTOR_POINTS embeddings (with labels) of this rank's share of
        the selection split's queries."""
        loader = self.loaders[self.selection][0]
        batches = -(-PROJECTOR_POINTS // int(self.cfg.eval.batch_size))
        found = extract_embeddings(model, itertools.islice(loader, batches), device=self.env.device,
                                   precision=self.precision)
        vectors, labels = found.vectors[:PROJECTOR_POINTS], found.labels[:PROJECTOR_POINTS]
        writer.add_embedding(torch.as_tensor(vectors), metadata=[int(v) for v in labels], global_step=epoch,
                             tag=f"{self.selection}_embeddings")
