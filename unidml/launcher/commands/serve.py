"""`unidml serve`: an HTTP JSON search service (and a page to try it) over an `unidml index` index.

    unidml serve --checkpoint RUN/checkpoints/best.pt --index catalogue.index [--host 127.0.0.1 --port 8080]

`POST /search[?k=N]` takes an image (raw body or multipart upload) and answers the top-k indexed images:
ids, labels, scores and paths relative to the gallery root; `GET /healthz` says what is served and how
queries were batched; `GET /` is a page to upload a query and see its neighbours. Queries arriving within
--batch-window-ms of each other are embedded in one forward pass. See docs/models.md, "A search service".
"""
from __future__ import annotations

import argparse


def _at_least(low: float, kind: type = int):
    """An argparse type: a number of `kind` that is at least `low`."""
    def parse(text: str):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a unidml checkpoint (e.g. RUN/checkpoints/best.pt)")
    parser.add_argument("--index", required=True, help="an `unidml index` index of this run's embeddings")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=_at_least(0), default=8080, help="port to listen on (0: any free port)")
    parser.add_argument("--max-k", type=_at_least(1), default=100, help="largest k a query may ask for")
    parser.add_argument("--max-upload-mb", type=_at_least(0.001, float), default=16,
                        help="largest accepted upload, in MiB")
    parser.add_argument("--max-batch", type=_at_least(1), default=32,
                        help="most queries embedded together (also at most eval.batch_size)")
    parser.add_argument("--batch-window-ms", type=_at_least(0, float), default=5,
                        help="how long the first query of a batch waits for others")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. engine.device=cpu")


def run(args: argparse.Namespace) -> int:
    from unidml.serving.http_service import run_server
    from unidml.serving.search_service import ServiceLimits

    return run_server(args.checkpoint, args.index, list(args.overrides),
                      ServiceLimits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_k=args.max_k,
                                    max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000),
                      host=args.host, port=args.port)
