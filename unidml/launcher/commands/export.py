"""`unidml export`: the embedding network of a checkpoint as ONNX or TorchScript, verified by running it.

    unidml export --checkpoint RUN/checkpoints/best.pt --format onnx --out model.onnx
    unidml export --checkpoint RUN/checkpoints/best.pt --format torchscript --out model.pt [--images DIR|LIST]

The exported network maps float32 images (batch, 3, S, S) — already resized, cropped and
normalised as the run's test transform does (S = data.image_size) — to embeddings (batch, d), the
network's output before any L2 normalisation. The batch axis is dynamic. After writing, the file is
loaded back (onnxruntime for ONNX, torch.jit for TorchScript) and run on a few images (the first
of the checkpoint's evaluation split, or of --images) at two batch sizes; the largest absolute
difference from PyTorch in float32 is printed, and the command fails when it exceeds --tolerance.
"""
from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from unidml.errors import UserError

FORMATS = ("onnx", "torchscript")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a unidml checkpoint (e.g. RUN/checkpoints/best.pt)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx or torchscript")
    parser.add_argument("--out", required=True, help="file to write (.onnx, or .pt for TorchScript)")
    parser.add_argument("--images", default=None, help="folder or list of images to verify with "
                                                       "(default: the checkpoint's evaluation split)")
    parser.add_argument("--num-images", type=int, default=4, help="images in the verification batch")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed absolute difference (fp32)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. data.root=DIR")


def sample_batch(cfg: Any, images_arg: str | None, count: int):
    """`count` images through the run's test transform: a float32 tensor (count, 3, S, S)."""
    import torch

    from unidml.data_pipeline import build_dataset
    from unidml.data_pipeline.dataset import ImageSet
    from unidml.engine.evaluator import eval_loader
    from unidml.launcher.commands.embed import images_from_folder, images_from_list

    if images_arg:
        source = Path(images_arg)
        if not source.exists():
            raise UserError(f"--images {images_arg}: neither a folder nor a list file")
        paths, _ = images_from_folder(source) if source.is_dir() else images_from_list(source)
    else:
        dataset = build_dataset(cfg.data, seed=int(cfg.train.seed))
        query_split = next(iter(dataset.eval_pairs.values()))[0]
        paths = list(dataset.splits[query_split].paths)
    if not paths:
        raise UserError(f"--images {images_arg}: no images")
    chosen = tuple(paths[:count])
    loader = eval_loader(cfg, ImageSet("export", chosen, np.zeros(len(chosen), np.int64)), torch.device("cpu"))
    batches = [images for images, _, _ in loader]
    if not batches:
        raise UserError(f"none of the {len(chosen)} verification images could be read")
    return torch.cat(batches).float().contiguous(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Silence the tracer's warnings: its constant-folded shape checks (a ViT's fixed input size) and
    the deprecation of torch.jit and of the TorchScript-based ONNX exporter. The export is verified by
    running it at two batch sizes instead."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def export_onnx(model: Any, example: Any, out: Path, opset: int) -> Callable[[np.ndarray], np.ndarray]:
    """Write `out` and return a function running it with onnxruntime."""
    import onnxruntime
    import torch

    with quiet_tracing():
        torch.onnx.export(model, (example,), str(out), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["embeddings"],
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})[0]


def export_torchscript(model: Any, example: Any, out: Path, opset: int) -> Callable[[np.ndarray], np.ndarray]:
    """Write `out` (traced) and return a function running the file loaded back."""
    import torch

    with quiet_tracing():
        torch.jit.trace(model, example, check_trace=False).save(str(out))
        loaded = torch.jit.load(str(out), map_location="cpu").eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(images)).numpy()
    return run


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}


def verify(model: Any, run_exported: Callable[[np.ndarray], np.ndarray], batch: Any) -> float:
    """Largest |exported - PyTorch| over the batch and over its first image alone (the dynamic batch axis)."""
    import torch

    worst = 0.0
    for images in (batch, batch[:1]):
        with torch.no_grad():
            expected = model(images).numpy()
        got = run_exported(images.numpy())
        if got.shape != expected.shape:
            raise UserError(f"exported network gives shape {got.shape} for a batch of {len(images)}, "
                            f"PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def run(args: argparse.Namespace) -> int:
    import torch

    from unidml.run_config import load_for_inference

    if args.num_images < 2:
        raise UserError(f"--num-images must be >= 2 (two batch sizes are verified), got {args.num_images}")
    if args.format == "onnx":
        import importlib.util
        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
            raise UserError("--format onnx needs the onnx and onnxruntime packages (pip install 'unidml[export]')")
    model, cfg = load_for_inference(args.checkpoint, list(args.overrides))
    model = model.float().eval().to("cpu")
    batch = sample_batch(cfg, args.images, args.num_images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        run_exported = EXPORTERS[args.format](model, batch, out, args.opset)
    worst = verify(model, run_exported, batch)
    print(f"{args.format} export written to {out}: input images (batch, 3, {batch.shape[2]}, {batch.shape[3]}) "
          f"-> embeddings (batch, {model.embedding_dim}); max abs difference vs PyTorch (fp32, batches of "
          f"{len(batch)} and 1): {worst:.3e}")
    if not worst <= args.tolerance:
        raise UserError(f"{out}: the export differs from PyTorch by {worst:.3e} > --tolerance {args.tolerance:g}")
    return 0
