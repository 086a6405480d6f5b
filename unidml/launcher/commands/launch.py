"""`unidml launch`: the torchrun or deepspeed command line for a cluster shape (printed, or run).

Example: `unidml launch --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node0:29500 -- train
--config configs/sop.yaml` prints the command to start on every node.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--rdzv-endpoint", default="127.0.0.1:29500", help="HOST:PORT of the rendezvous / master")
    parser.add_argument("--rdzv-id", default="unidml", help="job id shared by all nodes (torchrun)")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of the whole group on a failure")
    parser.add_argument("--hostfile", default=None, help="deepspeed hostfile (one 'host slots=N' line per node)")
    parser.add_argument("--deepspeed-config", default="configs/deepspeed/zero1.json", help="DeepSpeed JSON (deepspeed launcher)")
    parser.add_argument("--run", action="store_true", help="run the command instead of printing it")
    parser.add_argument("unidml_args", nargs=argparse.REMAINDER, help="-- then the unidml command, e.g. -- train --config X")


def build_command(args: argparse.Namespace) -> list[str]:
    """The launcher command line as an argument list."""
    rest = [a for a in args.unidml_args if a != "--"] or ["train", "--config", "configs/quickstart.yaml"]
    host, _, port = args.rdzv_endpoint.rpartition(":")
    if args.launcher == "torchrun":
        return ["torchrun", "--nnodes", str(args.nnodes), "--nproc-per-node", str(args.nproc_per_node),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id,
                "--max-restarts", str(args.max_restarts), "-m", "unidml", *rest]
    command = ["deepspeed"]
    if args.hostfile:
        command += ["--hostfile", args.hostfile]
    command += ["--num_nodes", str(args.nnodes), "--num_gpus", str(args.nproc_per_node),
                "--master_addr", host, "--master_port", port, "--module", "unidml", *rest]
    if "--deepspeed" not in rest:
        command += ["--deepspeed", args.deepspeed_config]
    return command


def run(args: argparse.Namespace) -> int:
    command = build_command(args)
    if not args.run:
        print(shlex.join(command))
        return 0
    return subprocess.call(command, env=os.environ.copy())
