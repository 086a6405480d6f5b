"""Large batches for pairwise losses (`engine.embed_chunks=K`): exact full-batch gradients in K chunks.

Gradient caching (Gao et al., 2021): (1) embed the batch in K chunks without autograd graphs,
(2) compute the loss of the whole batch on those embeddings and differentiate it with respect to
the embeddings and the loss's own parameters, (3) re-run each chunk with autograd and
back-propagate the cached embedding gradient through it (replaying the RNG state the chunk saw in
step 1). Activation memory is that of one chunk; the gradient equals that of the full batch for a
network whose per-sample output does not depend on the other samples of the batch.

Not exact with cross-sample layers in train mode: BatchNorm1d on the embedding (`model.feature_bn`)
and unfrozen BatchNorm2d (`model.freeze_bn=false`) normalise with per-chunk statistics, so the
chunked forward differs from the full-batch forward (the running statistics are updated once per
chunk, as for K small batches, and not again in the replay). `chunking_record` names those layers
once at start-up (a warning, and the `embed_chunks` entry of metrics.json).

Step (3) goes through the wrapped module (DDP) as a surrogate scalar <embeddings, cached grad>
(+ <loss params, their cached grad> on the last chunk), so DDP's bucketed all-reduce still runs,
once, on the last chunk.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from unidml.engine.backends.base import ChunkableBackend

log = logging.getLogger(__name__)


@dataclass
class CachedGradients:
    """The gradient that step (3) injects: for one chunk's embeddings, plus the loss parameters' on one chunk."""

    embeddings: torch.Tensor
    loss_params: list[tuple[nn.Parameter, torch.Tensor]]

    def surrogate(self, embeddings: torch.Tensor) -> torch.Tensor:
        """A scalar whose gradient is exactly the cached one."""
        total = (embeddings.float() * self.embeddings).sum()
        for param, grad in self.loss_params:
            total = total + (param * grad).sum()
        return total


def batch_dependent_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose training-mode output depends on the other samples of the batch:
    BatchNorm (any dimension, SyncBatchNorm included) left in train mode by `model.train()`."""
    was_training = model.training
    model.train()  # the mode training runs in (frozen BatchNorm2d stays in eval mode)
    names = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    model.train(was_training)
    return names


def chunking_record(model: nn.Module, chunks: int, warn: bool) -> dict:
    """metrics.json's `embed_chunks` entry: K, whether K chunks give the full-batch gradient, and the
    train-mode BatchNorm layers that prevent it; with `warn`, says so in one warning line."""
    layers = batch_dependent_layers(model) if chunks > 1 else []
    if layers and warn:
        log.warning("engine.embed_chunks=%d is not the full-batch gradient: BatchNorm in train mode normalises "
                    "each chunk with its own statistics (%d layers: %s); exact with model.freeze_bn=true and "
                    "model.feature_bn=false", chunks, len(layers), ", ".join(layers))
    return {"chunks": chunks, "exact": not layers, "batch_dependent_layers": layers}


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _norm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of every training-mode norm layer's running statistics."""
    return [(buf, buf.clone()) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training for buf in m.buffers()]


def chunked_step(backend: ChunkableBackend, images: torch.Tensor, labels: torch.Tensor, chunks: int,
                 sync_last: bool) -> torch.Tensor:
    """Accumulate the full-batch gradient of one micro-batch into `.grad` via `chunks` chunks; return the loss.

    `backend.module` is the `TrainStep`, `backend.forward` goes through the gradient-reducing wrapper,
    `backend.scaled` applies accumulation and loss scaling, `backend.sync` gates the all-reduce, which
    runs on the last chunk only when `sync_last`.
    """
    module, device = backend.module, images.device
    pieces = images.tensor_split(chunks)
    states, outputs = [], []
    with torch.no_grad(), backend.autocast():
        for piece in pieces:
            states.append(_rng_state(device))
            outputs.append(module.model(piece).float())
    embeddings = torch.cat(outputs).requires_grad_()
    params = [p for p in module.loss.parameters() if p.requires_grad]
    with backend.autocast():
        loss = module.loss(embeddings, labels)
    grads = torch.autograd.grad(backend.scaled(loss), [embeddings, *params], allow_unused=True)
    param_grads = [(p, g) for p, g in zip(params, grads[1:]) if g is not None]
    after = _rng_state(device)
    stats = _norm_buffers(module.model)
    for k, (piece, grad) in enumerate(zip(pieces, grads[0].split([len(p) for p in pieces]))):
        last = k == len(pieces) - 1
        _set_rng_state(states[k], device)
        with backend.sync(sync_last and last):
            cached = CachedGradients(grad, param_grads if last else [])
            backend.forward(piece, None, cached).backward()
    for buffer, saved in stats:
        buffer.copy_(saved)
    _set_rng_state(after, device)
    return loss.detach()
