"""Smoke runs on one GPU: 20 engine steps each of DDP (NCCL, one process), DeepSpeed ZeRO-1 and
torch.compile of the embedding network.

Each trains a ResNet-18 embedding network with cross-entropy on one synthetic batch (32 x 128 px,
bf16) through unidml's backend and reports its first and last loss, whether every loss was finite
and the seconds taken (compilation included). Without DeepSpeed its entry says why; one failing run
is recorded and the others still run. Part (f) of bench/gpu_check.sh.

    python bench/smoke_gpu.py [--quick] [--out DIR] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import time
import traceback

from gpu_part import missing, part_args, run_part


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_run(backend_name: str, steps: int, compile_net: bool = False, deepspeed_json: str = "") -> dict:
    """`steps` engine steps through `engine.backend=backend_name`; losses summarised."""
    import torch
    from omegaconf import OmegaConf

    from unidml.config import RunConfig
    from unidml.engine.backends import build_backend
    from unidml.engine.distributed import DistEnv
    from unidml.engine.train_step import TrainStep
    from unidml.losses import build_loss
    from unidml.models import build_model

    device = torch.device("cuda", 0)
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.arch, cfg.model.pretrained, cfg.engine.precision = "resnet18", "", "bf16"
    cfg.engine.backend, cfg.engine.compile, cfg.engine.deepspeed_config = backend_name, compile_net, deepspeed_json
    cfg.train.batch_size, cfg.train.warmup_iters = 32, 0
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=128)
    module = TrainStep(model, build_loss("cross_entropy", num_classes=10, embedding_dim=model.embedding_dim)).to(device)
    backend = build_backend(module, cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=device), steps)
    images = torch.randn(32, 3, 128, 128, device=device)
    labels = torch.arange(32, device=device) % 10
    module.train()
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        with backend.sync(True):
            loss = backend.forward(images, labels)
            backend.backward(loss)
        backend.step()
        losses.append(loss.detach())
    values = torch.stack(losses).float().tolist()
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 2), "first_loss": round(values[0], 4),
            "last_loss": round(values[-1], 4), "finite": all(math.isfinite(v) for v in values)}


def guarded(fn, *args, **kwargs) -> dict:
    """`fn`'s result, or `{"failed": one line}` (the traceback goes to the part's log)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # recorded per run so the other runs still happen
        traceback.print_exc()
        return {"failed": f"{type(exc).__name__}: {exc}".splitlines()[0]}


def measure(args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    steps = 10 if args.quick else args.steps
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    result: dict = {}
    try:
        dist.init_process_group("nccl", rank=0, world_size=1)
        result["ddp_nccl"] = guarded(engine_run, "ddp", steps)
    except Exception as exc:
        result["ddp_nccl"] = {"failed": f"NCCL process group: {type(exc).__name__}: {exc}".splitlines()[0]}
    reason = missing("deepspeed")
    if reason is not None:
        result["deepspeed_zero1"] = {"skipped": reason}
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"zero_optimization": {"stage": 1}}, f)
        result["deepspeed_zero1"] = guarded(engine_run, "deepspeed", steps, deepspeed_json=f.name)
        os.unlink(f.name)
    if dist.is_initialized():
        dist.destroy_process_group()
    result["compile"] = guarded(engine_run, "single", steps, compile_net=True)
    result["all_finite"] = all(r.get("finite", False) for r in result.values() if "skipped" not in r)
    return result


if __name__ == "__main__":
    run_part("smoke", part_args(__doc__, extra_args), measure)
