"""Mutual-information diagnostics: how much the embeddings Z tell about the labels Y, I(Z;Y) = H(Y) - H(Y|Z).

The paper's argument is that cross-entropy and the pairwise losses all maximise I(Z;Y). These
diagnostics let a run show it happening, on a fixed sample of *whole* training classes embedded at
every evaluation (test classes are disjoint from the classifier's, so the training distribution is
the one the losses act on). Everything is in nats.

For any classifier q, E[-log q(y|z)] = H(Y|Z) + KL(p(y|z) || q(y|z)) >= H(Y|Z): the mean log-loss
of a classifier is a plug-in *upper* estimate of H(Y|Z), so "baseline log-loss minus classifier
log-loss" estimates a *lower* bound on I(Z;Y). Two classifiers are used:

- the loss's own classifier (cross-entropy: `loss.logits(z)`, eval mode, no dropout, no label
  smoothing): `cond_entropy_classifier` = -(1/n) Σ_i log softmax(logits_i)[y_i]; baseline: the
  training-set class frequencies π, `prior_entropy` = -(1/n) Σ_i log π(y_i) (= log K when balanced);
  `mi_classifier` = prior_entropy - cond_entropy_classifier.
- a soft nearest-neighbour classifier on the embeddings (any loss), leave-one-out over the sample:
  q(c|z_i) = Σ_{j≠i, y_j=c} e^{s_ij/τ} / Σ_{j≠i} e^{s_ij/τ}, s = cosine similarity (or minus the
  squared Euclidean distance); `cond_entropy_knn` = -(1/n) Σ_i log q(y_i|z_i); baseline: the same
  classifier on identical embeddings, i.e. leave-one-out class frequencies,
  `loo_label_entropy` = -(1/n) Σ_i log((n_{y_i} - 1)/(n - 1)); `mi_knn` = loo_label_entropy -
  cond_entropy_knn (exactly 0 when all embeddings coincide). Points whose class has no other
  member in the sample are left out of both.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from unidml.config import METRICS
from unidml.evaluation.evaluate import extract_embeddings


def _neighbour_log_posterior(z: torch.Tensor, y: torch.Tensor, temperature: float, metric: str,
                             block: int) -> torch.Tensor:
    """log q(y_i | z_i) of the leave-one-out soft nearest-neighbour classifier, one value per row."""
    if metric == "cosine":
        z = F.normalize(z, dim=1)
    same = y[:, None] == y[None, :]
    out = []
    for start in range(0, len(z), block):
        rows = slice(start, min(start + block, len(z)))
        if metric == "cosine":
            sim = z[rows] @ z.T
        else:
            sim = -torch.cdist(z[rows], z).square()
        logits = sim / temperature
        idx = torch.arange(rows.start, rows.stop)
        logits[idx - start, idx] = -math.inf  # a point is never its own neighbour (excluded by index)
        positive = logits.masked_fill(~same[rows], -math.inf)
        out.append(torch.logsumexp(positive, 1) - torch.logsumexp(logits, 1))
    return torch.cat(out)


def knn_conditional_entropy(embeddings: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, *,
                            temperature: float = 0.05, metric: str = "cosine",
                            block: int = 1024) -> dict[str, float]:
    """Leave-one-out soft nearest-neighbour estimate of H(Y|Z), its baseline and their difference.

    Returns `cond_entropy_knn`, `loo_label_entropy`, `mi_knn` (nats) and `knn_points` (points used:
    those with at least one other member of their class). Exact, O(n²) time in row blocks.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")
    z = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings)
    z = z.detach().cpu().double()
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).cpu().long()
    if z.ndim != 2 or y.shape != (len(z),):
        raise ValueError(f"need embeddings (n, d) and labels (n,), got {tuple(z.shape)} and {tuple(y.shape)}")
    counts = torch.bincount(y - y.min()) if len(y) else torch.zeros(0, dtype=torch.long)
    class_size = counts[y - y.min()] if len(y) else counts
    keep = class_size > 1
    if not bool(keep.any()):
        nan = float("nan")
        return {"cond_entropy_knn": nan, "loo_label_entropy": nan, "mi_knn": nan, "knn_points": 0}
    z, y, class_size = z[keep], y[keep], class_size[keep]
    n = len(y)
    cond = float(-_neighbour_log_posterior(z, y, temperature, metric, block).mean())
    loo = float(-torch.log((class_size - 1).double() / (n - 1)).mean())
    return {"cond_entropy_knn": cond, "loo_label_entropy": loo, "mi_knn": loo - cond, "knn_points": n}


