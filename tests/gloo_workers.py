"""Shared by the sharded-evaluation tests: run a case function on one gloo rank and pickle what it returns."""
from __future__ import annotations

import os
import pickle
from typing import Any, Callable


def run_on_gloo_rank(cases: Callable[[int, int], Any], rank: int, world: int, port: int, out_dir: str) -> None:
    """`cases(rank, world)` inside a gloo group of `world` single-threaded ranks; the result goes to
    `out_dir/rank<rank>.pkl`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import faiss
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = cases(rank, world)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
