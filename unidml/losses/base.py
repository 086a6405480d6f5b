"""The shells every loss is built on: checked inputs, fp32 compute outside autocast, logged terms.

`DecomposedLoss` is the common base: `forward` checks the call, then the subclass's
`compute(inputs)` returns the paper's two terms (tightness, contrast) whose sum is the loss.
`PairwiseLoss` is the shell of the losses over the anchors x references matrix: it normalises,
gathers cross-rank references and hands one row program to the kernels' dispatcher, on the backend
chosen once when the loss was built (docs/design.md, "Losses"). `RankLoss` is the shell of the losses
over smoothed ranks (Smooth-AP, the Recall@k surrogate), which need the anchors x references x
references sigmoids (`kernels.ranks`).

The call is pytorch-metric-learning's: `loss(embeddings, labels, indices_tuple=None, ref_emb=None,
ref_labels=None)`, where `indices_tuple` is a PML miner's output, pairs `(a1, p, a2, n)` or triplets
`(a, p, n)` (indices into `embeddings` for anchors, into `ref_emb`, or `embeddings` again, for the
others). A pairwise loss given pairs or triplets computes exactly over them, as PML's loss does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unidml.kernels.pairwise.dispatch import operand_dtype, pairwise_rows, resolve_backend
from unidml.kernels.pairwise.reference import pair_matrix
from unidml.kernels.ranks import RankProgram, rank_dtype, rank_rows, resolve_rank_backend
from unidml.runtime.collectives import all_reduce_sum, gather_references, world_size
from unidml.runtime.device import choose_device


def check_batch(emb: Tensor, labels: Tensor | None, emb_name: str, label_name: str) -> None:
    """Raise ValueError unless `emb` is (n, d) floating and `labels` is (n,) integer."""
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"{emb_name} must be a 2-d floating tensor, got {tuple(emb.shape)} {emb.dtype}")
    if emb.shape[0] == 0:
        raise ValueError(f"{emb_name} is empty (0 rows)")
    if labels is None or labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
        shape = None if labels is None else tuple(labels.shape)
        raise ValueError(f"{label_name} must have shape ({emb.shape[0]},), got {shape}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{label_name} must be integer class ids, got {labels.dtype}")


Pairs = tuple[Tensor, Tensor, Tensor, Tensor]
Triplets = tuple[Tensor, Tensor, Tensor]


def check_indices(indices_tuple: object, n: int, m: int) -> Pairs | Triplets:
    """`indices_tuple` as a tuple of 1-d integer tensors: pairs (a1, p, a2, n) or triplets (a, p, n),
    anchors in [0, n), the others in [0, m), and a1/p, a2/n (or a/p/n) of equal lengths (ValueError)."""
    if isinstance(indices_tuple, Tensor) or not isinstance(indices_tuple, (tuple, list)) \
            or len(indices_tuple) not in (3, 4):
        got = type(indices_tuple).__name__
        raise ValueError(f"indices_tuple must be a miner's pairs (a1, p, a2, n) or triplets (a, p, n), got {got}; "
                         f"references go in ref_emb=..., ref_labels=...")
    index = tuple(torch.as_tensor(t) for t in indices_tuple)
    for t in index:
        if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"indices_tuple entries must be 1-d integer tensors, got {tuple(t.shape)} {t.dtype}")
    groups = [index[0:2], index[2:4]] if len(index) == 4 else [index]
    if any(len({len(t) for t in group}) > 1 for group in groups):
        raise ValueError(f"indices_tuple: lengths {[len(t) for t in index]} do not pair up")
    for position, t in enumerate(index):
        bound = n if position in ((0, 2) if len(index) == 4 else (0,)) else m
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise ValueError(f"indices_tuple[{position}] holds an index outside [0, {bound})")
    return tuple(t.long() for t in index)  # type: ignore[return-value]


def as_pairs(indices: Pairs | Triplets) -> Pairs:
    """Pairs as PML forms them from triplets: (a, p, a, n), one positive and one negative pair each."""
    return indices if len(indices) == 4 else (indices[0], indices[1], indices[0], indices[2])


def as_triplets(indices: Pairs | Triplets) -> Triplets:
    """Triplets as PML forms them from pairs: every positive pair with every negative pair of its anchor."""
    if len(indices) == 3:
        return indices
    a1, p, a2, n = indices
    pos, neg = torch.nonzero(a1[:, None] == a2[None, :], as_tuple=True)
    return a1[pos], p[pos], n[neg]


@dataclass(frozen=True)
class LossInputs:
    """One checked loss call: anchors (n, d) with labels (n,), optional references (m, d), (m,), and
    optional mined `indices` (pairs or triplets, see `check_indices`).

    Without references the anchors are their own references (self-pairs excluded by index).
    """

    embeddings: Tensor
    labels: Tensor
    ref_emb: Tensor | None = None
    ref_labels: Tensor | None = None
    indices: Pairs | Triplets | None = None

    @classmethod
    def checked(cls, embeddings: Tensor, labels: Tensor, ref_emb: Tensor | None,
                ref_labels: Tensor | None, indices_tuple: object = None) -> LossInputs:
        check_batch(embeddings, labels, "embeddings", "labels")
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("ref_emb and ref_labels must be given together")
        if ref_emb is not None:
            check_batch(ref_emb, ref_labels, "ref_emb", "ref_labels")
            if ref_emb.shape[1] != embeddings.shape[1]:
                raise ValueError(f"ref_emb has dim {ref_emb.shape[1]}, embeddings {embeddings.shape[1]}")
        m = embeddings.shape[0] if ref_emb is None else ref_emb.shape[0]
        indices = None if indices_tuple is None else check_indices(indices_tuple, embeddings.shape[0], m)
        if indices is not None:
            indices = tuple(t.to(embeddings.device) for t in indices)
        return cls(embeddings, labels, ref_emb, ref_labels, indices)

    @property
    def has_references(self) -> bool:
        return self.ref_emb is not None


class DecomposedLoss(nn.Module):
    """A loss equal to tightness + contrast (the paper's Table 1 decomposition).

    Called as `loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`, like a
    pytorch-metric-learning loss. Subclasses implement `compute(inputs) -> (tightness, contrast)`
    (fp32, autocast off) and set `takes_indices` when they honour a miner's `indices_tuple`; after each
    call `self.terms` holds both terms, detached, for logging.
    """

    takes_indices = False

    def __init__(self) -> None:
        super().__init__()
        self.terms: dict[str, Tensor] = {}

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Pairs | Triplets | None = None,
                ref_emb: Tensor | None = None, ref_labels: Tensor | None = None) -> Tensor:
        """The loss of `embeddings` (n, d) with `labels` (n,), against `ref_emb`/`ref_labels` (m, d)/(m,)
        when given, over the pairs or triplets of `indices_tuple` when given (a PML miner's output)."""
        if indices_tuple is not None and not self.takes_indices:
            raise ValueError(f"{type(self).__name__} does not take indices_tuple: it uses every sample of the batch")
        inputs = LossInputs.checked(embeddings, labels, ref_emb, ref_labels, indices_tuple)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            tightness, contrast = self.compute(inputs)
            loss = tightness + contrast
        self.terms = {"tightness": tightness.detach(), "contrast": contrast.detach()}
        return loss

    def compute(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def choice(value: str, known: Sequence[str], what: str) -> str:
    """`value` if it is one of `known`, else a one-line ValueError naming `what`."""
    if value not in known:
        raise ValueError(f"unknown {what} '{value}' (known: {', '.join(known)})")
    return value


def positive(value: float, what: str) -> float:
    """`value` as a float if it is > 0, else a one-line ValueError naming `what`."""
    if value <= 0:
        raise ValueError(f"{what} must be > 0, got {value}")
    return float(value)


class PairwiseLoss(DecomposedLoss):
    """Shell of the pairwise losses: normalisation, references, backend, cross-rank, mined tuples.

    Parameters every pairwise loss takes:
        backend: how the pair matrix is computed: `reference` (whole matrix, autograd), `tiled` (row
            chunks, bounded memory), `triton` (fused CUDA kernel) or `auto` (triton on CUDA, else tiled).
            Resolved once, here, for `device`; an impossible choice fails at construction.
        device: where the loss will run (default: the device `engine.device=auto` picks).
        cross_rank: under DDP, use every rank's batch as references (pairs across processes).
        chunk_rows: anchor rows per chunk of the tiled backend (default: sized from the reference count).

    `spec` is the loss's row program (`unidml.kernels.pairwise.rows`): per-anchor sums and counts
    whose column totals give the loss world · (T / N_t + C / N_c), with the counts summed over
    ranks (world = 1 unless `cross_rank` in a group of several processes). Given a miner's
    `indices_tuple`, the loss is computed over exactly those pairs or triplets (`mined_rows`), from the
    whole pair matrix of the batch, whatever the backend.
    """

    takes_indices = True

    def __init__(self, spec, *, normalize: bool, backend: str, device: torch.device | str | None,
                 cross_rank: bool, chunk_rows: int | None) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = normalize or spec.metric == "cosine"
        self.backend = resolve_backend(backend, spec, choose_device() if device is None else torch.device(device))
        self.cross_rank = cross_rank
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = chunk_rows

    def _prepare(self, z: Tensor) -> Tensor:
        """`z` normalised (when the loss normalises) in fp32, back in its own dtype when that is bf16 or
        fp16: the operands every backend then computes from (`dispatch.operand_dtype`), so the backend
        choice does not change the values the loss sees."""
        x = z.float()
        if self.normalize:
            x = F.normalize(x, dim=1)
        return x.to(operand_dtype(z.dtype))

    def compute(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        x, y = self._prepare(inputs.embeddings), inputs.labels
        if inputs.indices is not None:
            return self._mined(x, inputs)
        if inputs.has_references:
            r, r_y, self_offset = self._prepare(inputs.ref_emb), inputs.ref_labels, None
        else:
            r, r_y, self_offset = x, y, 0
        world = world_size() if self.cross_rank else 1
        if world > 1:
            r, r_y, offset = gather_references(r, r_y)
            self_offset = None if inputs.has_references else offset
        return self.terms_against(x, y, r, r_y, self_offset, world)

    def terms_against(self, x: Tensor, y: Tensor, r: Tensor, r_y: Tensor, self_offset: int | None,
                      world: int) -> tuple[Tensor, Tensor]:
        """(tightness, contrast) of prepared anchors against prepared references (anchor i's own column
        is i + self_offset, or none), with the normalising counts summed over `world` ranks."""
        sums, counts = pairwise_rows(self.spec, x, r, y, r_y, self_offset, self.backend, self.chunk_rows)
        totals, norm = sums.sum(0), counts.sum(0)
        if world > 1:
            norm = all_reduce_sum(norm)
        norm = norm.clamp(min=1.0)
        return world * totals[0] / norm[0], world * totals[1] / norm[1]

    def _mined(self, x: Tensor, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        """The loss over a miner's pairs or triplets, on this rank's batch, from the whole pair matrix."""
        if self.cross_rank and world_size() > 1:
            raise ValueError("indices_tuple indexes this process's batch: it cannot be used with cross_rank=true")
        r = self._prepare(inputs.ref_emb).float() if inputs.has_references else x.float()
        sums, counts = self.mined_rows(pair_matrix(self.spec.metric, x.float(), r), inputs.indices)
        totals, norm = sums.sum(0), counts.sum(0).clamp(min=1.0)
        return totals[0] / norm[0], totals[1] / norm[1]

    def mined_rows(self, v: Tensor, indices: Pairs | Triplets) -> tuple[Tensor, Tensor]:
        """(sums, counts) of the row program over mined pairs; see `masked_rows` (losses that take each pair
        or triplet separately override this)."""
        return masked_rows(self.spec, v, indices)


def masked_rows(spec, v: Tensor, indices: Pairs | Triplets) -> tuple[Tensor, Tensor]:
    """Row program `spec` over mined pairs as PML's matrix-based losses (multi-similarity, SupCon) take
    them: each anchor row of V with the mined positives and negatives as its masks (a pair mined twice
    counts once)."""
    a1, p, a2, n = as_pairs(indices)
    true = torch.tensor(True, device=v.device)
    pos = torch.zeros_like(v, dtype=torch.bool).index_put_((a1, p), true)
    neg = torch.zeros_like(v, dtype=torch.bool).index_put_((a2, n), true)
    return spec.rows(v, pos, neg, pos | neg)


class RankLoss(DecomposedLoss):
    """Shell of the rank-based losses: cosine similarity of L2-normalised embeddings, references, backend.

    Parameters every rank loss takes:
        backend: how the smoothed ranks are computed: `reference` (the n x m x m sigmoid tensor, autograd),
            `tiled` (anchor chunks and k blocks, recomputing backward: O((n+m)·d + chunk·m·block) memory)
            or `auto` (tiled: there is no Triton kernel). Resolved once, here; `triton` is refused.
        device: where the loss will run (default: the device `engine.device=auto` picks).
        chunk_rows: anchors per chunk of the tiled backend (default: sized from the reference count).

    `program` (`kernels.ranks.RankProgram`) gives each anchor's loss from its ranks; the loss is their
    mean over the anchors it counts (those with a positive). Computed in fp64 for fp64 embeddings, else
    fp32. The references are the batch itself unless `ref_emb` is given. A rank loss has no part over
    the positive pairs alone (every term ranks positives against the whole retrieval set): `tightness`
    is 0 and `contrast` is the loss.
    """

    def __init__(self, program: RankProgram, *, backend: str, device: torch.device | str | None,
                 chunk_rows: int | None) -> None:
        super().__init__()
        self.program = program
        device = choose_device() if device is None else torch.device(device)
        self.backend = resolve_rank_backend(backend, device, type(self).__name__)
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = chunk_rows

    def compute(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        refs = (inputs.ref_emb.dtype,) if inputs.has_references else ()
        dtype = rank_dtype(inputs.embeddings.dtype, *refs)
        x, y = F.normalize(inputs.embeddings.to(dtype), dim=1), inputs.labels
        if inputs.has_references:
            r, r_y, self_offset = F.normalize(inputs.ref_emb.to(dtype), dim=1), inputs.ref_labels, None
        else:
            r, r_y, self_offset = x, y, 0
        losses, counted = rank_rows(self.program, x, r, y, r_y, self_offset, self.backend, self.chunk_rows)
        value = losses.sum() / counted.sum().clamp(min=1)
        return torch.zeros_like(value), value
