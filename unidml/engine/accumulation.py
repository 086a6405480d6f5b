"""How an epoch's micro-batches group into optimizer steps (`train.grad_accum`).

Groups of `grad_accum` micro-batches in loader order, and one shorter group for the leftover at the
epoch's end: it steps on the epoch's last micro-batch, with its losses averaged over its own size, so
no gradient leaks into the next epoch and every step's gradient is the mean over its micro-batches.
"""
from __future__ import annotations

from unidml.errors import UserError


def steps_in_epoch(num_micro: int, accum: int) -> int:
    """Optimizer steps in an epoch of `num_micro` micro-batches: full groups plus one for a leftover."""
    return -(-num_micro // accum)


def group_size(micro: int, num_micro: int, accum: int) -> int:
    """Micro-batches in the group holding micro-batch `micro` (0-based): `accum`, or fewer at the end."""
    return min(accum, num_micro - (micro - micro % accum))


def ends_group(micro: int, num_micro: int, accum: int) -> bool:
    """Whether the optimizer steps after micro-batch `micro`: its group's last one, or the epoch's."""
    return (micro + 1) % accum == 0 or micro + 1 == num_micro


def check_groups(num_micro: int, accum: int, backend: str) -> None:
    """Refuse a leftover group under DeepSpeed, which steps only on every `grad_accum`-th micro-batch."""
    leftover = num_micro % accum
    if leftover and backend == "deepspeed":
        raise UserError(f"train.grad_accum: {accum} does not divide the {num_micro} micro-batches of an epoch "
                        f"({leftover} left over); engine.backend=deepspeed needs full groups: choose a "
                        f"grad_accum that divides {num_micro}, or use ddp")
