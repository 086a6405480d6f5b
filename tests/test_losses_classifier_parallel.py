"""Class-sharded head: 2 and 3 gloo ranks equal one process on the concatenated batch; checkpoints re-shard.

Tolerance 1e-5 relative: the sharded path sums the same fp32 terms in another order (per-shard
log-sum-exps combined through an all-reduced max and sum-exp), a few ulps apart.
"""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unidml.kernels.classifier.head import (
    ClassifierHead,
    class_sharded_names,
    gather_optimizer_state,
    slice_optimizer_state,
)
from unidml.kernels.classifier.proxy_anchor import proxy_anchor_terms
from unidml.kernels.classifier.softmax import SoftmaxSpec, softmax_terms

N_PER_RANK, DIM, CLASSES = 4, 6, 11  # 11 classes: uneven shards at 2 and 3 ranks
CASES = {  # name -> (bias, terms(head, z, y))
    "ce": (True, lambda h, z, y: softmax_terms(h, z, y, SoftmaxSpec(scale=2.0, label_smoothing=0.1), "tiled", 4)),
    "arcface": (False, lambda h, z, y: softmax_terms(
        h, z, y, SoftmaxSpec(scale=16.0, normalized=True, margin_kind="arcface", margin=0.4), "tiled", 3)),
    "proxy_anchor": (False, lambda h, z, y: proxy_anchor_terms(h, z, y, 32.0, 0.1, "tiled", 2)),
}


def _batch(world):
    gen = torch.Generator().manual_seed(5)
    n = N_PER_RANK * world
    return torch.randn(n, DIM, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def _head(bias, parallel):
    torch.manual_seed(0)  # the full weight is drawn identically, then sliced, at every world size
    head = ClassifierHead(CLASSES, DIM, bias=bias, parallel=parallel, init=torch.nn.init.normal_)
    if bias:
        with torch.no_grad():
            head.bias.copy_(torch.linspace(-1, 1, CLASSES)[head.shard.start:head.shard.end])
    return head


class _Step(torch.nn.Module):
    """A tiny embedding network and a sharded-head cross-entropy, as the trainer's TrainStep holds them."""

    def __init__(self, parallel):
        super().__init__()
        torch.manual_seed(1)
        self.model = torch.nn.Linear(DIM, DIM)
        self.loss = _head(True, parallel)

    def forward(self, z, y):
        tight, contrast = softmax_terms(self.loss, self.model(z), y, SoftmaxSpec(label_smoothing=0.1), "tiled", 4)
        return tight + contrast


def _ddp_step(z, y, parallel):
    """Parameters after one SGD step (DDP when sharded, with the shard kept out of the all-reduce)."""
    step = _Step(parallel)
    wrapped = step
    if parallel:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            step, class_sharded_names(step))
        wrapped = torch.nn.parallel.DistributedDataParallel(step)
    optimizer = torch.optim.SGD(step.parameters(), lr=0.5)
    wrapped(z, y).backward()
    optimizer.step()
    return {name: p.detach().clone() for name, p in step.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, load_from):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        z, y = _batch(world)
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        results = {}
        for name, (bias, terms) in CASES.items():
            head = _head(bias, parallel=True)
            local = z[rows].clone().requires_grad_()
            tight, contrast = terms(head, local, y[rows])
            (tight + contrast).backward()
            # The embedding gradient is pre-multiplied by the world size for data-parallel averaging.
            results[name] = {"loss": (tight + contrast).detach(), "dz": local.grad / world,
                             "start": head.shard.start, **{k: p.grad for k, p in head.named_parameters()}}
        results["ddp"] = _ddp_step(z[rows], y[rows], parallel=True)
        head = _head(True, parallel=True)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        softmax_terms(head, z[rows], y[rows], SoftmaxSpec(label_smoothing=0.1), "tiled")[1].backward()
        optimizer.step()
        state = {"head": head.state_dict(), "optimizer": gather_optimizer_state(optimizer)}  # collective
        if rank == 0:
            torch.save(state, Path(out_dir) / f"ckpt_{world}.pt")
        if load_from:
            saved = torch.load(load_from, weights_only=True)
            fresh = _head(True, parallel=True)
            fresh.load_state_dict(saved["head"])
            s, e = fresh.shard.start, fresh.shard.end
            expected_momentum = saved["optimizer"]["state"][0]["momentum_buffer"][s:e].clone()
            optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
            optimizer.load_state_dict(slice_optimizer_state(optimizer, saved["optimizer"]))
            results["loaded"] = {"weight": fresh.weight.detach(), "expected": saved["head"]["weight"][s:e],
                                 "momentum": optimizer.state[fresh.weight]["momentum_buffer"],
                                 "expected_momentum": expected_momentum}
        torch.save(results, Path(out_dir) / f"rank{rank}_of_{world}.pt")
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # results are on disk; skip interpreter teardown (see tests/test_losses_cross_rank.py)


def _spawn(world, out_dir, load_from=None):
    mp.start_processes(_worker, args=(world, _free_port(), str(out_dir), load_from and str(load_from)),
                       nprocs=world, start_method="spawn", join=True)
    return [torch.load(out_dir / f"rank{r}_of_{world}.pt", weights_only=True) for r in range(world)]


def _assert_close(got, want, what):
    scale = max(want.abs().max().item(), 1e-3)
    assert (got - want).abs().max().item() <= 1e-5 * scale, what


def _check_against_one_process(ranks, world):
    z, y = _batch(world)
    for name, (bias, terms) in CASES.items():
        head = _head(bias, parallel=False)
        full = z.clone().requires_grad_()
        tight, contrast = terms(head, full, y)
        (tight + contrast).backward()
        for r, res in enumerate(ranks):
            got = res[name]
            _assert_close(got["loss"], (tight + contrast).detach(), f"{name} loss, rank {r} of {world}")
            _assert_close(got["dz"], full.grad[r * N_PER_RANK:(r + 1) * N_PER_RANK], f"{name} dz rank {r}")
            s = got["start"]
            for key, p in head.named_parameters():
                _assert_close(got[key], p.grad[s:s + got[key].shape[0]], f"{name} d{key} rank {r} of {world}")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sharded_head_equals_one_process_and_reshards(tmp_path):
    two = _spawn(2, tmp_path)
    _check_against_one_process(two, 2)
    z, y = _batch(2)
    want = _ddp_step(z, y, parallel=False)  # DDP + sharded head: the same update as one process
    for r, res in enumerate(two):
        s = r * CLASSES // 2
        for name, value in res["ddp"].items():
            expected = want[name][s:s + value.shape[0]] if name.startswith("loss.") else want[name]
            _assert_close(value, expected, f"DDP step {name} rank {r}")
    three = _spawn(3, tmp_path, load_from=tmp_path / "ckpt_2.pt")  # 2 -> 3 ranks
    _check_against_one_process(three, 3)
    for res in three:
        torch.testing.assert_close(res["loaded"]["weight"], res["loaded"]["expected"], rtol=0, atol=0)
        torch.testing.assert_close(res["loaded"]["momentum"], res["loaded"]["expected_momentum"], rtol=0, atol=0)
    saved = torch.load(tmp_path / "ckpt_2.pt", weights_only=True)  # 2 -> 1 rank (a plain head)
    assert saved["head"]["class_ranges"].tolist() == [[0, 5], [5, 11]]
    single = _head(True, parallel=False)
    single.load_state_dict({k: v for k, v in saved["head"].items() if k != "class_ranges"})
    torch.testing.assert_close(single.weight.detach(), saved["head"]["weight"], rtol=0, atol=0)
    assert single.weight.shape == (CLASSES, DIM)
