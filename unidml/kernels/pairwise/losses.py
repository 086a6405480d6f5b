"""Pairwise losses as modules: contrastive, triplet, multi-similarity, SNCA, SupCon."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from unidml.kernels.base import DecomposedLoss
from unidml.kernels.distributed import all_reduce_sum, cross_rank_active, gather_references, world_size
from unidml.kernels.pairwise.dispatch import BACKENDS, pairwise_rows, resolve_backend
from unidml.kernels.pairwise.geometry import METRICS
from unidml.kernels.pairwise.rows import ContrastiveRows, MultiSimilarityRows, SoftNeighbourRows, TripletRows
from unidml.kernels.registry import register_loss


def _choice(value: str, known: tuple[str, ...], what: str) -> str:
    if value not in known:
        raise ValueError(f"unknown {what} '{value}' (known: {', '.join(known)})")
    return value


class PairwiseLoss(DecomposedLoss):
    """Shell shared by the pairwise losses: normalisation, references, backend, cross-rank.

    The row program `self.spec` gives per-anchor sums and counts; the loss is
    world · (T / N_t + C / N_c) with the counts summed over ranks (world = 1 off cross-rank).
    """

    def __init__(self, spec, normalize: bool, backend: str, cross_rank: bool, chunk_rows: int | None) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = normalize or spec.metric == "cosine"
        self.backend = _choice(backend, BACKENDS, "backend")
        resolve_backend(backend, spec, is_cuda=True)  # refuses e.g. triton for a mining without kernel
        self.cross_rank = cross_rank
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = chunk_rows

    def _prepare(self, z: Tensor, backend: str) -> Tensor:
        x = z.float()
        if self.normalize:
            x = F.normalize(x, dim=1)
        # The fused kernel reads half precision directly (fp32 accumulation); others compute in fp32.
        return x.to(z.dtype) if backend == "triton" else x

    def compute(self, z: Tensor, y: Tensor, ref_z: Tensor | None,
                ref_y: Tensor | None) -> tuple[Tensor, Tensor]:
        backend = resolve_backend(self.backend, self.spec, z.is_cuda)
        x = self._prepare(z, backend)
        r, r_y, self_offset = (x, y, 0) if ref_z is None else (self._prepare(ref_z, backend), ref_y, None)
        distributed = self.cross_rank and cross_rank_active()
        if distributed:
            r, r_y, offset = gather_references(r, r_y)
            self_offset = offset if ref_z is None else None
        sums, counts = pairwise_rows(self.spec, x, r, y, r_y, self_offset, backend, self.chunk_rows)
        totals, norm = sums.sum(0), counts.sum(0)
        if distributed:
            norm = all_reduce_sum(norm)
        norm = norm.clamp(min=1.0)
        scale = world_size() if distributed else 1
        return scale * totals[0] / norm[0], scale * totals[1] / norm[1]


@register_loss("contrastive")
class ContrastiveLoss(PairwiseLoss):
    """Σ_pos (D - m_pos)_+^p and Σ_neg (m_neg - D)_+^p (margins flip for `distance=cosine`, like PML).

    reduction: `mean_nonzero` (PML's AvgNonZeroReducer: each part over its non-zero pairs), `mean`
    (each part over all its pairs) or `per_anchor` ((1/n) Σ_i Σ_j, DESIGN §4).
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, power: int = 1,
                 distance: str = "euclidean", normalize: bool = True, reduction: str = "mean_nonzero",
                 backend: str = "auto", cross_rank: bool = False, chunk_rows: int | None = None) -> None:
        if power not in (1, 2):
            raise ValueError(f"power must be 1 or 2, got {power}")
        spec = ContrastiveRows(float(pos_margin), float(neg_margin), int(power),
                               _choice(reduction, ("mean_nonzero", "mean", "per_anchor"), "reduction"),
                               _choice(distance, METRICS, "distance"))
        super().__init__(spec, normalize, backend, cross_rank, chunk_rows)


@register_loss("triplet")
class TripletLoss(PairwiseLoss):
    """relu(D_ap - D_an + margin) over mined triplets, mean over the non-zero ones (PML defaults)."""

    def __init__(self, margin: float = 0.05, mining: str = "all", distance: str = "euclidean",
                 normalize: bool = True, backend: str = "auto", cross_rank: bool = False,
                 chunk_rows: int | None = None) -> None:
        spec = TripletRows(float(margin), _choice(mining, ("all", "semi_hard", "batch_hard"), "mining"),
                           _choice(distance, METRICS, "distance"))
        super().__init__(spec, normalize, backend, cross_rank, chunk_rows)


@register_loss("multi_similarity")
class MultiSimilarityLoss(PairwiseLoss):
    """Multi-similarity loss with its pair miner on cosine similarity (α, β, base λ, ε)."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1,
                 backend: str = "auto", cross_rank: bool = False, chunk_rows: int | None = None) -> None:
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"alpha and beta must be > 0, got {alpha}, {beta}")
        spec = MultiSimilarityRows(float(alpha), float(beta), float(base), float(epsilon))
        super().__init__(spec, True, backend, cross_rank, chunk_rows)


def _temperature(value: float) -> float:
    if value <= 0:
        raise ValueError(f"temperature must be > 0, got {value}")
    return float(value)


@register_loss("snca")
class SNCALoss(PairwiseLoss):
    """Soft nearest-neighbour (scalable NCA) loss on cosine similarity with temperature σ."""

    def __init__(self, temperature: float = 0.05, backend: str = "auto", cross_rank: bool = False,
                 chunk_rows: int | None = None) -> None:
        super().__init__(SoftNeighbourRows(_temperature(temperature), per_positive=False), True, backend,
                         cross_rank, chunk_rows)


@register_loss("supcon")
class SupConLoss(PairwiseLoss):
    """Supervised contrastive loss (per-positive average of the SNCA log-ratio)."""

    def __init__(self, temperature: float = 0.1, backend: str = "auto", cross_rank: bool = False,
                 chunk_rows: int | None = None) -> None:
        super().__init__(SoftNeighbourRows(_temperature(temperature), per_positive=True), True, backend,
                         cross_rank, chunk_rows)
