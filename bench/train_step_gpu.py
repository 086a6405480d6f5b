"""GPU training-step time: ResNet-50 embedding network + cross-entropy, bf16 autocast, channels_last.

Synthetic tensors (batch 128, 224 px, 100 classes; no data loading), the paper's network (frozen
BN2d, 2048-d embedding, BN1d) and unidml's fused SGD: times `--steps` steps after `--warmup`
steps with CUDA synchronisation, and prints one JSON line (also written to OUT/train_step_gpu.json
with `--out OUT`, default $OUT). Without CUDA it reports that and exits 0. Called by bench/gpu_check.sh.

    python bench/train_step_gpu.py [--batch 128] [--image-size 224] [--steps 20] [--warmup 5]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from unidml.config import ModelConfig, TrainConfig
from unidml.engine.optim import build_optimizer
from unidml.losses import build_loss
from unidml.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=os.environ.get("OUT", ""),
                        help="directory for train_step_gpu.json (default: $OUT)")
    args = parser.parse_args()
    result: dict = {"bench": "train_step_gpu", "arch": "resnet50", "batch": args.batch, "image_size": args.image_size,
                    "precision": "bf16", "channels_last": True}
    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA device"
    else:
        result.update(measure(args))
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out, "train_step_gpu.json").write_text(line + "\n")


def measure(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"arch": "resnet50", "pretrained": ""})
    model = build_model(model_cfg)
    loss_fn = build_loss("cross_entropy", num_classes=args.classes, embedding_dim=model.embedding_dim)
    module = torch.nn.ModuleDict({"model": model, "loss": loss_fn}).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(module, OmegaConf.structured(TrainConfig))
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    module.train()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    return {"device": torch.cuda.get_device_name(device), "step_ms": round(1000 * seconds, 2),
            "images_per_s": round(args.batch / seconds, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "torch": torch.__version__}


if __name__ == "__main__":
    main()
