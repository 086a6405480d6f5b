"""Distributed samplers: ranks simulated in one process (world sizes 1, 2, 3)."""
from __future__ import annotations

import numpy as np
import pytest

from unidml.data_pipeline.samplers import MPerClassBatchSampler, RandomBatchSampler, build_sampler
from unidml.errors import UserError

# 23 classes of 1..9 images (SOP-like uneven classes), 116 images in all
LABELS = np.repeat(np.arange(23), [1 + (7 * c) % 9 for c in range(23)])


def _ranks(kind: str, world: int, batch: int, m: int = 2, seed: int = 3):
    return [build_sampler(kind, LABELS, batch_size=batch, rank=r, world_size=world, seed=seed, m_per_class=m)
            for r in range(world)]


def _epoch(samplers, epoch: int) -> list[list[list[int]]]:
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_random_ranks_share_one_permutation_disjointly(world):
    samplers = _ranks("random", world, batch=6)
    per_rank = _epoch(samplers, 0)
    steps = len(LABELS) // (6 * world)
    assert all(len(s) == steps and len(b) == steps for s, b in zip(samplers, per_rank))
    flat = [i for batches in per_rank for b in batches for i in b]
    assert all(len(b) == 6 for batches in per_rank for b in batches)
    assert len(flat) == len(set(flat)) == steps * 6 * world
    # the union of step t over ranks is the t-th block of one global permutation
    order = np.random.default_rng([3, 0]).permutation(len(LABELS))
    for t in range(steps):
        assert sum((per_rank[r][t] for r in range(world)), []) == order[t * 6 * world:(t + 1) * 6 * world].tolist()
    assert _epoch(samplers, 1) != per_rank and _epoch(samplers, 0) == per_rank


@pytest.mark.parametrize("world", [1, 2, 3])
def test_m_per_class_global_batches_are_class_balanced(world):
    m, batch = 2, 4
    samplers = _ranks("m_per_class", world, batch=batch, m=m)
    per_rank = _epoch(samplers, 0)
    steps = len(samplers[0])
    assert steps > 0 and all(len(s) == steps and len(b) == steps for s, b in zip(samplers, per_rank))
    for t in range(steps):
        global_batch = sum((per_rank[r][t] for r in range(world)), [])
        classes, counts = np.unique(LABELS[global_batch], return_counts=True)
        assert len(classes) == batch * world // m and set(counts) == {m}
    # ranks never share an index within the epoch; an index repeats only to complete a small class
    used = [set(i for b in batches for i in b) for batches in per_rank]
    assert all(not (used[a] & used[b]) for a in range(world) for b in range(a + 1, world))
    flat = [i for batches in per_rank for b in batches for i in b]
    repeated = {i for i in flat if flat.count(i) > 1}
    assert all(np.sum(LABELS == LABELS[i]) < m for i in repeated)


def test_m_per_class_uses_most_images_of_big_classes():
    sampler = MPerClassBatchSampler(LABELS, batch_size=8, rank=0, world_size=1, seed=0, m=4)
    used = {i for b in sampler for i in b}
    coverable = sum((n // 4) * 4 for n in np.bincount(LABELS) if n >= 4)
    assert len(used & set(np.flatnonzero(np.bincount(LABELS)[LABELS] >= 4))) >= coverable - 8


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("kind", ["random", "m_per_class"])
def test_resume_continues_with_the_next_batch(kind, world):
    reference = _epoch(_ranks(kind, world, batch=4), 2)
    for r in range(world):
        sampler = _ranks(kind, world, batch=4)[r]
        sampler.set_epoch(2)
        consumed = []
        for b in sampler:
            consumed.append(b)
            sampler.advance()
            if len(consumed) == 3:
                break
        state = sampler.state_dict()
        fresh = _ranks(kind, world, batch=4)[r]
        fresh.load_state_dict(state)
        fresh.set_epoch(2)  # the trainer re-selects the saved epoch: position must survive
        assert consumed + list(fresh) == reference[r]
        fresh.set_epoch(3)
        assert fresh.position == 0 and list(fresh) == _epoch(_ranks(kind, world, batch=4), 3)[r]


def test_state_from_another_world_size_is_rejected():
    state = RandomBatchSampler(LABELS, 4, 0, 2, seed=0).state_dict()
    with pytest.raises(UserError, match="world_size=2"):
        RandomBatchSampler(LABELS, 4, 0, 3, seed=0).load_state_dict(state)


def test_m_per_class_shape_errors():
    with pytest.raises(UserError, match="must divide the per-rank batch size 6"):
        MPerClassBatchSampler(LABELS, batch_size=6, rank=0, world_size=1, seed=0, m=4)
    with pytest.raises(UserError, match="needs 32 classes"):
        MPerClassBatchSampler(LABELS, batch_size=64, rank=0, world_size=1, seed=0, m=2)
    with pytest.raises(UserError, match="smaller than one global batch"):
        len(RandomBatchSampler(LABELS, batch_size=100, rank=0, world_size=2, seed=0))
