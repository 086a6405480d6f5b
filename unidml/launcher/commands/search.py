"""`unidml search`: the nearest gallery images of one query image, as a contact-sheet PNG.

    unidml search --checkpoint RUN/checkpoints/best.pt --query IMAGE [--gallery DIR | --index INDEX] [--topk 8]
                  [--out PNG]

The gallery is every image under DIR (recursively), or by default the gallery of the run's test
split. Images go through the run's test transform; the query itself is never returned (if it is part
of the gallery it is excluded by index, like in evaluation). When the query is an image of the run's
dataset its class is known, and each hit is marked as the same class (correct) or another (wrong).
With --index (built by `unidml index` from `unidml embed` output) the gallery is the indexed catalogue
and only the query is embedded.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a unidml checkpoint (e.g. RUN/checkpoints/best.pt)")
    parser.add_argument("--query", required=True, help="query image file")
    parser.add_argument("--gallery", default=None, help="directory of gallery images (default: the run's eval gallery)")
    parser.add_argument("--index", default=None, help="search this `unidml index` index instead of embedding a gallery")
    parser.add_argument("--topk", type=int, default=8, help="number of neighbours to show")
    parser.add_argument("--out", default=None, help="PNG to write (default: <query name>_top<k>.png)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. data.root=DIR")


def gallery_from_directory(directory: str):
    """Every image file under `directory`, sorted, as an ImageSet (labels unused: 0)."""
    import numpy as np

    from unidml.data_pipeline.dataset import ImageSet
    from unidml.data_pipeline.readers import IMAGE_EXTENSIONS
    from unidml.errors import UserError

    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"--gallery {directory}: not a directory")
    paths = sorted(str(p.resolve()) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise UserError(f"--gallery {directory}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageSet("gallery", tuple(paths), np.zeros(len(paths), np.int64))


def gallery_from_run(cfg):
    """(gallery, dataset): the gallery of the run's test pair (the test split itself for self-retrieval)."""
    from unidml.data_pipeline import build_dataset
    from unidml.engine.evaluator import eval_pair

    dataset = build_dataset(cfg.data, seed=int(cfg.train.seed))
    query_split, gallery_split = eval_pair(dataset, "test", "search")
    return dataset.splits[gallery_split or query_split], dataset


def query_label(query: Path, dataset) -> int | None:
    """The class of `query` if it is an image of `dataset` (any split), else None."""
    import os

    labels = {path: int(label) for images in dataset.splits.values()
              for path, label in zip(images.paths, images.labels)}
    return labels.get(os.path.abspath(query), labels.get(str(query.resolve())))


def check_query(path: Path, max_pixels: int) -> None:
    """One line naming the query when it is missing, not an image, empty, truncated or too large."""
    from unidml.data_pipeline.images import BadImage, load_rgb
    from unidml.errors import UserError

    if not path.is_file():
        raise UserError(f"--query {path}: image file not found")
    try:
        load_rgb(str(path), max_pixels)
    except BadImage as exc:
        raise UserError(f"--query {path}: {exc.detail}") from None


def output_path(args: argparse.Namespace) -> Path:
    """--out, or `<query name>_top<k>.png`; a directory is refused before any work."""
    from unidml.errors import UserError

    out = Path(args.out) if args.out else Path(f"{Path(args.query).stem}_top{args.topk}.png")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; name a .png file")
    return out


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from unidml.engine.evaluator import embed_images
    from unidml.errors import UserError
    from unidml.evaluation import sharded_knn
    from unidml.evaluation.contact_sheet import Hit, write_contact_sheet
    from unidml.run_config import load_for_inference
    from unidml.runtime.device import choose_device
    from unidml.serving.queries import embed_queries

    query_path = Path(args.query)
    if args.topk <= 0:
        raise UserError(f"--topk must be > 0, got {args.topk}")
    out = output_path(args)
    model, cfg = load_for_inference(args.checkpoint, list(args.overrides))
    check_query(query_path, int(cfg.data.max_pixels))
    device = choose_device(str(cfg.engine.device))
    model.to(device)
    if args.index and args.gallery:
        raise UserError("--index and --gallery: give one of them")
    served = None
    if args.index:
        from unidml.serving.catalogue import open_index
        served = open_index(args.index, str(cfg.eval.metric))
        gallery, dataset = served.images, None
    else:
        gallery, dataset = (gallery_from_directory(args.gallery), None) if args.gallery else gallery_from_run(cfg)
    label = query_label(query_path, dataset) if dataset is not None else None
    cosine = str(cfg.eval.metric) == "cosine"

    query_vector = embed_queries(cfg, model, [str(query_path.resolve())], device).vectors
    if not len(query_vector):  # PIL reads it but the configured loader cannot (said in its warning)
        raise UserError(f"--query {query_path}: the data.backend={cfg.data.backend} loader cannot read it")
    # The query's own gallery index (if it is in the gallery) is excluded like a self-match.
    own = [i for i, p in enumerate(gallery.paths) if Path(p).resolve() == query_path.resolve()]
    if served is not None:
        k = min(args.topk, len(gallery) - len(own))
        label = int(gallery.labels[own[0]]) if own and gallery.labels[own[0]] >= 0 else None
        top = served.search(query_vector, k, exclude=own[:1])
    else:  # unreadable gallery images are left out (never hits); ids stay gallery positions
        found = embed_images(cfg, model, gallery, device, normalize=cosine)
        if len(found.indices) < len(gallery):
            print(f"{len(gallery) - len(found.indices)} unreadable gallery images left out")
        k = min(args.topk, len(found.indices) - int(bool(set(own[:1]) & set(found.indices.tolist()))))
        if k <= 0:
            raise UserError(f"--gallery: no readable gallery image besides the query ({len(gallery)} listed)")
        top = sharded_knn(query_vector, np.array(own[:1] or [-2]), found.vectors, found.indices, k,
                          self_retrieval=True, metric=str(cfg.eval.metric), device=device)
    hits = []
    for score, idx in zip(top.scores[0], top.ids[0]):
        caption = f"cos {score:.3f}" if cosine else f"dist {float(np.sqrt(max(-score, 0.0))):.3f}"
        correct = None if label is None else bool(gallery.labels[idx] == label)
        hits.append(Hit(gallery.paths[idx], caption, correct))
        mark = {None: "", True: "  same class", False: "  other class"}[correct]
        print(f"{len(hits):3d}  {caption}{mark}  {gallery.paths[idx]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_contact_sheet(str(query_path), hits, out)
    print(f"contact sheet written to {out}")
    return 0
