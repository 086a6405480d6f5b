"""`unidml launch`: the torchrun or deepspeed command line for a cluster shape (printed, or run).

Example: `unidml launch --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node0:29500 -- train
--config configs/sop.yaml` prints the command to start on every node. A torchrun command gets
`engine.backend=ddp` appended unless the unidml arguments choose a backend; a deepspeed command gets
`--deepspeed CONFIG` unless given. DeepSpeed on more than one node needs `--hostfile`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess

from unidml.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--rdzv-endpoint", default="127.0.0.1:29500", help="HOST:PORT of the rendezvous / master")
    parser.add_argument("--rdzv-id", default="unidml", help="job id shared by all nodes (torchrun)")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of the whole group on a failure")
    parser.add_argument("--hostfile", default=None, help="deepspeed hostfile (one 'host slots=N' line per node)")
    parser.add_argument("--deepspeed-config", default="configs/deepspeed/zero1.json",
                        help="DeepSpeed JSON (deepspeed launcher)")
    parser.add_argument("--run", action="store_true", help="run the command instead of printing it")
    parser.add_argument("unidml_args", nargs=argparse.REMAINDER,
                        help="-- then the unidml command, e.g. -- train --config X")


def build_command(args: argparse.Namespace) -> list[str]:
    """The launcher command line as an argument list."""
    if args.nnodes < 1 or args.nproc_per_node < 1:
        raise UserError(f"--nnodes and --nproc-per-node must be >= 1, got {args.nnodes} and {args.nproc_per_node}")
    host, _, port = args.rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--rdzv-endpoint: expected HOST:PORT, got '{args.rdzv_endpoint}'")
    rest = [a for a in args.unidml_args if a != "--"] or ["train", "--config", "configs/quickstart.yaml"]
    training = rest[0] == "train"
    if args.launcher == "torchrun":
        if training and not any(a.startswith("engine.backend=") for a in rest) and "--deepspeed" not in rest:
            rest.append("engine.backend=ddp")
        return ["torchrun", "--nnodes", str(args.nnodes), "--nproc-per-node", str(args.nproc_per_node),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id,
                "--max-restarts", str(args.max_restarts), "-m", "unidml", *rest]
    if args.nnodes > 1 and not args.hostfile:
        raise UserError("--launcher deepspeed with --nnodes > 1 needs --hostfile (one 'host slots=N' line per node)")
    command = ["deepspeed"]
    if args.hostfile:
        command += ["--hostfile", args.hostfile]
    command += ["--num_nodes", str(args.nnodes), "--num_gpus", str(args.nproc_per_node),
                "--master_addr", host, "--master_port", port, "--module", "unidml", *rest]
    if training and "--deepspeed" not in rest:
        command += ["--deepspeed", args.deepspeed_config]
    return command


def run(args: argparse.Namespace) -> int:
    command = build_command(args)
    if not args.run:
        print(shlex.join(command))
        return 0
    return subprocess.call(command, env=os.environ.copy())
