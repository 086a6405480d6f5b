"""Images/s of the DALI vs torchvision loaders on the same JPEGs, same recipe, same CPU threads.

    python bench/data_pipeline.py [--images 2000] [--threads 2] [--batch 64] [--size 224] [--repeats 3]

Writes `--images` photo-like JPEGs (size x size) into a temp dir (SOP layout), then times one epoch
of `build_train_loader` (train recipe) and `build_eval_loader` (test recipe) for each backend after
a 3-batch warm-up, in this one process (median of `--repeats`, backends alternating). Prints
images/s and the DALI/torchvision ratio, plus images per CPU-second (this process and its worker
processes; psutil), which a busy machine still measures fairly. Use a few thousand images: both
backends prefetch a few batches, which inflates short runs. The thread count is torchvision's
`num_workers` and DALI's `num_threads` (both from `data.num_workers`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from unidml.config import DataConfig
from unidml.data_pipeline import build_dataset, build_eval_loader, build_train_loader

RECIPES = {
    "train (RRC 0.16-1, flip, jitter .25)": dict(color_jitter=[0.25, 0.25, 0.25, 0.0]),
    "train (RRC 0.16-1, flip)": dict(),
    "test (resize 256, center 224)": dict(),
}


def write_images(root: Path, count: int, size: int, classes: int = 50) -> None:
    """Photo-like content: upsampled smooth noise plus fine texture, JPEG quality 90."""
    rng = np.random.default_rng(0)
    lines = ["image_id class_id super_class_id path"]
    for i in range(count):
        coarse = rng.integers(0, 255, size=(size // 16, size // 16, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
        texture = rng.integers(-12, 12, size=(size, size, 3), dtype=np.int16)
        rel = f"img/{i % classes}/{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8)).save(root / rel, quality=90)
        lines.append(f"{i + 1} {i % classes + 1} 1 {rel}")
    (root / "Ebay_train.txt").write_text("\n".join(lines) + "\n")
    (root / "Ebay_test.txt").write_text("\n".join(lines) + "\n")


def cpu_seconds() -> float:
    """User+system CPU time of this process and its live children (DataLoader workers); NaN without
    psutil (the GPU check's part times wall seconds only)."""
    try:
        import psutil
    except ImportError:
        return float("nan")

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def throughput(loader, warmup_batches: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) over the batches after the warm-up."""
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    start, cpu_start, seen = time.perf_counter(), cpu_seconds(), 0
    for item in it:
        seen += item[0].shape[0]
    cpu = cpu_seconds() - cpu_start  # measured while the workers are still alive
    return seen / (time.perf_counter() - start), seen / cpu


def measure(root: Path, backend: str, recipe: str, extra: dict, args: argparse.Namespace) -> tuple[float, float]:
    cfg = OmegaConf.structured(DataConfig(dataset="sop", root=str(root), backend=backend,
                                          num_workers=args.threads, **extra))
    ds = build_dataset(cfg)
    device = torch.device(args.device)
    if recipe.startswith("train"):
        loader = build_train_loader(cfg, ds.train, global_batch_size=args.batch, rank=0, world_size=1, seed=0,
                                    run_dir=None, device=device)
    else:
        loader = build_eval_loader(cfg, ds.splits["test"], batch_size=args.batch, rank=0, world_size=1,
                                   device=device)
    return throughput(loader, warmup_batches=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per backend and recipe (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collates; the loaders own the decode threads
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root, args.images, args.size)
        print(f"{args.images} JPEGs {args.size}x{args.size}, batch {args.batch}, {args.threads} threads, "
              f"device {args.device}, median of {args.repeats}; load average before: {os.getloadavg()[0]:.1f}")
        for recipe, extra in RECIPES.items():
            runs: dict[str, list[tuple[float, float]]] = {"torchvision": [], "dali": []}
            for r in range(args.repeats):  # alternate the order so drifting machine load hits both
                for backend in ("torchvision", "dali") if r % 2 == 0 else ("dali", "torchvision"):
                    runs[backend].append(measure(root, backend, recipe, extra, args))
            (tv_wall, tv_cpu), (dali_wall, dali_cpu) = (
                tuple(statistics.median(v[k] for v in runs[b]) for k in (0, 1)) for b in ("torchvision", "dali"))
            print(f"{recipe:<38} img/s: torchvision {tv_wall:6.1f}  dali {dali_wall:6.1f}  "
                  f"ratio {dali_wall / tv_wall:.2f}x   | img/CPU-s: torchvision {tv_cpu:6.1f}  "
                  f"dali {dali_cpu:6.1f}  ratio {dali_cpu / tv_cpu:.2f}x")
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
