"""Loss registry and factory: `build_loss(name, **params)` and config-section validation.

Losses register themselves by name (timm style). The engine always passes `num_classes` and
`embedding_dim`; the factory forwards them only to losses whose constructor takes them.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from torch import nn

LOSSES: dict[str, type[nn.Module]] = {}
ENGINE_PARAMS = ("num_classes", "embedding_dim")

T = TypeVar("T", bound=type[nn.Module])


def register_loss(name: str) -> Callable[[T], T]:
    """Class decorator adding a loss to `LOSSES` under `name`."""
    def add(cls: T) -> T:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' registered twice")
        LOSSES[name] = cls
        return cls
    return add


def _loss_class(name: str) -> type[nn.Module]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}' (known: {', '.join(sorted(LOSSES))})")
    return LOSSES[name]


def loss_parameters(name: str) -> list[str]:
    """User-settable constructor parameters of loss `name` (engine-supplied ones excluded)."""
    params = inspect.signature(_loss_class(name).__init__).parameters
    return [p for p in params if p != "self" and p not in ENGINE_PARAMS]


def build_loss(name: str, *, num_classes: int | None = None, embedding_dim: int | None = None,
               **params: Any) -> nn.Module:
    """Instantiate registered loss `name`; engine sizes go only to constructors that take them."""
    cls = _loss_class(name)
    _check_keys(name, params)
    accepted = inspect.signature(cls.__init__).parameters
    engine = {"num_classes": num_classes, "embedding_dim": embedding_dim}
    for key, value in engine.items():
        if key in accepted:
            if value is None:
                raise ValueError(f"loss '{name}' needs {key}")
            params[key] = value
    return cls(**params)


def _check_keys(name: str, params: dict[str, Any]) -> None:
    known = loss_parameters(name)
    for key in params:
        if key in ENGINE_PARAMS:
            raise ValueError(f"parameter '{key}' of loss '{name}' is set by the engine, not the config")
        if key not in known:
            raise ValueError(f"unknown parameter '{key}' for loss '{name}' (known: {', '.join(known)})")


def validate_loss_params(section: dict[str, Any]) -> None:
    """Check a config `loss` section: known name, known keys, acceptable values (ValueError)."""
    params = dict(section)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ValueError("missing 'name' (the loss to use)")
    _check_keys(name, params)
    # Build on a tiny stand-in size so bad values (e.g. an unknown mining) fail at config load.
    build_loss(name, num_classes=2, embedding_dim=2, **params)


def build_loss_from_config(section: dict[str, Any], num_classes: int, embedding_dim: int) -> nn.Module:
    """`build_loss` from a config `loss` section (its `name` plus the loss's own parameters)."""
    params = dict(section)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ValueError("missing 'name' (the loss to use)")
    return build_loss(name, num_classes=num_classes, embedding_dim=embedding_dim, **params)
