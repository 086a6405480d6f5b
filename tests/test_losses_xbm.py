"""Cross-batch memory: exact first step, warm-up, FIFO order, identical banks on 2 gloo ranks, exact resume."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unidml.losses import build_loss

DIM, PER_RANK, STEPS = 6, 5, 4


def _loss(**memory):
    # cross_rank: the in-batch part over the global batch too (inactive on one process).
    return build_loss("multi_similarity", num_classes=4, embedding_dim=DIM, backend="tiled", cross_rank=True,
                      memory={"size": 25, **memory})  # 25 = 2.5 global batches of 10: the FIFO wraps


def _batches(world, steps=STEPS):
    gen = torch.Generator().manual_seed(8)
    return [(torch.randn(PER_RANK * world, DIM, generator=gen), torch.randint(0, 3, (PER_RANK * world,), generator=gen))
            for _ in range(steps)]


def test_first_step_memory_term_is_the_in_batch_loss_and_warm_up_skips_it():
    z, y = _batches(1)[0]
    plain = build_loss("multi_similarity", backend="tiled")(z, y)
    loss = _loss()
    # The bank holds just this batch: anchors against it (self excluded) give the in-batch loss again.
    assert loss(z, y).item() == pytest.approx(2 * plain.item(), rel=1e-6)
    assert int(loss.filled) == PER_RANK and torch.equal(loss.memory_labels[:PER_RANK], y)
    warm = _loss(start_step=2)
    assert warm(z, y).item() == pytest.approx(plain.item(), rel=1e-6) and int(warm.filled) == 0
    warm.eval()
    assert warm(z, y).item() == pytest.approx(plain.item(), rel=1e-6) and int(warm.step) == 1


def test_fifo_wraps_and_resume_continues_the_same_run():
    batches = _batches(1, steps=7)
    loss = _loss(start_step=1)
    values = [loss(z, y).item() for z, y in batches[:3]]
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    values += [loss(z, y).item() for z, y in batches[3:]]
    # 6 enqueued batches of 5 in a bank of 25: the last 5 batches, the 6th written over the 1st.
    assert int(loss.filled) == 25 and int(loss.position) == 5
    torch.testing.assert_close(loss.memory_labels[:5], batches[6][1])
    resumed = _loss(start_step=1)
    resumed.load_state_dict(state)
    again = [resumed(z, y).item() for z, y in batches[3:]]
    assert again == values[3:]  # same code path, same inputs: identical floats
    for key, value in loss.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        loss = _loss()
        record = []
        for z, y in _batches(2):
            local = z[rank * PER_RANK:(rank + 1) * PER_RANK].clone().requires_grad_()
            value = loss(local, y[rank * PER_RANK:(rank + 1) * PER_RANK])
            value.backward()
            banks = [torch.empty_like(loss.memory_emb) for _ in range(2)]
            dist.all_gather(banks, loss.memory_emb)
            record.append({"identical": torch.equal(banks[0], banks[1]), "value": value.detach(),
                           "grad": local.grad / 2,  # DDP's average over the 2 ranks
                           **{k: v.clone() for k, v in loss.state_dict().items()}})
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # results are on disk; skip interpreter teardown (see tests/test_losses_cross_rank.py)


@pytest.mark.timeout(180)
def test_two_ranks_share_one_bank_and_equal_one_process(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _loss()
    for step, (z, y) in enumerate(_batches(2)):
        full = z.clone().requires_grad_()
        value = single(full, y)
        value.backward()
        for r in range(2):
            got = ranks[r][step]
            assert got["identical"], f"step {step}: the ranks' banks differ"
            torch.testing.assert_close(got["memory_emb"], single.memory_emb, rtol=0, atol=0)
            torch.testing.assert_close(got["memory_labels"], single.memory_labels, rtol=0, atol=0)
        # Each rank's loss is world x its anchors' share: the ranks' mean is the global loss.
        mean = (ranks[0][step]["value"] + ranks[1][step]["value"]) / 2
        assert mean.item() == pytest.approx(value.item(), rel=1e-5), f"step {step}"
        grad = torch.cat([ranks[0][step]["grad"], ranks[1][step]["grad"]])
        scale = full.grad.abs().max().item()
        assert (grad - full.grad).abs().max().item() <= 1e-5 * max(scale, 1e-3), f"step {step} gradient"
