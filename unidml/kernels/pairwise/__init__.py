"""Pairwise losses over the n x m similarity matrix, with reference, tiled and Triton backends."""
