"""Backend selection, the DeepSpeed config completed from the run config, and `unidml launch` commands."""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from unidml.config import ConfigError, check_runtime
from unidml.engine.backends.deepspeed import deepspeed_config
from unidml.engine.distributed import DistEnv
from unidml.errors import UserError
from unidml.launcher.cli import build_parser, main
from unidml.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]


def cfg(*overrides: str):
    return load_run_config(REPO / "configs" / "quickstart.yaml", list(overrides))


def test_single_backend_refuses_several_processes():
    two = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(UserError, match="engine.backend=single but the launcher started 2 processes"):
        check_runtime(cfg(), two)
    check_runtime(cfg(), DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


@pytest.mark.parametrize("overrides, world, fragment", [
    (["engine.backend=ddp"], 1, "engine.backend=ddp needs a process group"),
    (["train.batch_size=64"], 3, "train.batch_size=64 is not divisible by the world size 3"),
    (["train.batch_size=8", "engine.embed_chunks=8"], 2, "engine.embed_chunks=8 exceeds the per-rank batch (4 images)"),
])
def test_runtime_rules_are_one_line_errors(overrides, world, fragment):
    env = DistEnv(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
        check_runtime(cfg(*overrides), env)
    assert "\n" not in str(info.value)


def write_json(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_deepspeed_config_is_completed_from_the_run_config(tmp_path):
    source = str(REPO / "configs" / "deepspeed" / "zero2.json")
    ds = deepspeed_config(cfg(f"engine.deepspeed_config={source}", "train.batch_size=128", "train.grad_accum=2",
                              "train.grad_clip=5.0", "engine.precision=bf16"), world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 256 and ds["gradient_clipping"] == 5.0
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_allow_untested_optimizer"] is True
    fp16 = deepspeed_config(cfg(f"engine.deepspeed_config={source}", "engine.precision=fp16"), world_size=1)
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    fp32 = deepspeed_config(cfg(f"engine.deepspeed_config={source}", "engine.precision=fp32"), 1)
    assert "torch_autocast" not in fp32


@pytest.mark.parametrize("data, fragment", [
    ({"train_micro_batch_size_per_gpu": 7}, "'train_micro_batch_size_per_gpu' is 7 but the run config gives 64"),
    ({"bf16": {"enabled": True}}, "enables DeepSpeed bf16 but engine.precision=fp32"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3"),
])
def test_deepspeed_config_conflicts_are_one_line_errors(tmp_path, data, fragment):
    path = write_json(tmp_path / "ds.json", data)
    with pytest.raises(UserError, match=fragment) as info:
        deepspeed_config(cfg(f"engine.deepspeed_config={path}", "engine.precision=fp32", "train.batch_size=128"),
                         world_size=2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, fragment", [
    (["engine.backend=deepspeed"], "engine.backend=deepspeed needs a DeepSpeed JSON"),
    (["engine.backend=deepspeed", "engine.deepspeed_config=x.json", "engine.embed_chunks=2"],
     "key 'engine.embed_chunks': not supported with engine.backend=deepspeed"),
    (["engine.backend=deepspeed", "engine.deepspeed_config=x.json", "engine.sync_bn=true"],
     "key 'engine.sync_bn': not supported with engine.backend=deepspeed"),
    (["engine.backend=deepspeed", "engine.deepspeed_config=x.json", "loss.name=cross_entropy",
      "loss.head_parallel=true"],
     "key 'loss.head_parallel': a class-sharded head is not supported with engine.backend=deepspeed"),
    (["eval.split=val", "data.val_classes=0"], "'val' needs a validation split"),
])
def test_static_cross_field_rules_fail_at_load(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        cfg(*overrides)
    assert "\n" not in str(info.value)


def test_deepspeed_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  'x': 1\n}")
    with pytest.raises(UserError, match="bad.json: invalid JSON \\(line 2\\)"):
        deepspeed_config(cfg(f"engine.deepspeed_config={bad}"), world_size=1)


def launch(capsys, *argv: str) -> list[str]:
    assert main(["launch", *argv]) == 0
    return shlex.split(capsys.readouterr().out)


def test_launch_prints_torchrun_and_deepspeed_commands(capsys):
    torchrun = launch(capsys, "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-endpoint", "node0:29500",
                      "--max-restarts", "3", "--", "train", "--config", "configs/sop.yaml", "train.lr=0.01")
    assert torchrun == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "node0:29500", "--rdzv-id", "unidml", "--max-restarts", "3", "-m", "unidml",
                        "train", "--config", "configs/sop.yaml", "train.lr=0.01", "engine.backend=ddp"]
    deepspeed = launch(capsys, "--launcher", "deepspeed", "--nnodes", "2", "--nproc-per-node", "4",
                       "--hostfile", "hosts", "--rdzv-endpoint", "node0:29600", "--", "train", "--config",
                       "configs/sop.yaml")
    assert deepspeed == ["deepspeed", "--hostfile", "hosts", "--num_nodes", "2", "--num_gpus", "4", "--master_addr",
                         "node0", "--master_port", "29600", "--module", "unidml", "train", "--config",
                         "configs/sop.yaml", "--deepspeed", "configs/deepspeed/zero1.json"]
    assert main(["launch", "--launcher", "deepspeed", "--nnodes", "2"]) == 2
    assert "needs --hostfile" in capsys.readouterr().err


def test_deepspeed_launcher_local_rank_before_the_subcommand_is_accepted():
    args = build_parser().parse_args(["--local_rank=1", "train", "--config", "x.yaml", "a.b=1"])
    assert args.launcher_local_rank == 1 and args.overrides == ["a.b=1"] and args.local_rank is None
