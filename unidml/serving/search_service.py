"""What `unidml serve` answers: an uploaded query image -> its top-k indexed gallery images. The query goes
through the checkpoint's test transform and precision exactly as `unidml search` embeds one (a file read by
the run's configured loader); concurrent queries are embedded together by the micro-batcher."""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Sequence
from urllib.parse import quote

from unidml.serving.batcher import MicroBatcher
from unidml.serving.catalogue import Neighbours, ServedIndex
from unidml.serving.errors import RequestError
from unidml.serving.gallery_files import GalleryFiles


@dataclass(frozen=True)
class ServiceLimits:
    """Bounds on what one request may ask and on the batching queue."""

    max_upload_bytes: int = 16 * 2**20
    max_k: int = 100
    default_k: int = 10
    max_batch: int = 32  # also at most eval.batch_size, so that a batch is one forward pass
    batch_window_s: float = 0.005
    max_waiting: int = 256


@dataclass(frozen=True)
class Query:
    """One uploaded image, saved at `path`, and how many neighbours it asks for."""

    path: str
    k: int


class SearchService:
    """The model, the index and its gallery files, behind one micro-batching queue."""

    def __init__(self, model: Any, cfg: Any, device: Any, index: ServedIndex, limits: ServiceLimits) -> None:
        self.model, self.cfg, self.device, self.index, self.limits = model, cfg, device, index, limits
        self.gallery = GalleryFiles(index.images.paths)
        self._uploads = tempfile.TemporaryDirectory(prefix="unidml-serve-")
        self.batcher: MicroBatcher[Query, Neighbours | None] = MicroBatcher(
            self._answer, max_items=max(1, min(limits.max_batch, int(cfg.eval.batch_size))),
            window_s=limits.batch_window_s, max_waiting=limits.max_waiting)

    def search(self, data: bytes, k: int) -> dict[str, Any]:
        """The `POST /search` answer for image bytes `data`: 400 for a k out of range or data that is not a
        readable image (the run's `data.max_pixels` included)."""
        from unidml.data_pipeline.images import BadImage, load_rgb

        if not 1 <= k <= self.limits.max_k:
            raise RequestError(400, f"k={k}: must be between 1 and {self.limits.max_k}")
        handle, path = tempfile.mkstemp(dir=self._uploads.name)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            try:
                load_rgb(path, int(self.cfg.data.max_pixels))
            except BadImage as exc:
                raise RequestError(400, f"not a readable image: {exc.detail.replace(path, 'upload')}") from None
            top, batch_size = self.batcher.submit(Query(path, k))
        finally:
            os.unlink(path)
        if top is None:
            raise RequestError(400, f"the data.backend={self.cfg.data.backend} loader cannot read this image")
        return {"k": k, "metric": self.index.metric, "batch_size": batch_size,
                "results": [self._hit(rank, int(i), float(s))
                            for rank, (s, i) in enumerate(zip(top.scores[0], top.ids[0]), start=1)]}

    def _hit(self, rank: int, row: int, score: float) -> dict[str, Any]:
        label = int(self.index.images.labels[row])
        path = self.gallery.relative[row]
        return {"rank": rank, "id": row, "label": label if label >= 0 else None, "score": score, "path": path,
                "url": "/gallery/" + quote(path)}

    def _answer(self, queries: list[Query]) -> list[Neighbours | None]:
        """One batch: every query embedded in one pass, then each searched for its own k."""
        from unidml.serving.queries import embed_queries

        found = embed_queries(self.cfg, self.model, [q.path for q in queries], self.device)
        vectors = dict(zip(found.indices.tolist(), found.vectors))
        return [self.index.search(vectors[i][None], q.k, exclude=[]) if i in vectors else None
                for i, q in enumerate(queries)]

    def health(self) -> dict[str, Any]:
        """`GET /healthz`: the model, the index, the limits and what the batching queue has done."""
        stats = self.batcher.stats()
        return {"status": "ok",
                "model": {"arch": str(self.cfg.model.arch), "embedding_dim": int(self.model.embedding_dim),
                          "image_size": int(self.cfg.data.image_size)},
                "index": {"count": int(self.index.index.ntotal), "metric": self.index.metric,
                          "factory": str(self.index.meta.get("factory", ""))},
                "limits": asdict(self.limits),
                "batching": {"requests": stats.items, "batches": stats.batches, "largest_batch": stats.largest,
                             "max_batch": self.batcher.max_items, "window_ms": 1000 * self.batcher.window_s}}

    def close(self) -> None:
        self.batcher.close()
        self._uploads.cleanup()


def open_service(checkpoint: str, index: str, overrides: Sequence[str], limits: ServiceLimits) -> SearchService:
    """The service for a checkpoint and an index built from the same run's embeddings. Queries are decoded
    in the batching thread (`data.num_workers=0`: a batch is a few images, and forking loader workers from a
    threaded server is unsafe); a query its loader cannot read is answered 400 alone (`data.on_error=skip`)."""
    from unidml.run_config import load_for_inference
    from unidml.runtime.device import choose_device
    from unidml.serving.catalogue import open_index

    model, cfg = load_for_inference(checkpoint, [*overrides, "data.num_workers=0", "data.on_error=skip"])
    device = choose_device(str(cfg.engine.device))
    return SearchService(model.to(device), cfg, device, open_index(index, str(cfg.eval.metric)), limits)
