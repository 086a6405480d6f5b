"""ResNet-50 bf16 training step in img/s: unidml's engine vs a plain PyTorch loop, on one GPU.

Both train the paper's network (frozen BN2d, 2048-d embedding, BN1d) with a cross-entropy head on
the same synthetic batch (128 x 224 px, 100 classes; no data loading), bf16 autocast, channels_last,
fused SGD. The engine path is what `unidml train` runs per step (`TrainStep` inside the `single`
backend: loss, backward, gradient norm, step, schedule); the plain loop is model -> F.linear ->
F.cross_entropy -> backward -> fused SGD step. Reports both, their ratio, and NVIDIA
DeepLearningExamples' ResNet-50 figure quoted beside them (a different recipe: classification
training, for scale only). Part (a) of bench/gpu_check.sh; without CUDA it writes a skip.

    python bench/train_step_gpu.py [--quick] [--out DIR] [--batch 128] [--steps 30]
"""
from __future__ import annotations

import argparse

from gpu_part import cuda_seconds, part_args, run_part

REFERENCE = {"images_per_s": 2470, "source": "NVIDIA DeepLearningExamples ResNet-50 v1.5, PyTorch, "
             "one A100-80GB, AMP (its training performance table)"}


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30)


def engine_seconds(cfg, images, labels, steps: int) -> float:
    """Seconds per step of what `unidml train` runs: `TrainStep` inside the `single` backend."""
    import torch

    from unidml.engine.backends import build_backend
    from unidml.engine.distributed import DistEnv
    from unidml.engine.train_step import TrainStep
    from unidml.losses import build_loss
    from unidml.models import build_model

    model = build_model(cfg.model)
    loss = build_loss("cross_entropy", num_classes=int(labels.max()) + 1, embedding_dim=model.embedding_dim)
    module = TrainStep(model, loss).to(images.device, memory_format=torch.channels_last)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=images.device)
    backend = build_backend(module, cfg, env, total_steps=steps + 5)
    module.train()

    def engine_step() -> None:
        with backend.sync(True):
            backend.backward(backend.forward(images, labels))
        backend.step()

    return cuda_seconds(engine_step, steps, warmup=3)


def measure(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from unidml.config import RunConfig
    from unidml.models import build_model

    steps = 10 if args.quick else args.steps
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.arch, cfg.model.pretrained, cfg.engine.precision = "resnet50", "", "bf16"
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(args.batch, device=device) % args.classes  # every class present

    engine_s = engine_seconds(cfg, images, labels, steps)
    torch.cuda.empty_cache()

    net = build_model(cfg.model).to(device, memory_format=torch.channels_last)
    head = torch.nn.Linear(net.embedding_dim, args.classes, bias=False, device=device)
    params = [*net.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=5e-4, fused=True)
    net.train()

    def plain_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = F.cross_entropy(F.linear(net(images), head.weight), labels)
        out.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats(device)
    plain_s = cuda_seconds(plain_step, steps, warmup=3)
    return {"batch": args.batch, "image_size": args.image_size, "steps": steps, "precision": "bf16",
            "channels_last": True, "engine_images_per_s": round(args.batch / engine_s, 1),
            "plain_images_per_s": round(args.batch / plain_s, 1), "engine_over_plain": round(plain_s / engine_s, 3),
            "reference": REFERENCE}


if __name__ == "__main__":
    run_part("train_step", part_args(__doc__, extra_args), measure)
