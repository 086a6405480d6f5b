"""Fused compute only: pairwise row programs with reference, tiled and Triton backends behind one
dispatcher (`kernels.pairwise`). The losses that use them live in `unidml.losses`; this package
imports nothing from the layers above it (docs/design.md, "Import direction")."""
