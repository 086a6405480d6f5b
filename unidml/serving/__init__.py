"""Serving a trained model's retrieval: the index written by `unidml index` with its image table
(catalogue), the query embedding shared with `unidml search` (queries), and `unidml serve`'s HTTP
JSON API (http_service) over a micro-batching queue (batcher); docs/models.md, "A search service"."""
