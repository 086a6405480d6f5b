"""Smoothed ranks for the rank-based losses (Smooth-AP, the Recall@k surrogate): reference and tiled backends.

For anchor q with similarities S_q· to the m references, its retrieval set Ω_q (every reference, or every
one but the anchor's own column) and its positives P_q ⊆ Ω_q, the smoothed rank of reference i is

    R_Ω(q, i) = 1 + Σ_{k∈Ω_q, k≠i} σ((S_qk − S_qi)/τ),   R_P(q, i) = 1 + Σ_{k∈P_q, k≠i} σ((S_qk − S_qi)/τ).

A rank program (`RankProgram`) turns one anchor's ranks into its loss. `reference` materialises the
n x m x m sigmoid tensor and lets autograd differentiate (the oracle). `tiled` walks chunks of anchors and,
within a chunk, blocks of the k index, so its largest temporary is chunk x m x block; forward keeps only
the per-anchor losses, and backward recomputes each chunk's ranks, takes the program's gradient with
respect to them (a chunk x m autograd graph), then recomputes the sigmoids block by block to form
G = dL/dS and accumulates dX = G·R and dR = Gᵀ·X: memory O((n+m)·d + chunk·m·block).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from unidml.kernels.backend_choice import choose_kernel_backend

BLOCK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per chunk x m x block temporary of the tiled backend


class RankProgram(Protocol):
    """What a rank loss computes from the smoothed ranks of one chunk of anchors."""

    temperature: float  # τ of the rank sigmoid
    exclude_self: bool  # the anchor's own column is left out of its retrieval set (and of its positives)
    positive_ranks: bool  # per_anchor reads R_P (else it is passed as None and never computed)

    def per_anchor(self, rank_all: Tensor, rank_pos: Tensor | None, pos: Tensor) -> tuple[Tensor, Tensor]:
        """(loss (c,), counted (c,) bool) of c anchors from R_Ω and R_P (c, m), valid where `pos` (c, m)."""


def resolve_rank_backend(backend: str, device: torch.device, what: str) -> str:
    """The concrete backend (the kernels' one rule, `choose_kernel_backend`): no Triton kernel exists, so
    `auto` is `tiled` on every device and `triton` is refused with one line."""
    return choose_kernel_backend(backend, device, has_kernel=False, what=what)


def rank_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 when an operand is fp64 (exact tests), else fp32: a rank sigmoid at τ = 0.01 turns a
    half-precision rounding of S (~4e-3) into an error of order one in σ."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _masks(program: RankProgram, y: Tensor, ref_y: Tensor, start: int, self_offset: int | None
           ) -> tuple[Tensor, Tensor]:
    """(Ω, P) masks (c, m) of the anchors start.. with labels `y`: retrieval set and positives."""
    omega = torch.ones(y.shape[0], ref_y.shape[0], dtype=torch.bool, device=y.device)
    if program.exclude_self and self_offset is not None:
        rows = torch.arange(y.shape[0], device=y.device)
        omega[rows, rows + start + self_offset] = False
    return omega, (y[:, None] == ref_y[None, :]) & omega


def reference_ranks(program: RankProgram, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor,
                    self_offset: int | None) -> tuple[Tensor, Tensor]:
    """Per-anchor (loss, counted) from the whole n x m x m sigmoid tensor, differentiated by autograd."""
    s = x @ r.T
    omega, pos = _masks(program, y, ref_y, 0, self_offset)
    sig = torch.sigmoid((s[:, None, :] - s[:, :, None]) / program.temperature)  # [q, i, k]: S_qk − S_qi
    own = sig.diagonal(dim1=1, dim2=2)  # the k = i terms, left out of each rank

    def rank(mask: Tensor) -> Tensor:
        w = mask.to(s.dtype)
        return 1 + torch.einsum("qik,qk->qi", sig, w) - own * w

    return program.per_anchor(rank(omega), rank(pos) if program.positive_ranks else None, pos)


def _sizes(n: int, m: int, chunk_rows: int | None, block: int | None) -> tuple[int, int]:
    """(anchors per chunk, k per block): chunk x m x block about BLOCK_ELEMENTS unless given."""
    chunk = chunk_rows or max(1, min(n, BLOCK_ELEMENTS // (m * m)))
    return chunk, block or max(1, min(m, BLOCK_ELEMENTS // (chunk * m)))


def _sigmoids(s: Tensor, k0: int, k1: int, temperature: float) -> Tensor:
    """σ((S_qk − S_qi)/τ) for the chunk's anchors q, every i and k in [k0, k1): (c, m, k1 − k0)."""
    return (s[:, None, k0:k1] - s[:, :, None]).div_(temperature).sigmoid_()


def _chunk_ranks(program: RankProgram, s: Tensor, omega: Tensor, pos: Tensor, block: int
                 ) -> tuple[Tensor, Tensor | None]:
    """R_Ω and R_P (c, m) of one chunk, summed over blocks of k; the k = i term is σ(0) = 0.5 exactly."""
    rank_all = 1 - 0.5 * omega
    rank_pos = 1 - 0.5 * pos if program.positive_ranks else None
    for k0 in range(0, s.shape[1], block):
        k1 = min(k0 + block, s.shape[1])
        sig = _sigmoids(s, k0, k1, program.temperature)
        rank_all += torch.bmm(sig, omega[:, k0:k1, None]).squeeze(2)
        if rank_pos is not None:
            rank_pos += torch.bmm(sig, pos[:, k0:k1, None]).squeeze(2)
    return rank_all, rank_pos


class _TiledRanks(torch.autograd.Function):
    """Per-anchor losses over anchor chunks and k blocks, with a recomputing backward."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, program: RankProgram,
                self_offset: int | None, chunk: int, block: int) -> tuple[Tensor, Tensor]:
        losses = x.new_zeros(x.shape[0])
        counted = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for a0 in range(0, x.shape[0], chunk):
            a1 = min(a0 + chunk, x.shape[0])
            omega, pos = (m.to(x.dtype) for m in _masks(program, y[a0:a1], ref_y, a0, self_offset))
            ranks = _chunk_ranks(program, x[a0:a1] @ r.T, omega, pos, block)
            losses[a0:a1], counted[a0:a1] = program.per_anchor(*ranks, pos > 0)
        ctx.save_for_backward(x, r, y, ref_y)
        ctx.program, ctx.self_offset, ctx.chunk, ctx.block = program, self_offset, chunk, block
        ctx.mark_non_differentiable(counted)
        return losses, counted

    @staticmethod
    def backward(ctx, grad_losses: Tensor, _grad_counted: Tensor):
        x, r, y, ref_y = ctx.saved_tensors
        program, tau = ctx.program, ctx.program.temperature
        dx, dr = torch.zeros_like(x), torch.zeros_like(r)
        for a0 in range(0, x.shape[0], ctx.chunk):
            a1 = min(a0 + ctx.chunk, x.shape[0])
            omega, pos = (m.to(x.dtype) for m in _masks(program, y[a0:a1], ref_y, a0, ctx.self_offset))
            s = x[a0:a1] @ r.T
            rank_all, rank_pos = _chunk_ranks(program, s, omega, pos, ctx.block)
            leaves = [t.requires_grad_() for t in (rank_all, rank_pos) if t is not None]
            with torch.enable_grad():
                loss, _ = program.per_anchor(rank_all, rank_pos, pos > 0)
                grads = torch.autograd.grad(loss, leaves, grad_losses[a0:a1])
            # L depends on σ_qik through c_qik = A_qi·Ω_qk + B_qi·P_qk (A = dL/dR_Ω, B = dL/dR_P), so with
            # E = c·σ'/τ: G_qk = Σ_i E_qik (k in the block) and G_qi −= Σ_k E_qik.
            coefs = list(zip(grads, (omega, pos)))  # (A, Ω) and, when R_P is used, (B, P)
            g = torch.zeros_like(s)
            for k0 in range(0, s.shape[1], ctx.block):
                k1 = min(k0 + ctx.block, s.shape[1])
                sig = _sigmoids(s, k0, k1, tau)
                sig.mul_(1 - sig).div_(tau)  # σ'/τ
                for coef, mask in coefs:
                    g[:, k0:k1] += torch.bmm(coef[:, None, :], sig).squeeze(1) * mask[:, k0:k1]
                    g -= coef * torch.bmm(sig, mask[:, k0:k1, None]).squeeze(2)
            dx[a0:a1] = g @ r
            dr += g.T @ x[a0:a1]
        return dx, dr, None, None, None, None, None, None


def rank_rows(program: RankProgram, x: Tensor, r: Tensor, y: Tensor, ref_y: Tensor, self_offset: int | None,
              backend: str, chunk_rows: int | None = None, block: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-anchor (loss (n,), counted (n,) bool) of rank program `program` on a resolved `backend`.

    x (n, d) anchors and r (m, d) references, already normalised, in one dtype; anchor i's own column
    is i + self_offset (None: the references are another set). `chunk_rows` anchors and `block` values
    of k per tiled step (default: chunk x m x block about BLOCK_ELEMENTS).
    """
    if backend == "reference":
        return reference_ranks(program, x, r, y, ref_y, self_offset)
    if backend == "tiled":
        return _TiledRanks.apply(x, r, y, ref_y, program, self_offset, *_sizes(x.shape[0], r.shape[0],
                                                                                chunk_rows, block))
    raise ValueError(f"backend '{backend}' is not resolved: pass it through resolve_rank_backend first")
