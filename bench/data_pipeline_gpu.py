"""JPEG decode + augment img/s on one GPU: DALI `mixed` vs the torchvision loader, on the same files.

Writes photo-like JPEGs (bench/data_pipeline.py), then times one epoch of unidml's train loader
(RandomResizedCrop 0.16-1, flip; batch 64, 224 px, output on the GPU) for each backend after a
3-batch warm-up. Without DALI its column says why and torchvision is still timed. Part (e) of
bench/gpu_check.sh.

    python bench/data_pipeline_gpu.py [--quick] [--out DIR] [--images 3000] [--threads 8]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from gpu_part import missing, part_args, run_part


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=8, help="torchvision num_workers = DALI num_threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="side of the written JPEGs")


def measure(args: argparse.Namespace) -> dict:
    from data_pipeline import measure as loader_rate
    from data_pipeline import write_images

    images = 800 if args.quick else args.images
    timing = argparse.Namespace(threads=args.threads, batch=args.batch, device="cuda")
    result: dict = {"images": images, "threads": args.threads, "batch": args.batch, "jpeg_side": args.size,
                    "recipe": "train (RRC 0.16-1, flip), 224 px"}
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), images, args.size)
        tv, _ = loader_rate(Path(tmp), "torchvision", "train", {}, timing)
        result["torchvision_images_per_s"] = round(tv, 1)
        reason = missing("nvidia.dali")
        if reason is not None:
            result["dali"] = {"skipped": reason}
            return result
        dali, _ = loader_rate(Path(tmp), "dali", "train", {}, timing)
    result.update(dali_images_per_s=round(dali, 1), dali_over_torchvision=round(dali / tv, 3))
    return result


if __name__ == "__main__":
    run_part("data_pipeline", part_args(__doc__, extra_args), measure)
