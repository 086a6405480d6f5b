"""Per-loss hyperparameter search spaces: the `search:` section of a recipe variant.

A variant (`configs/pairwise/<loss>.yaml`) may carry

    search:
      train.lr: {low: 0.003, high: 0.3, log: true}     # float range, log scale for rates
      loss.margin: {low: 0.05, high: 0.5}              # float range, linear scale
      data.m_per_class: {choices: [2, 4, 8]}           # categorical
      loss.power: {low: 1, high: 3, type: int}         # integer range

Keys are dotted config keys; a trial's values are set into the run config's mapping. Both ends
of a range (and every choice) are checked by loading the config with that value, so a range
the loss refuses (a negative temperature, an unknown key) fails when the study is planned,
with one line naming the file and the key.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from unidml.errors import UserError

RANGE_KEYS = {"low", "high", "log", "type", "step"}
SECTIONS = ("data", "model", "loss", "train")  # config sections a search may touch


@dataclass(frozen=True)
class Dimension:
    """One searched config key: a float or int range (optionally log-scaled or stepped) or a list of choices."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    integer: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def corners(self) -> list[Any]:
        """Values that must all be valid for the space to be usable: both ends, or every choice."""
        return list(self.choices) if self.choices else [self.low, self.high]

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this dimension can draw (a choice, or inside the range on its step)."""
        if self.choices:
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.integer and not float(value).is_integer():
            return False
        return not self.step or abs(round((value - self.low) / self.step) * self.step - (value - self.low)) < 1e-9

    def describe(self) -> str:
        if self.choices:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        scale = "log" if self.log else ("step " + str(self.step) if self.step else "linear")
        return f"[{self.low:g}, {self.high:g}] {'int ' if self.integer else ''}{scale}"


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return value


def parse_dimension(key: str, spec: Any) -> Dimension:
    """One `key: {...}` entry of a `search:` section (ValueError with the reason)."""
    if not isinstance(spec, dict):
        raise ValueError("expected a mapping {low, high[, log, type, step]} or {choices: [...]}")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ValueError("'choices' takes no other key")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError("'choices' must be a non-empty list")
        if any(isinstance(c, (dict, list)) for c in choices) or len({repr(c) for c in choices}) != len(choices):
            raise ValueError("'choices' must be distinct scalars")
        return Dimension(key, choices=tuple(choices))
    unknown = set(spec) - RANGE_KEYS
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(RANGE_KEYS))}, choices)")
    if "low" not in spec or "high" not in spec:
        raise ValueError("a range needs both 'low' and 'high'")
    kind = spec.get("type", "float")
    if kind not in ("float", "int"):
        raise ValueError(f"type must be float or int, got {kind!r}")
    low, high = _number(spec["low"], "low"), _number(spec["high"], "high")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ValueError(f"log must be true or false, got {log!r}")
    if not low < high:
        raise ValueError(f"needs low < high, got [{low}, {high}]")
    if log and low <= 0:
        raise ValueError(f"a log scale needs low > 0, got {low}")
    if step is not None:
        if log:
            raise ValueError("'step' and 'log: true' exclude each other")
        if _number(step, "step") <= 0:
            raise ValueError(f"step must be > 0, got {step}")
    integer = kind == "int"
    if integer and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise ValueError("an int range needs integer low, high and step")
    cast = int if integer else float
    return Dimension(key, cast(low), cast(high), log, integer, None if step is None else cast(step))


def parse_search(section: Any, source: str, check: Callable[[dict[str, Any]], None]) -> tuple[Dimension, ...]:
    """The `search:` section of `source` as dimensions; `check({key: value})` must accept every corner value.

    Raises UserError naming `source` and the offending key."""
    if section is None:
        return ()
    if not isinstance(section, dict):
        raise UserError(f"{source}: key 'search': expected a mapping of dotted config keys to ranges")
    dims = []
    for key, spec in section.items():
        where = f"{source}: key 'search.{key}'"
        if not isinstance(key, str) or key.count(".") < 1 or key.split(".")[0] not in SECTIONS:
            raise UserError(f"{where}: expected a dotted key in data, model, loss or train (e.g. train.lr)")
        if key in ("loss.name", "train.seed", "train.epochs", "train.resume"):
            raise UserError(f"{where}: is fixed by the study, not searched")
        try:
            dims.append(parse_dimension(key, spec))
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
    _check_corners(dims, source, check)
    return tuple(dims)


def _check_corners(dims: Sequence[Dimension], source: str, check: Callable[[dict[str, Any]], None]) -> None:
    """Every corner value must be accepted. Config checks are slow, so corners are checked together
    (the i-th corner of every dimension at once) and only a refused set is narrowed to its key."""
    for i in range(max((len(d.corners()) for d in dims), default=0)):
        values = {d.key: d.corners()[min(i, len(d.corners()) - 1)] for d in dims}
        try:
            check(values)
            continue
        except UserError:
            pass
        for key, value in values.items():
            try:
                check({key: value})
            except UserError as exc:
                raise UserError(f"{source}: key 'search.{key}': value {value!r} is refused: {exc}") from None
        raise UserError(f"{source}: key 'search': the values {values} are refused together")


def suggest(trial, dims: Sequence[Dimension]) -> dict[str, Any]:
    """Draw one value per dimension from an Optuna trial (already drawn values are returned as stored)."""
    values = {}
    for dim in dims:
        if dim.choices:
            values[dim.key] = trial.suggest_categorical(dim.key, list(dim.choices))
        elif dim.integer:
            values[dim.key] = trial.suggest_int(dim.key, dim.low, dim.high, log=dim.log, step=dim.step or 1)
        else:
            values[dim.key] = trial.suggest_float(dim.key, dim.low, dim.high, log=dim.log, step=dim.step)
    return values


def with_values(mapping: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config mapping with dotted `values` set into it (sections created as needed)."""
    out = copy.deepcopy(mapping)
    for key, value in values.items():
        *sections, leaf = key.split(".")
        node = out
        for name in sections:
            if node.get(name) is None:
                node[name] = {}
            if not isinstance(node[name], dict):
                raise UserError(f"search key '{key}': '{name}' is not a section")
            node = node[name]
        node[leaf] = value
    return out
