"""`unidml embed`'s work: embed a catalogue with a trained network in resumable chunks, spread over the ranks,
and write the embeddings file (`unidml.evaluation.embedding_files`).

Chunk c = input rows [c*size, (c+1)*size) is saved as soon as it is done, so an interrupted run continues
where it stopped when started again with the same checkpoint, images and chunk size.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from unidml.data_pipeline.readers import IMAGE_EXTENSIONS
from unidml.errors import UserError
from unidml.evaluation.embedding_files import sidecars, write_embeddings


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


def catalogue_images(cfg: Any, split: str | None, images: str | None) -> tuple[list[str], np.ndarray, str]:
    """(paths, labels, description) of what to embed: a split of the run's dataset, or a folder or list."""
    from unidml.serving.image_lists import images_from_folder, images_from_list

    if split:
        from unidml.data_pipeline import build_dataset

        dataset = build_dataset(cfg.data, seed=int(cfg.train.seed))
        if split not in dataset.splits:
            raise UserError(f"--split '{split}': dataset '{dataset.name}' has splits {', '.join(dataset.splits)}")
        chosen = dataset.splits[split]
        return list(chosen.paths), np.asarray(chosen.labels, np.int64), f"{dataset.name}:{split}"
    source = Path(images)
    if source.is_dir():
        paths, labels = images_from_folder(source)
    elif source.is_file():
        paths, labels = images_from_list(source)
    else:
        raise UserError(f"--images {images}: neither a folder nor a list file")
    if not paths:
        raise UserError(f"--images {images}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, np.asarray(labels, np.int64), str(source.resolve())


def embed_catalogue(checkpoint: str, out: str, *, split: str | None, images: str | None, chunk_size: int,
                    raw: bool, overrides: Sequence[str]) -> str | None:
    """Embed the catalogue (`split` of the checkpoint's dataset, or the folder/list `images`) into `out`
    (+ .tsv, .json); L2-normalised for a cosine run unless `raw`. The summary line on the main rank."""
    from tqdm import tqdm

    from unidml.data_pipeline.dataset import ImageSet
    from unidml.engine.distributed import init_distributed, shutdown
    from unidml.engine.evaluator import eval_loader
    from unidml.evaluation import extract_embeddings
    from unidml.run_config import load_for_inference
    from unidml.runtime.collectives import barrier
    from unidml.runtime.precision import precision_of

    if chunk_size <= 0:
        raise UserError(f"--chunk-size must be > 0, got {chunk_size}")
    model, cfg = load_for_inference(checkpoint, list(overrides))
    paths, labels, source = catalogue_images(cfg, split, images)
    normalize = not raw and str(cfg.eval.metric) == "cosine"
    npy, _, _ = sidecars(out)
    manifest = {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_bytes": Path(checkpoint).stat().st_size,
                "images": hashlib.sha1("\n".join(paths).encode()).hexdigest(), "count": len(paths),
                "chunk_size": chunk_size, "normalized": normalize}
    store = ChunkStore(Path(f"{npy}.parts"), manifest, len(paths), chunk_size)
    env = init_distributed(str(cfg.engine.device))
    summary = None
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
                part = ImageSet(f"chunk{chunk}", tuple(paths[i] for i in rows), labels[rows.start:rows.stop])
                loader = eval_loader(cfg, part, env.device)
                found = extract_embeddings(model, _counting(loader, bar), device=env.device,
                                           precision=precision_of(cfg), normalize=normalize)
                store.save(chunk, found.vectors, rows.start + found.indices)
        barrier()
        if env.is_main:
            meta = {"checkpoint": str(checkpoint), "source": source, "normalized": normalize,
                    "metric": str(cfg.eval.metric), "arch": str(cfg.model.arch)}
            vectors, kept = store.gather()
            written = write_embeddings(npy, vectors, [paths[i] for i in kept], labels[kept], meta)
            store.remove()
            left_out = f"; {len(paths) - len(kept)} unreadable image(s) left out" if len(kept) < len(paths) else ""
            summary = (f"{vectors.shape[0]} x {vectors.shape[1]} embeddings written to {written} (+ .tsv, .json)"
                       f"{left_out}")
        barrier()
    finally:
        shutdown(env)
    return summary
