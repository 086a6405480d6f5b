"""Training throughput: the unidml engine vs a plain hand-written PyTorch loop, same model, data and batches.

Both loops consume the same `TrainLoader` (so data loading costs the same), the same embedding
network, loss and SGD; the plain loop is forward / loss / backward / step and nothing else. The
engine adds autocast, loss-term logging, gradient-norm clipping and the non-finite check, the LR
schedule and TensorBoard scalars. Prints one JSON line: images/s of each, their ratio, and the
engine's data-wait share.

    python bench/train_throughput.py [--steps 12] [--batch 32] [--image-size 64] [--arch resnet18]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from unidml.engine.distributed import init_distributed
from unidml.engine.optim import build_optimizer
from unidml.engine.trainer import Trainer
from unidml.losses import build_loss_from_config
from unidml.models import build_model
from unidml.run_config import load_run_config
from unidml.runtime.precision import precision_of

REPO = Path(__file__).resolve().parents[1]


def engine_trainer(args: argparse.Namespace, workdir: Path) -> Trainer:
    images = args.batch * (args.steps + 1)
    overrides = [f"data.root={workdir / 'data'}", "data.synthetic.classes=16",
                 f"data.synthetic.per_class={2 * images // 16 + 1}", f"data.synthetic.size={args.image_size}",
                 f"data.image_size={args.image_size}", f"data.resize_size={args.image_size}",
                 f"data.num_workers={args.workers}", f"data.backend={args.data_backend}", f"model.arch={args.arch}",
                 f"train.batch_size={args.batch}", "train.epochs=2", f"engine.precision={args.precision}",
                 "eval.batch_size=256"]
    cfg = load_run_config(REPO / "configs" / "quickstart.yaml", overrides)
    return Trainer(cfg, workdir / "run", init_distributed("cpu" if not torch.cuda.is_available() else "auto"))


def plain_loop(trainer: Trainer) -> float:
    """Images/s of forward + loss + backward + SGD step over the trainer's own loader and a fresh model."""
    cfg = trainer.cfg
    model = build_model(cfg.model, image_size=cfg.data.image_size).to(trainer.device)
    loss_fn = build_loss_from_config(OmegaConf.to_container(cfg.loss, resolve=True),
                                     num_classes=trainer.dataset.train.num_classes,
                                     embedding_dim=model.embedding_dim).to(trainer.device)
    module = torch.nn.ModuleDict({"model": model, "loss": loss_fn})
    if cfg.engine.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(module, cfg.train)
    precision = precision_of(cfg)
    module.train()
    trainer.loader.set_epoch(2)  # a fresh epoch (the engine just finished epoch 1)
    seen, start = 0, time.perf_counter()  # a whole epoch, as the engine's figure (both loops are warm)
    for images, labels in trainer.loader:
        if cfg.engine.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with precision.autocast(trainer.device):
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(images)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def engine_loop(trainer: Trainer) -> tuple[float, float]:
    """Images/s and data-wait % of `Trainer.train_epoch` on epoch 1 (epoch 0 warms up)."""
    trainer.train_epoch(0)
    trainer.train_epoch(1)
    throughput = trainer.record.throughput
    return throughput["images_per_s"], throughput["data_wait_pct"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="steps per epoch (one timed epoch per measurement)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--data-backend", default="torchvision", choices=("torchvision", "dali"))
    parser.add_argument("--repeats", type=int, default=2, help="alternating engine/plain measurements; best of each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = engine_trainer(args, Path(tmp))
        engine, plain, wait = [], [], []
        for _ in range(args.repeats):
            rate, data_wait = engine_loop(trainer)
            engine.append(rate)
            wait.append(data_wait)
            plain.append(plain_loop(trainer))
        trainer.record.close()
    result = {"device": str(trainer.device), "threads": torch.get_num_threads(), "arch": args.arch,
              "batch": args.batch, "image_size": args.image_size, "precision": args.precision,
              "data_backend": args.data_backend, "engine_images_per_s": round(max(engine), 2),
              "plain_images_per_s": round(max(plain), 2), "engine_over_plain": round(max(engine) / max(plain), 3),
              "engine_data_wait_pct": round(min(wait), 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
