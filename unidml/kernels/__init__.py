"""Losses of the unifying MI view of metric learning, with fused pairwise kernels.

`build_loss(name, **params)` returns an `nn.Module` called as
`loss(embeddings, labels, ref_emb=None, ref_labels=None)`; after each call `loss.terms` holds the
detached `tightness` and `contrast` terms. Importing the loss modules registers them.
"""
from unidml.kernels import center, cross_entropy, pce  # noqa: F401  (importing registers the losses)
from unidml.kernels.pairwise import losses  # noqa: F401
from unidml.kernels.registry import (LOSSES, build_loss, build_loss_from_config, loss_parameters,
                                     validate_loss_params)

__all__ = ["LOSSES", "build_loss", "build_loss_from_config", "loss_parameters", "validate_loss_params"]
