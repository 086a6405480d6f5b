"""Row-wise reductions over the n x m anchors x references matrix: row programs (`rows`), the
reference, tiled and Triton backends, and the dispatcher that picks one (`dispatch`)."""
