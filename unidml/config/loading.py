"""Loading a run config: YAML files layered left to right onto the schema defaults, dotted `key=value`
overrides (`~key` deletes), a new `loss.name` starting a fresh loss section, then `validate`; every
problem a one-line `ConfigError` naming the key and where its value came from (the YAML file or the
command-line override that set it last)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from unidml.config.rules import validate
from unidml.config.schema import OPTIMIZER_DEFAULTS, STUDY_SECTION, ConfigError, RunConfig
from unidml.errors import UserError


def _one_line(exc: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf exception into one line naming the source and the full key."""
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"{source}: key '{key}': {msg}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        logging.getLogger(__name__).warning("%s: the config file is empty; running on the defaults", path)
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b=value` and parse the value as YAML (so `0.01`, `true`, `[1,2]` get their types)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


def _absolute_data_paths(cfg: DictConfig) -> None:
    """`data.root` (or, for a list without root, `data.list_file`) made absolute, so that a run's stored
    config names the same data from any working directory."""
    if cfg.data.root:
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
    elif cfg.data.list_file:
        cfg.data.list_file = os.path.abspath(os.path.expanduser(cfg.data.list_file))


def _switch_loss(cfg: DictConfig, name: Any, source: str) -> None:
    """A new `loss.name` starts a fresh loss section: the previous loss's parameters would not fit it."""
    old = dict(cfg.loss)
    if name == old.get("name"):
        return
    dropped = [key for key in old if key != "name"]
    if dropped and os.environ.get("RANK", "0") == "0":
        logging.getLogger(__name__).warning("%s: loss '%s' replaces '%s', whose parameters are dropped (%s); set "
                                            "them after loss.name to keep them", source, name, old.get("name"),
                                            ", ".join(dropped))
    cfg.loss = {"name": name}


def _merge_layer(cfg: DictConfig, data: dict[str, Any], source: str) -> DictConfig:
    """Merge one YAML file's (or one override's) keys onto `cfg`; naming another loss replaces the loss section,
    naming another optimizer brings its defaults (`OPTIMIZER_DEFAULTS`) in place of the previous one's keys."""
    loss = data.get("loss")
    if isinstance(loss, dict) and "name" in loss:
        _switch_loss(cfg, loss["name"], source)
    train = data.get("train")
    if isinstance(train, dict) and train.get("optimizer", cfg.train.optimizer) != cfg.train.optimizer:
        cfg = OmegaConf.merge(cfg, {"train": OPTIMIZER_DEFAULTS.get(train["optimizer"], {})})
    try:
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as exc:
        raise _one_line(exc, source) from None


def _delete(cfg: DictConfig, key: str, source: str) -> None:
    """`~key`: remove an open section's key (a loss parameter), or put a schema key back to its default."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise ConfigError(f"{source}: no key '{key}' to delete")
    if key == "loss.name":
        raise ConfigError(f"{source}: 'loss.name' cannot be deleted; set loss.name=NAME to change the loss")
    try:
        del parent[leaf]
    except OmegaConfBaseException:  # a schema field: deleting means its default
        OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.structured(RunConfig), key), merge=False)


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves of a nested mapping (`{"a": {"b": 1}}` -> `["a.b"]`)."""
    if not isinstance(data, dict) or not data:
        return [prefix] if prefix else []
    return [key for name, value in data.items() for key in _leaf_keys(value, f"{prefix}.{name}" if prefix else name)]


class Origins:
    """Where each key's value came from: the last layer (YAML file or override) that set it, the key
    itself, a section above it or a key below it; `default` when none did."""

    def __init__(self, default: str) -> None:
        self.default = default
        self.layers: list[tuple[tuple[str, ...], str]] = []

    def add(self, keys: Sequence[str], source: str) -> None:
        self.layers.append((tuple(keys), source))

    def __call__(self, key: str) -> str:
        for keys, source in reversed(self.layers):
            if any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in keys):
                return source
        return self.default


def _build(layers: Sequence[tuple[dict[str, Any], str]], overrides: Iterable[str],
           validate_loss: Callable[[dict[str, Any]], None] | None,
           validate_model: Callable[[DictConfig, int], object] | None = None) -> DictConfig:
    """Schema defaults, then each (YAML mapping, its source) layer in order, then the overrides."""
    cfg = OmegaConf.structured(RunConfig)
    origin = Origins(" + ".join(where for _, where in layers) or "<defaults>")
    for data, where in layers:
        cfg = _merge_layer(cfg, data, where)
        origin.add(_leaf_keys(data), where)
    for item in overrides:
        if item.startswith("~"):
            _delete(cfg, item[1:].strip(), f"override '{item}'")
            origin.add([item[1:].strip()], f"override '{item}'")
            continue
        key, value = parse_override(item)
        cfg = _merge_layer(cfg, _nest(key, value), f"override '{item}'")
        origin.add([key], f"override '{item}'")
    validate(cfg, origin)
    _absolute_data_paths(cfg)
    if validate_loss is not None:
        try:
            validate_loss(OmegaConf.to_container(cfg.loss, resolve=True))
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{origin('loss')}: key 'loss': {exc}") from None
    if validate_model is not None:  # e.g. unidml.models.check_model_config: (model section, image size)
        try:
            validate_model(cfg.model, cfg.data.image_size)
        except UserError as exc:  # its message starts with the key at fault ("model.arch: ...")
            raise ConfigError(f"{origin(str(exc).split(':', 1)[0])}: {exc}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_config(paths: str | Path | Sequence[str | Path] | None, overrides: Iterable[str] = (),
                validate_loss: Callable[[dict[str, Any]], None] | None = None,
                validate_model: Callable[[DictConfig, int], object] | None = None) -> DictConfig:
    """Load YAML configs onto the schema, each file over the previous ones (left to right), apply
    `key=value` overrides (`~key` deletes a key), validate; raise ConfigError.

    A file or override that names a different `loss.name` starts a fresh loss section (the previous
    loss's parameters are dropped, with a one-line warning saying which).
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    return _build([(_run_sections(_read_yaml(Path(p)), str(p)), str(p)) for p in paths], overrides,
                  validate_loss, validate_model)


def _run_sections(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A file's sections without the study's `search:` space (logged, so the dropped ranges are visible)."""
    if STUDY_SECTION not in data:
        return data
    logging.getLogger(__name__).info("%s: its 'search:' section is only read by unidml compare --trials; "
                                     "training uses the values the file sets", source)
    return {key: value for key, value in data.items() if key != STUDY_SECTION}


def load_config_text(text: str, source: str, overrides: Iterable[str] = (),
                     validate_loss: Callable[[dict[str, Any]], None] | None = None,
                     validate_model: Callable[[DictConfig, int], object] | None = None) -> DictConfig:
    """Like `load_config` for YAML text already in memory (e.g. the copy a checkpoint carries)."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: stored config is not a mapping")
    return _build([(data, source)], overrides, validate_loss, validate_model)


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (what the run dir's config.yaml holds)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
