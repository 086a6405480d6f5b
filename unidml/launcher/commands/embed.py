"""`unidml embed`: embeddings of a catalogue of images with a trained checkpoint.

    unidml embed --checkpoint RUN/checkpoints/best.pt --split test --out emb.npy
    unidml embed --checkpoint RUN/checkpoints/best.pt --images DIR|LIST --out emb.npy [--chunk-size 8192]
    torchrun --nproc_per_node 4 -m unidml embed ...     # each rank embeds its share of the chunks

Writes `emb.npy` (N x d float32, in input order), `emb.tsv` (`path<TAB>label` per row, with a
header) and `emb.json` (checkpoint, dimension, whether the rows are L2-normalised, similarity).
The images go through the run's test transform and precision, exactly as evaluation embeds them;
with a cosine run the rows are L2-normalised (`--raw` keeps the network's output). `--split`
takes a split of the checkpoint's own dataset (train, test, val, query, gallery); `--images` a
folder (every image below it; label = index of its first-level sub-folder in sorted order, -1
for images directly in it) or a list file (`path[,label]` per line, relative paths from the
list's folder). Work is saved in chunks under `emb.npy.parts/`: an interrupted run continues
where it stopped when started again with the same arguments. Unreadable images are left out
(their paths are logged), so the .tsv says which image each row is.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from unidml.data_pipeline.readers import IMAGE_EXTENSIONS
from unidml.errors import UserError
from unidml.evaluation.embedding_files import sidecars, write_embeddings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a unidml checkpoint (e.g. RUN/checkpoints/best.pt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images, or list file of `path[,label]` lines")
    source.add_argument("--split", help="a split of the checkpoint's dataset: train, test, val, query, gallery")
    parser.add_argument("--out", required=True, help="embeddings .npy (the .tsv and .json are written beside it)")
    parser.add_argument("--chunk-size", type=int, default=8192, help="images per saved chunk (resume granularity)")
    parser.add_argument("--raw", action="store_true", help="do not L2-normalise (default: normalise for cosine runs)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. eval.batch_size=64")


# ------------------------------------------------------------------------------------------ inputs
def images_from_folder(folder: Path) -> tuple[list[str], list[int]]:
    """Every image below `folder` (sorted); label = index of its first-level sub-folder, -1 at the top."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    classes = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[p.relative_to(folder).parts[0]] if len(p.relative_to(folder).parts) > 1 else -1 for p in files]
    return [str(p.resolve()) for p in files], labels


def images_from_list(list_file: Path) -> tuple[list[str], list[int]]:
    """`path[,label]` (or tab-separated) lines; relative paths start at the list's folder; header `path` skipped."""
    paths, labels = [], []
    with open(list_file, encoding="utf-8", newline="") as handle:
        first = handle.readline()
        handle.seek(0)
        for number, fields in enumerate(csv.reader(handle, delimiter="\t" if "\t" in first else ","), start=1):
            fields = [f.strip() for f in fields]
            if not any(fields) or (number == 1 and fields[0].lower() == "path"):
                continue
            if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
                raise UserError(f"{list_file}:{number}: expected 'path' or 'path,label' with an integer label")
            paths.append(str((list_file.parent / fields[0]).resolve()))
            labels.append(int(fields[1]) if len(fields) == 2 else -1)
    return paths, labels


