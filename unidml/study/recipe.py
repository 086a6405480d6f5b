"""A loss's training recipe: the `train` keys a recipe variant owns, and each optimizer's own defaults.

A variant (`configs/pairwise/<loss>.yaml`) with a `train` section states its loss's whole optimizer
recipe (optimizer, lr, weight decay, warm-up, and any of the optimizer's own keys); the base config's
recipe keys are dropped, not merged, and the chosen optimizer brings its defaults for the keys the
variant leaves out (`config.schema.OPTIMIZER_DEFAULTS`), so nothing of the base's optimizer (SGD's
momentum and Nesterov, LAMB's betas, LARS's trust coefficient) leaks into or blocks another one. The
budget keys (epochs, batch size, seed, gradient accumulation and clipping, the learning-rate
multipliers of a backbone family, and `lr_scaling` with its reference batch: a variant's lr is the
rate at that reference batch) stay the base config's, the same for every loss.
"""
from __future__ import annotations

import copy
from typing import Any

from unidml.config.schema import OPTIMIZER_DEFAULTS
from unidml.errors import UserError

RECIPE_KEYS = ("optimizer", "lr", "momentum", "nesterov", "betas", "eps", "trust_coefficient", "weight_decay",
               "warmup_iters")
REQUIRED_KEYS = ("optimizer", "lr", "weight_decay", "warmup_iters")


def _defaults(optimizer: Any, where: str) -> dict[str, Any]:
    if optimizer not in OPTIMIZER_DEFAULTS:
        raise UserError(f"{where}: key 'train.optimizer': '{optimizer}' is not one of {', '.join(OPTIMIZER_DEFAULTS)}")
    return OPTIMIZER_DEFAULTS[optimizer]


def recipe_train(base: dict[str, Any] | None, variant: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """The `train` section of a loss's run: the base's, or with a variant `train` section its budget
    keys plus the variant's recipe over the chosen optimizer's defaults (UserError naming `where`)."""
    base = copy.deepcopy(base or {})
    if variant is None:
        return base
    if not isinstance(variant, dict):
        raise UserError(f"{where}: key 'train': expected a mapping of recipe keys")
    foreign = sorted(set(variant) - set(RECIPE_KEYS))
    if foreign:
        raise UserError(f"{where}: key 'train.{foreign[0]}': a variant sets only the recipe keys "
                        f"({', '.join(RECIPE_KEYS)}); the budget stays the base config's")
    missing = [key for key in REQUIRED_KEYS if key not in variant]
    if missing:
        raise UserError(f"{where}: key 'train.{missing[0]}': missing (a variant's train section states "
                        f"{', '.join(REQUIRED_KEYS)})")
    kept = {key: value for key, value in base.items() if key not in RECIPE_KEYS}
    return {**kept, **_defaults(variant["optimizer"], where), **variant}


def with_optimizer(mapping: dict[str, Any], optimizer: Any, where: str) -> dict[str, Any]:
    """`mapping` with `train.optimizer` switched to `optimizer`, which brings its own defaults in place
    of the previous optimizer's keys (unchanged when it is already that optimizer)."""
    train = mapping.get("train") or {}
    if optimizer is None or train.get("optimizer", "sgd") == optimizer:
        return mapping
    out = copy.deepcopy(mapping)
    out["train"] = {**train, **_defaults(optimizer, where), "optimizer": optimizer}
    return out
