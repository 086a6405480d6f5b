"""Losses of the unifying mutual-information view of metric learning (one module per loss).

`build_loss(name, num_classes=, embedding_dim=, device=, **params)` returns an `nn.Module` called as
`loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)`, like a
pytorch-metric-learning loss (the pairwise losses take a PML miner's pairs or triplets as
`indices_tuple`); after each call `loss.terms` holds the detached `tightness` and `contrast` terms.
The classes can also be constructed directly, in PML's style (`help(unidml.losses.TripletLoss)`).
Importing a loss module registers it (docs/design.md, "How to add a loss").
"""
from unidml.losses.arcface import ArcFaceLoss
from unidml.losses.base import DecomposedLoss, LossInputs, PairwiseLoss, RankLoss
from unidml.losses.center import CenterLoss
from unidml.losses.contrastive import ContrastiveLoss
from unidml.losses.cosface import CosFaceLoss
from unidml.losses.cross_entropy import CrossEntropyLoss
from unidml.losses.multi_similarity import MultiSimilarityLoss
from unidml.losses.normalized_softmax import NormalizedSoftmaxLoss
from unidml.losses.pce import PairwiseCrossEntropyLoss
from unidml.losses.proxy_anchor import ProxyAnchorLoss
from unidml.losses.proxy_nca import ProxyNCALoss
from unidml.losses.recall_at_k import RecallAtKLoss
from unidml.losses.registry import (
    LOSSES,
    build_loss,
    build_loss_from_config,
    loss_parameters,
    register_loss,
    validate_loss_params,
)
from unidml.losses.smooth_ap import SmoothAPLoss
from unidml.losses.snca import SNCALoss
from unidml.losses.supcon import SupConLoss
from unidml.losses.triplet import TripletLoss
from unidml.losses.xbm import CrossBatchMemoryLoss

__all__ = [
    "LOSSES", "ArcFaceLoss", "CenterLoss", "ContrastiveLoss", "CosFaceLoss", "CrossBatchMemoryLoss",
    "CrossEntropyLoss", "DecomposedLoss", "LossInputs", "MultiSimilarityLoss", "NormalizedSoftmaxLoss",
    "PairwiseCrossEntropyLoss", "PairwiseLoss", "ProxyAnchorLoss", "ProxyNCALoss", "RankLoss", "RecallAtKLoss",
    "SNCALoss", "SmoothAPLoss", "SupConLoss", "TripletLoss",
    "build_loss", "build_loss_from_config", "loss_parameters", "register_loss", "validate_loss_params",
]