def classifier_conditional_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                   class_prior: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Plug-in H(Y|Z) from a classifier's logits (mean -log softmax at the true class), the prior's
    log-loss on the same labels, and their difference: `cond_entropy_classifier`, `prior_entropy`,
    `mi_classifier` (nats)."""
    logits = logits.detach().double()
    y = labels.long().cpu()
    prior = torch.as_tensor(np.asarray(class_prior), dtype=torch.float64)
    if logits.ndim != 2 or y.shape != (len(logits),) or prior.shape != (logits.shape[1],):
        raise ValueError(f"need logits (n, K), labels (n,), class_prior (K,); got {tuple(logits.shape)}, "
                         f"{tuple(y.shape)}, {tuple(prior.shape)}")
    cond = float(F.cross_entropy(logits.cpu(), y))
    base = float(-torch.log(prior[y]).mean())
    return {"cond_entropy_classifier": cond, "prior_entropy": base, "mi_classifier": base - cond}


@dataclasses.dataclass(frozen=True)
class DiagnosticSample:
    """The training images the diagnostics embed (whole classes, contiguous labels) and the
    training set's class frequencies (the classifier baseline)."""

    images: Any  # an ImageSet: name, paths, labels
    class_prior: np.ndarray


def diagnostic_sample(train_set: Any, max_images: int = 1024, seed: int = 0) -> DiagnosticSample:
    """Whole training classes, in a fixed random order, until `max_images` would be exceeded
    (at least one class). Labels are the contiguous ones the classifier predicts."""
    labels = train_set.contiguous_labels()
    counts = np.bincount(labels)
    chosen, total = [], 0
    for cls in np.random.default_rng([seed, 0xD1A6]).permutation(len(counts)):
        if chosen and total + counts[cls] > max_images:
            continue
        chosen.append(cls)
        total += counts[cls]
    rows = np.flatnonzero(np.isin(labels, chosen))
    images = dataclasses.replace(train_set, name="diagnostics", paths=tuple(train_set.paths[i] for i in rows),
                                 labels=labels[rows])
    return DiagnosticSample(images, counts / counts.sum())


def mi_diagnostics(model: torch.nn.Module, loss: torch.nn.Module, loader: Iterable, class_prior: np.ndarray, *,
                   metric: str = "cosine", temperature: float = 0.05, device: torch.device | str = "cpu",
                   precision: str = "auto") -> dict[str, float]:
    """Embed `loader` (eval mode) and return the neighbour diagnostics, plus the classifier ones when
    the loss has a classifier (`loss.logits(z)`). Keys as in the module docstring."""
    emb = extract_embeddings(model, loader, device=device, precision=precision, normalize=False)
    if len(emb.vectors) == 0:
        return {}
    z = torch.from_numpy(emb.vectors)
    y = torch.from_numpy(emb.labels)
    out = knn_conditional_entropy(z, y, temperature=temperature, metric=metric)
    logits_of = getattr(loss, "logits", None)
    if callable(logits_of):
        was_training = loss.training
        loss.eval()
        try:
            with torch.no_grad():
                logits = logits_of(z.to(device)).float().cpu()
        finally:
            loss.train(was_training)
        out.update(classifier_conditional_entropy(logits, y, class_prior))
    return out
