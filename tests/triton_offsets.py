"""A one-program Triton kernel that applies the classifier kernels' `_rows64` to given row indices (tests only;
imported inside the TRITON_INTERPRET=1 subprocess)."""
import triton
import triton.language as tl

from unidml.kernels.classifier.triton_kernels import _rows64


@triton.jit
def row_offsets(IDX, OUT64, OUT32, stride):
    i = tl.load(IDX + tl.arange(0, 4))
    tl.store(OUT64 + tl.arange(0, 4), _rows64(i, stride))
    tl.store(OUT32 + tl.arange(0, 4), (i * stride).to(tl.int64))  # the plain int32 product, for contrast
