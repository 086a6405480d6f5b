"""The embedding network of a checkpoint as ONNX or TorchScript (`unidml export`), verified by running it.

The exported network maps float32 images (batch, 3, S, S) — already resized, cropped and normalised as
the run's test transform does — to embeddings (batch, d) before any L2 normalisation; the batch axis is
dynamic. A format registers in `unidml.registry.EXPORT_FORMATS` as `(model, example, out, opset) -> run`,
where `run(images)` executes the written file (onnxruntime, torch.jit) for the verification.
"""
from __future__ import annotations

import contextlib
import importlib.util
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from unidml.errors import UserError
from unidml.registry import EXPORT_FORMATS


def sample_batch(cfg: Any, images_arg: str | None, count: int):
    """`count` images through the run's test transform: a float32 tensor (count, 3, S, S)."""
    import torch

    from unidml.data_pipeline import build_dataset
    from unidml.data_pipeline.dataset import ImageSet
    from unidml.engine.evaluator import eval_loader
    from unidml.serving.image_lists import images_from_folder, images_from_list

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


@EXPORT_FORMATS.register("onnx")
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


@EXPORT_FORMATS.register("torchscript")
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


def export_checkpoint(checkpoint: str, fmt: str, out: Path, *, images: str | None, num_images: int, opset: int,
                      tolerance: float, overrides: Sequence[str]) -> str:
    """Write the checkpoint's network as `fmt` to `out`, run it back on `num_images` images at two batch sizes
    and return the summary line; a difference above `tolerance` (fp32) is a one-line error."""
    import torch

    from unidml.run_config import load_for_inference

    if num_images < 2:
        raise UserError(f"--num-images must be >= 2 (two batch sizes are verified), got {num_images}")
    if fmt == "onnx" and (importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None):
        raise UserError("--format onnx needs the onnx and onnxruntime packages (pip install 'unidml[export]')")
    model, cfg = load_for_inference(checkpoint, list(overrides))
    model = model.float().eval().to("cpu")
    batch = sample_batch(cfg, images, num_images)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        run_exported = EXPORT_FORMATS.get(fmt)(model, batch, out, opset)
    worst = verify(model, run_exported, batch)
    if not worst <= tolerance:
        raise UserError(f"{out}: the export differs from PyTorch by {worst:.3e} > --tolerance {tolerance:g}")
    return (f"{fmt} export written to {out}: input images (batch, 3, {batch.shape[2]}, {batch.shape[3]}) "
            f"-> embeddings (batch, {model.embedding_dim}); max abs difference vs PyTorch (fp32, batches of "
            f"{len(batch)} and 1): {worst:.3e}")
