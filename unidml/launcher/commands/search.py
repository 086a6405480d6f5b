"""`unidml search`: the nearest gallery images of one query image, as a contact-sheet PNG.

    unidml search --checkpoint RUN/checkpoints/best.pt --query IMAGE [--gallery DIR] [--topk 8] [--out PNG]

The gallery is every image under DIR (recursively), or by default the gallery of the run's
evaluation split. Images go through the run's test transform; the query itself is never returned
(if it is part of the gallery it is excluded by index, like in evaluation).
"""
from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a unidml checkpoint (e.g. RUN/checkpoints/best.pt)")
    parser.add_argument("--query", required=True, help="query image file")
    parser.add_argument("--gallery", default=None, help="directory of gallery images (default: the run's eval gallery)")
    parser.add_argument("--topk", type=int, default=8, help="number of neighbours to show")
    parser.add_argument("--out", default=None, help="PNG to write (default: <query name>_top<k>.png)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. data.root=DIR")


def gallery_from_directory(directory: str):
    """Every image file under `directory`, sorted, as an ImageSet (labels unused: 0)."""
    import numpy as np

    from unidml.data_pipeline.dataset import ImageSet
    from unidml.errors import UserError

    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"--gallery {directory}: not a directory")
    paths = sorted(str(p.resolve()) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"--gallery {directory}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return ImageSet("gallery", tuple(paths), np.zeros(len(paths), np.int64))


def gallery_from_run(cfg):
    """The gallery split of the run's evaluation pair (the query split itself for self-retrieval)."""
    from unidml.data_pipeline import build_dataset
    from unidml.errors import UserError

    dataset = build_dataset(cfg.data, seed=int(cfg.train.seed))
    split = str(cfg.eval.split)
    if split not in dataset.eval_pairs:
        raise UserError(f"eval.split '{split}': not available for dataset '{dataset.name}'")
    query_split, gallery_split = dataset.eval_pairs[split]
    return dataset.splits[gallery_split or query_split]


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from unidml.data_pipeline import build_eval_loader
    from unidml.data_pipeline.dataset import ImageSet
    from unidml.engine.checkpoint import load_for_inference
    from unidml.errors import UserError
    from unidml.evaluation import extract_embeddings, sharded_knn
    from unidml.evaluation.contact_sheet import Hit, write_contact_sheet

    query_path = Path(args.query)
    if not query_path.is_file():
        raise UserError(f"--query {args.query}: image file not found")
    if args.topk <= 0:
        raise UserError(f"--topk must be > 0, got {args.topk}")
    model, cfg = load_for_inference(args.checkpoint, list(args.overrides))
    want_cuda = str(cfg.engine.device) != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if want_cuda else "cpu")
    model.to(device)
    gallery = gallery_from_directory(args.gallery) if args.gallery else gallery_from_run(cfg)
    query = ImageSet("query", (str(query_path.resolve()),), np.zeros(1, np.int64))
    cosine = str(cfg.eval.metric) == "cosine"

    def embed(images: ImageSet) -> np.ndarray:
        loader = build_eval_loader(cfg.data, images, batch_size=int(cfg.eval.batch_size), rank=0, world_size=1,
                                   device=device)
        return extract_embeddings(model, loader, device=device, precision=str(cfg.engine.precision),
                                  normalize=cosine).vectors

    gallery_vectors, query_vector = embed(gallery), embed(query)
    # The query's own gallery index (if it is in the gallery) is excluded like a self-match.
    own = [i for i, p in enumerate(gallery.paths) if Path(p).resolve() == query_path.resolve()]
    k = min(args.topk, len(gallery) - len(own))
    top = sharded_knn(query_vector, np.array(own[:1] or [-2]), gallery_vectors, np.arange(len(gallery)), k,
                      self_retrieval=True, metric=str(cfg.eval.metric), device=device)
    hits = []
    for score, idx in zip(top.scores[0], top.ids[0]):
        caption = f"cos {score:.3f}" if cosine else f"dist {float(np.sqrt(max(-score, 0.0))):.3f}"
        hits.append(Hit(gallery.paths[idx], caption))
        print(f"{len(hits):3d}  {caption}  {gallery.paths[idx]}")
    out = Path(args.out) if args.out else Path(f"{query_path.stem}_top{args.topk}.png")
    write_contact_sheet(str(query_path), hits, out)
    print(f"contact sheet written to {out}")
    return 0
