"""Named registries (timm style): every list of names a config key or a command accepts lives in one.

A component registers itself where it is defined (`@DATASETS.register("sop")`); config rules, command
choices and `unidml list` read `names()`, so a name is written once, in its registration. The registries
are declared here, in a leaf module, so the config layer can read them without importing the layers that
fill them; `unidml.run_config.load_run_config` imports those layers first (docs/design.md, "Registries").
"""
from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Callable, TypeVar

T = TypeVar("T")
_REQUIRED = object()


class Registry(MutableMapping):
    """Name -> component (a class, a function or a description), in registration order.

    It is a mapping (`name in LOSSES`, `LOSSES[name]`, iteration), so tests can add or remove an entry
    for their duration; `get(name)` without a default raises a ValueError listing the known names.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[str, object] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding the decorated object under `name` (a name registered twice is a bug)."""
        def add(obj: T) -> T:
            self.add(name, obj)
            return obj
        return add

    def add(self, name: str, obj: object) -> None:
        """Register `obj` under `name` (for entries that are not decorated definitions)."""
        if name in self._entries:
            raise ValueError(f"{self.name} '{name}' registered twice")
        self._entries[name] = obj

    def get(self, name: str, default: object = _REQUIRED) -> object:
        """The entry `name`; an unknown one is a ValueError naming the known ones (or `default`, if given)."""
        if name in self._entries:
            return self._entries[name]
        if default is _REQUIRED:
            raise ValueError(f"unknown {self.name} '{name}' (known: {', '.join(self.names())})")
        return default

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __getitem__(self, name: str) -> object:
        return self._entries[name]

    def __setitem__(self, name: str, obj: object) -> None:
        self._entries[name] = obj

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


DATASETS: Registry = Registry("dataset")  # data.dataset -> reader (a `DatasetReader`)
DATA_BACKENDS: Registry = Registry("data backend")  # data.backend (besides `auto`) -> backend factory
SAMPLERS: Registry = Registry("sampler")  # data.sampler -> sampler class
POOLINGS: Registry = Registry("pooling")  # model.pooling (besides `auto`) -> pooling factory
ENGINE_BACKENDS: Registry = Registry("engine backend")  # engine.backend -> TrainBackend factory
LOSSES: Registry = Registry("loss")  # loss.name -> loss class
BACKBONE_FAMILIES: Registry = Registry("backbone family")  # arch prefix ("" torchvision, "timm/") -> family
EXPORT_FORMATS: Registry = Registry("export format")  # unidml export --format -> exporter

# Config keys whose choices are a registry's names (plus the fixed extra choices, e.g. `auto`).
CONFIG_CHOICES: dict[str, tuple[Registry, tuple[str, ...]]] = {
    "data.dataset": (DATASETS, ()),
    "data.backend": (DATA_BACKENDS, ("auto",)),
    "data.sampler": (SAMPLERS, ()),
    "model.pooling": (POOLINGS, ("auto",)),
    "engine.backend": (ENGINE_BACKENDS, ()),
}


def choices(key: str) -> tuple[str, ...]:
    """The values config key `key` accepts (extra fixed choices first, then the registered names)."""
    registry, extra = CONFIG_CHOICES[key]
    return (*extra, *registry.names())