def input_images(args: argparse.Namespace, cfg: Any) -> tuple[list[str], np.ndarray, str]:
    """(paths, labels, description) of what to embed."""
    if args.split:
        from unidml.data_pipeline import build_dataset

        dataset = build_dataset(cfg.data, seed=int(cfg.train.seed))
        if args.split not in dataset.splits:
            raise UserError(f"--split '{args.split}': dataset '{dataset.name}' has splits {', '.join(dataset.splits)}")
        images = dataset.splits[args.split]
        return list(images.paths), np.asarray(images.labels, np.int64), f"{dataset.name}:{args.split}"
    source = Path(args.images)
    if source.is_dir():
        paths, labels = images_from_folder(source)
    elif source.is_file():
        paths, labels = images_from_list(source)
    else:
        raise UserError(f"--images {args.images}: neither a folder nor a list file")
    if not paths:
        raise UserError(f"--images {args.images}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, np.asarray(labels, np.int64), str(source.resolve())


# ------------------------------------------------------------------------------------------ chunks
class ChunkStore:
    """Chunk c = input rows [c*size, (c+1)*size), saved as `part-c.npz` (the vectors and their row numbers;
    unreadable images have no row) in `folder`, tied to its inputs by a manifest."""

    def __init__(self, folder: Path, manifest: dict[str, Any], count: int, size: int) -> None:
        self.folder, self.manifest, self.count, self.size = folder, manifest, count, size
        self.chunks = -(-count // size)

    def part(self, chunk: int) -> Path:
        return self.folder / f"part-{chunk:06d}.npz"

    def rows(self, chunk: int) -> range:
        return range(chunk * self.size, min(self.count, (chunk + 1) * self.size))

    def open(self) -> None:
        """Create the folder and manifest, or check that an existing one was made for the same inputs."""
        path = self.folder / "manifest.json"
        if path.is_file():
            if json.loads(path.read_text()) != self.manifest:
                raise UserError(f"{self.folder}: holds chunks of another embedding run (other checkpoint, images "
                                f"or chunk size); remove it or choose another --out")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.manifest, indent=2) + "\n")

    def done(self, chunk: int) -> bool:
        return self.part(chunk).is_file()

    def save(self, chunk: int, vectors: np.ndarray, rows: np.ndarray) -> None:
        with open(f"{self.part(chunk)}.tmp", "wb") as handle:
            np.savez(handle, vectors=vectors, rows=rows)
        os.replace(f"{self.part(chunk)}.tmp", self.part(chunk))

    def gather(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, input row numbers) of every chunk, in input order."""
        parts = [part for part in map(np.load, map(self.part, range(self.chunks))) if len(part["rows"])]
        if not parts:
            raise UserError(f"{self.folder}: none of the {self.count} images could be read")
        return np.concatenate([p["vectors"] for p in parts]), np.concatenate([p["rows"] for p in parts])

    def remove(self) -> None:
        for chunk in range(self.chunks):
            self.part(chunk).unlink()
        (self.folder / "manifest.json").unlink()
        self.folder.rmdir()


def _counting(loader: Any, bar: Any) -> Iterator:
    """The loader's batches, advancing the progress bar by each batch's size."""
    for batch in loader:
        bar.update(len(batch[0]))
        yield batch


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from unidml.data_pipeline.dataset import ImageSet
    from unidml.engine.distributed import init_distributed, shutdown
    from unidml.engine.evaluator import eval_loader
    from unidml.evaluation import extract_embeddings
    from unidml.run_config import load_for_inference
    from unidml.runtime.collectives import barrier
    from unidml.runtime.precision import precision_of

    if args.chunk_size <= 0:
        raise UserError(f"--chunk-size must be > 0, got {args.chunk_size}")
    model, cfg = load_for_inference(args.checkpoint, list(args.overrides))
    paths, labels, source = input_images(args, cfg)
    normalize = not args.raw and str(cfg.eval.metric) == "cosine"
    npy, _, _ = sidecars(args.out)
    manifest = {"checkpoint": str(Path(args.checkpoint).resolve()),
                "checkpoint_bytes": Path(args.checkpoint).stat().st_size,
                "images": hashlib.sha1("\n".join(paths).encode()).hexdigest(), "count": len(paths),
                "chunk_size": args.chunk_size, "normalized": normalize}
    store = ChunkStore(Path(f"{npy}.parts"), manifest, len(paths), args.chunk_size)
    env = init_distributed(str(cfg.engine.device))
    try:
        if env.is_main:
            store.open()
        barrier()
        store.open()  # every rank checks the manifest rank 0 found or wrote
        mine = [c for c in range(store.chunks) if c % env.world_size == env.rank and not store.done(c)]
        model.to(env.device)
        with tqdm(total=sum(len(store.rows(c)) for c in mine), unit="img", disable=not env.is_main,
                  desc=f"embedding {len(paths)} images"
                  + (f" (rank 0 of {env.world_size})" if env.distributed else "")) as bar:
            for chunk in mine:
                rows = store.rows(chunk)
                images = ImageSet(f"chunk{chunk}", tuple(paths[i] for i in rows), labels[rows.start:rows.stop])
                loader = eval_loader(cfg, images, env.device)
                found = extract_embeddings(model, _counting(loader, bar), device=env.device,
                                           precision=precision_of(cfg), normalize=normalize)
                store.save(chunk, found.vectors, rows.start + found.indices)
        barrier()
        if env.is_main:
            meta = {"checkpoint": str(args.checkpoint), "source": source, "normalized": normalize,
                    "metric": str(cfg.eval.metric), "arch": str(cfg.model.arch)}
            vectors, kept = store.gather()
            out = write_embeddings(npy, vectors, [paths[i] for i in kept], labels[kept], meta)
            store.remove()
            left_out = f"; {len(paths) - len(kept)} unreadable image(s) left out" if len(kept) < len(paths) else ""
            print(f"{vectors.shape[0]} x {vectors.shape[1]} embeddings written to {out} (+ .tsv, .json){left_out}")
        barrier()
    finally:
        shutdown(env)
    return 0
