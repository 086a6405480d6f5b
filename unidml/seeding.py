"""Seeds: the base seeding of a process, and seeds derived from a tuple of integers (seed, epoch, rank, ...),
the one rule every RNG reseed uses, so that a run resumed at an epoch boundary draws exactly what an
uninterrupted run draws."""
import hashlib
import random

import numpy as np
import torch


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on `parts`; distinct tuples give unrelated seeds."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with `train.seed` (model initialisation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
