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
from pathlib import Path

from unidml.registry import EXPORT_FORMATS
from unidml.serving import export as _export  # its import registers the export formats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a unidml checkpoint (e.g. RUN/checkpoints/best.pt)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS.names(), help="onnx or torchscript")
    parser.add_argument("--out", required=True, help="file to write (.onnx, or .pt for TorchScript)")
    parser.add_argument("--images", default=None, help="folder or list of images to verify with "
                                                       "(default: the checkpoint's evaluation split)")
    parser.add_argument("--num-images", type=int, default=4, help="images in the verification batch")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed absolute difference (fp32)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. data.root=DIR")


def run(args: argparse.Namespace) -> int:
    print(_export.export_checkpoint(args.checkpoint, args.format, Path(args.out), images=args.images,
                                    num_images=args.num_images, opset=args.opset, tolerance=args.tolerance,
                                    overrides=args.overrides))
    return 0
