"""Query images embedded as the indexed gallery was: the run's test transform and precision,
L2-normalised for cosine runs (shared by `unidml search` and `unidml serve`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

    from unidml.evaluation.evaluate import Embeddings


def embed_queries(cfg: Any, model: Any, paths: Sequence[str], device: torch.device) -> Embeddings:
    """Embeddings of the images at `paths`, in one pass of up to `eval.batch_size` images per forward;
    an image the configured loader cannot read is left out (`indices` names the ones kept)."""
    import numpy as np

    from unidml.data_pipeline.dataset import ImageSet
    from unidml.engine.evaluator import embed_images

    queries = ImageSet("query", tuple(paths), np.zeros(len(paths), np.int64))
    return embed_images(cfg, model, queries, device, normalize=str(cfg.eval.metric) == "cosine")
