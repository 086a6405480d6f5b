"""Per-loss hyperparameter search spaces: the `search:` section of a recipe variant.

A variant (`configs/pairwise/<loss>.yaml`) may carry

    search:
      train.lr: {low: 0.003, high: 0.3, log: true}     # float range, log scale for rates
      loss.margin: {low: 0.05, high: 0.5}              # float range, linear scale
      data.m_per_class: {choices: [2, 4, 8]}           # categorical
      loss.power: {low: 1, high: 3, type: int}         # integer range
      train.optimizer: {choices: [adamw, sgd]}
      train.lr:                                        # conditional: one range per choice of another key
        given: train.optimizer
        adamw: {low: 1.0e-4, high: 3.0e-3, log: true}
        sgd: {low: 1.0e-2, high: 3.0e-1, log: true}

Keys are dotted config keys; a trial's values are set into the run config's mapping. Both ends
of a range (and every choice) are checked by loading the config with that value, so a range
the loss refuses (a negative temperature, an unknown key) fails when the study is planned,
with one line naming the file and the key.
"""
from __future__ import annotations

import copy
import dataclasses
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
    given: tuple[str, Any] | None = None  # (key, choice): drawn only in trials where that key has that choice

    @property
    def name(self) -> str:
        """The trial parameter's name: the key, or `key|choice` for one branch of a conditional key."""
        return self.key if self.given is None else f"{self.key}|{self.given[1]}"

    def active(self, values: dict[str, Any]) -> bool:
        """Whether this dimension is drawn in a trial whose other values are `values`."""
        return self.given is None or _same(values.get(self.given[0]), self.given[1])

    def corners(self) -> list[Any]:
        """Values that must all be valid for the space to be usable: both ends, or every choice."""
        return list(self.choices) if self.choices else [self.low, self.high]

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this dimension can draw (a choice, or inside the range on its step)."""
        if self.choices:
            return any(_same(value, c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.integer and not float(value).is_integer():
            return False
        return not self.step or abs(round((value - self.low) / self.step) * self.step - (value - self.low)) < 1e-9

    def describe(self) -> str:
        when = "" if self.given is None else f" if {self.given[0]}={self.given[1]}"
        if self.choices:
            return "{" + ", ".join(map(str, self.choices)) + "}" + when
        scale = "log" if self.log else ("step " + str(self.step) if self.step else "linear")
        return f"[{self.low:g}, {self.high:g}] {'int ' if self.integer else ''}{scale}{when}"


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _conditional(key: str, spec: dict, earlier: Sequence[Dimension]) -> list[Dimension]:
    """`key: {given: OTHER, <choice>: {range}, ...}`: one dimension per choice of the earlier categorical
    dimension OTHER (a choice without a branch leaves `key` at the config's value)."""
    other = spec["given"]
    parent = next((d for d in earlier if d.key == other and d.choices and d.given is None), None)
    if parent is None:
        raise ValueError(f"given: '{other}' must be a categorical search key listed before this one")
    branches = {k: v for k, v in spec.items() if k != "given"}
    if not branches:
        raise ValueError("a conditional entry needs a range for at least one choice of its 'given' key")
    dims = []
    for choice, branch in branches.items():
        if not any(_same(choice, c) for c in parent.choices):
            raise ValueError(f"'{choice}' is not a choice of {other} ({', '.join(map(str, parent.choices))})")
        dim = parse_dimension(key, branch)
        dims.append(dataclasses.replace(dim, given=(other, choice)))
    return dims


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
            if isinstance(spec, dict) and "given" in spec:
                dims.extend(_conditional(key, spec, dims))
            else:
                dims.append(parse_dimension(key, spec))
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None
    _check_corners(dims, source, check)
    return tuple(dims)


def _check_corners(dims: Sequence[Dimension], source: str, check: Callable[[dict[str, Any]], None]) -> None:
    """Every corner value must be accepted. Config checks are slow, so corners are checked together
    (the i-th corner of every dimension at once) and only a refused set is narrowed to its key."""
    plain = [d for d in dims if d.given is None]
    for i in range(max((len(d.corners()) for d in plain), default=0)):
        values = {d.key: d.corners()[min(i, len(d.corners()) - 1)] for d in plain}
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
    for dim in dims:
        if dim.given is None:
            continue
        for value in dim.corners():
            try:
                check({dim.given[0]: dim.given[1], dim.key: value})
            except UserError as exc:
                raise UserError(f"{source}: key 'search.{dim.key}': value {value!r} (with {dim.given[0]}="
                                f"{dim.given[1]}) is refused: {exc}") from None


def suggest(trial, dims: Sequence[Dimension]) -> dict[str, Any]:
    """Draw one value per active dimension from an Optuna trial (already drawn values are returned as
    stored); keyed by config key."""
    values: dict[str, Any] = {}
    for dim in dims:
        if not dim.active(values):
            continue
        if dim.choices:
            values[dim.key] = trial.suggest_categorical(dim.name, list(dim.choices))
        elif dim.integer:
            values[dim.key] = trial.suggest_int(dim.name, dim.low, dim.high, log=dim.log, step=dim.step or 1)
        else:
            values[dim.key] = trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log, step=dim.step)
    return values


def values_of(params: dict[str, Any], dims: Sequence[Dimension]) -> dict[str, Any]:
    """A trial's parameters (named by `Dimension.name`) as config values keyed by config key."""
    return {d.key: params[d.name] for d in dims if d.name in params}


def params_of(values: dict[str, Any], dims: Sequence[Dimension]) -> dict[str, Any]:
    """Config values keyed by config key as trial parameters: only the dimensions active for `values`
    and containing their value (the inverse of `values_of`)."""
    return {d.name: values[d.key] for d in dims
            if d.key in values and d.active(values) and d.contains(values[d.key])}


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
