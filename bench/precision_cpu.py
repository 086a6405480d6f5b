"""Training-step time of the quickstart's network on this CPU in fp32 and under bf16 autocast, and what
`engine.precision=auto` picks here.

A CPU whose oneDNN has bf16 kernels (AVX-512 and newer) runs bf16 convolutions natively; an AVX2-only
CPU emulates them, and `auto` falls back to fp32 there. The step is the engine's (channels-last
ResNet-18 with its embedding head, the quickstart's batch 64 at 56 px, SGD with Nesterov momentum),
timed after warm-up steps; the ratio is measured in the same run. Prints one JSON line.

    python bench/precision_cpu.py [--steps 5] [--warmup 2] [--batch 64] [--image-size 56]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from unidml.models import build_model
from unidml.run_config import load_run_config
from unidml.runtime.precision import Precision, native_bf16, resolve_precision


def step_seconds(precision: Precision, args: argparse.Namespace) -> list[float]:
    """Seconds of each timed forward + backward + SGD step under `precision` (fresh seeded model)."""
    torch.manual_seed(0)
    cfg = load_run_config(None, ["model.arch=resnet18", 'model.pretrained=""', "model.feature_bn=false"])
    model = build_model(cfg.model, image_size=args.image_size).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size).to(memory_format=torch.channels_last)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with precision.autocast("cpu"):
            embeddings = model(images)
        embeddings.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=56)
    args = parser.parse_args()
    medians = {name: statistics.median(step_seconds(Precision(name), args)) for name in ("fp32", "bf16")}
    print(json.dumps({
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "native_bf16": native_bf16("cpu"), "auto_picks": resolve_precision("auto", "cpu"),
        "config": vars(args),
        "fp32_step_s": round(medians["fp32"], 3), "bf16_step_s": round(medians["bf16"], 3),
        "bf16_over_fp32": round(medians["bf16"] / medians["fp32"], 2)}))


if __name__ == "__main__":
    main()
