"""Run under TRITON_INTERPRET=1: the kernels' offset helper at element offsets past 2^31."""
import torch
import triton
import triton.language as tl

from unidml.kernels.pairwise.triton_kernels import element_offsets


@triton.jit
def _offsets_kernel(IDX, OUT, stride, ROWS: tl.constexpr, FEATS: tl.constexpr):
    idx = tl.load(IDX + tl.arange(0, ROWS))
    feats = tl.arange(0, FEATS)
    out = element_offsets(idx, feats, stride)
    tl.store(OUT + tl.arange(0, ROWS)[:, None] * FEATS + feats[None, :], out)


def check() -> None:
    # Rows of a 4.2 M x 512 reference matrix and of a 10^6-class x 2048 one: offsets reach ~2^31-2^32.
    for rows, stride in (([0, 1, 4_194_303, 4_194_304, 4_200_000, 5_000_000, 8_388_607, 3], 512),
                         ([1_048_575, 1_048_576, 1_000_000, 2_000_000, 7, 0, 999_999, 2_097_151], 2048)):
        idx = torch.tensor(rows, dtype=torch.int32)
        out = torch.empty(8, 4, dtype=torch.int64)
        _offsets_kernel[(1,)](idx, out, stride, ROWS=8, FEATS=4)
        want = torch.tensor([[r * stride + f for f in range(4)] for r in rows], dtype=torch.int64)
        assert max(rows) * stride >= 2 ** 31 and torch.equal(out, want), (out - want).tolist()
