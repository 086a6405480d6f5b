"""Loss registry and factory: `build_loss(name, **params)` and config-section validation.

Losses register themselves by name (timm style): a module under `unidml/losses/` decorated with
`@register_loss("name")` is all a new loss needs. The engine passes `num_classes`, `embedding_dim`
and `device`; the factory forwards each only to constructors that take it.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from unidml.config import ConfigError
from unidml.registry import LOSSES

ENGINE_PARAMS = ("num_classes", "embedding_dim", "device")
# Config validation builds the loss on stand-in sizes on the meta device: values are checked, and the
# backend only as far as it does not depend on the device the run will get (docs/design.md, "Losses").
DRY_RUN = {"num_classes": 2, "embedding_dim": 2, "device": torch.device("meta")}

T = TypeVar("T", bound=type[nn.Module])


_on_register: list[Callable[[str, type], None]] = []


def register_loss(name: str) -> Callable[[T], T]:
    """Class decorator adding a loss to `unidml.registry.LOSSES` under `name` (and its derived variants,
    see `on_register`)."""
    def add(cls: T) -> T:
        LOSSES.add(name, cls)
        for hook in _on_register:
            hook(name, cls)
        return cls
    return add


def on_register(hook: Callable[[str, type], None]) -> None:
    """Call `hook(name, cls)` for every loss registered so far and every later one, so a derived variant
    (`<loss>+xbm`) exists for each loss whatever the import order."""
    _on_register.append(hook)
    for name, cls in list(LOSSES.items()):
        hook(name, cls)


def _loss_class(name: str) -> type[nn.Module]:
    return LOSSES.get(name)


def memory_variant(name: str, params: dict[str, Any]) -> str:
    """`<name>+xbm` when a pairwise loss is given a `memory` section (cross-batch memory, losses/xbm.py)."""
    variant = f"{name}+xbm"
    return variant if "memory" in params and variant in LOSSES else name


def loss_parameters(name: str) -> list[str]:
    """User-settable constructor parameters of loss `name` (engine-supplied ones excluded)."""
    params = inspect.signature(_loss_class(name).__init__).parameters
    return [p for p in params if p != "self" and p not in ENGINE_PARAMS]


def build_loss(name: str, *, num_classes: int | None = None, embedding_dim: int | None = None,
               device: torch.device | str | None = None, **params: Any) -> nn.Module:
    """Instantiate registered loss `name`; engine values go only to constructors that take them.

    `device` is where the loss will run: pairwise losses choose their backend for it (None: the
    device `engine.device=auto` picks).
    """
    name = memory_variant(name, params)
    cls = _loss_class(name)
    _check_keys(name, params)
    accepted = inspect.signature(cls.__init__).parameters
    engine = {"num_classes": num_classes, "embedding_dim": embedding_dim}
    for key, value in engine.items():
        if key in accepted:
            if value is None:
                raise ValueError(f"loss '{name}' needs {key}")
            params[key] = value
    if "device" in accepted and device is not None:
        params["device"] = device
    return cls(**params)


def _check_keys(name: str, params: dict[str, Any]) -> None:
    known = loss_parameters(name)
    for key in params:
        if key in ENGINE_PARAMS:
            raise ValueError(f"parameter '{key}' of loss '{name}' is set by the engine, not the config")
        if key not in known:
            raise ValueError(f"unknown parameter '{key}' for loss '{name}' (known: {', '.join(known)})")
    _check_types(name, params)


# Scalar parameter kinds (from a default's type or an annotation) and what they accept.
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "float": ((int, float), "a number"), "int": ((int,), "an integer"), "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
}


def _kind(parameter: inspect.Parameter) -> str | None:
    default = parameter.default
    if default is not inspect.Parameter.empty and default is not None:
        kind = type(default).__name__
    else:
        kind = str(parameter.annotation).replace(" ", "")
    return kind if kind in _KINDS else None


def _check_types(name: str, params: dict[str, Any]) -> None:
    """A scalar parameter given a value of another kind is named (a bool is not a number here)."""
    signature = inspect.signature(_loss_class(name).__init__).parameters
    for key, value in params.items():
        kind = _kind(signature[key])
        if kind is None:
            continue
        accepted, wanted = _KINDS[kind]
        if not isinstance(value, accepted) or (kind != "bool" and isinstance(value, bool)):
            raise ValueError(f"parameter '{key}' of loss '{name}' must be {wanted}, got {value!r}")


def _split(section: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    params = dict(section)
    name = params.pop("name", None)
    if not isinstance(name, str):
        raise ValueError("missing 'name' (the loss to use)")
    return name, params


def validate_loss_params(section: dict[str, Any]) -> None:
    """Check a config `loss` section: known name, known keys, acceptable values (ValueError)."""
    name, params = _split(section)
    name = memory_variant(name, params)
    _check_keys(name, params)
    build_loss(name, **DRY_RUN, **params)


def build_loss_from_config(section: dict[str, Any], num_classes: int, embedding_dim: int,
                           device: torch.device | str | None = None) -> nn.Module:
    """`build_loss` from a config `loss` section (its `name` plus the loss's own parameters).

    A choice the run cannot honour (e.g. `backend: triton` without CUDA) is a one-line ConfigError.
    """
    try:
        name, params = _split(section)
        return build_loss(name, num_classes=num_classes, embedding_dim=embedding_dim, device=device, **params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"key 'loss': {exc}") from None
