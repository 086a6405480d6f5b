"""The paper's study as a product feature: train several losses with the same backbone, data,
budget and seeds, one normal run directory each (`OUT/<loss>/seed<k>/`), resumably.

A loss other than the base config's gets the config's `loss` section replaced by its recipe
variant (`configs/pairwise/<loss>.yaml`: the loss's published defaults plus the m-per-class
sampler); everything else (model, data, optimizer, epochs, evaluation) stays the base config's,
then the user's `--set` overrides apply to every run. A finished run (metrics up to the last
epoch, same resolved config) is never retrained; an interrupted one resumes from its checkpoint.
"""
from __future__ import annotations

import copy
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig

from unidml.config import ConfigError, load_config_text, to_yaml
from unidml.errors import UserError

ALIASES = {"ce": "cross_entropy", "xent": "cross_entropy", "ms": "multi_similarity"}
DEFAULT_LOSSES = "ce,contrastive,triplet,multi_similarity,snca,pce"
REPO_VARIANTS = Path(__file__).resolve().parents[2] / "configs" / "pairwise"


@dataclass(frozen=True)
class StudyRun:
    """One (loss, seed) training of the study and its resolved config."""

    loss: str
    seed: int
    run_dir: Path
    cfg: DictConfig


def parse_losses(text: str) -> list[str]:
    """`ce,contrastive,...` → canonical registry names, in order, without repeats."""
    from unidml.kernels import LOSSES

    names: list[str] = []
    for raw in text.split(","):
        name = ALIASES.get(raw.strip(), raw.strip())
        if not name:
            continue
        if name not in LOSSES:
            raise UserError(f"--losses: unknown loss '{raw.strip()}' (known: ce, {', '.join(sorted(LOSSES))})")
        if name not in names:
            names.append(name)
    if not names:
        raise UserError("--losses: no loss given")
    return names


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def apply_variant(base: dict[str, Any], loss: str, variants: Path) -> dict[str, Any]:
    """The base config's mapping with `loss` swapped in: kept as is when the base already trains
    `loss`; otherwise its `loss` section replaced by the variant's and the variant's `data` keys
    merged in. Cross-entropy without a variant file uses the paper's defaults and random sampling."""
    if (base.get("loss") or {}).get("name", "cross_entropy") == loss:
        return copy.deepcopy(base)
    path = variants / f"{loss}.yaml"
    if loss == "cross_entropy" and not path.is_file():
        variant: dict[str, Any] = {"loss": {"name": "cross_entropy"}, "data": {"sampler": "random"}}
    else:
        if not path.is_file():
            raise UserError(f"{path}: recipe variant of loss '{loss}' not found (pass --variants DIR)")
        variant = _read_mapping(path, f"recipe variant of loss '{loss}'")
    unknown = set(variant) - {"loss", "data"}
    if unknown or (variant.get("loss") or {}).get("name") != loss:
        raise UserError(f"{path}: a variant holds only 'loss' (with name: {loss}) and 'data' sections")
    out = copy.deepcopy(base)
    out["loss"] = copy.deepcopy(variant["loss"])
    out["data"] = _merge(base.get("data") or {}, variant.get("data") or {})
    return out


def run_config(base: dict[str, Any], source: str, loss: str, seed: int, overrides: Sequence[str],
               variants: Path, cross_rank: bool) -> DictConfig:
    """The validated config of one run: base + variant + overrides + this seed, resuming automatically."""
    from unidml.kernels import loss_parameters, validate_loss_params

    forced = [f"train.seed={seed}", "train.resume=auto"]
    if cross_rank and "cross_rank" in loss_parameters(loss):
        forced.append("loss.cross_rank=true")
    text = yaml.safe_dump(apply_variant(base, loss, variants), sort_keys=False)
    return load_config_text(text, f"{source} [{loss}]", [*overrides, *forced], validate_loss=validate_loss_params)


def plan_study(config: str | Path, losses: Sequence[str], seeds: int, out: Path, overrides: Sequence[str] = (),
               variants: Path | None = None, cross_rank: bool = False) -> list[StudyRun]:
    """Every (loss, seed) run of the study with its resolved config; fails before any training on a bad one."""
    if seeds < 1:
        raise UserError(f"--seeds: must be >= 1, got {seeds}")
    base = _read_mapping(Path(config), "config file")
    variants = Path(variants) if variants is not None else REPO_VARIANTS
    return [StudyRun(loss, seed, out / loss / f"seed{seed}",
                     run_config(base, str(config), loss, seed, overrides, variants, cross_rank))
            for loss in losses for seed in range(seeds)]


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def run_state(run: StudyRun) -> str:
    """`new` (nothing there), `partial` (started, same config) or `done` (evaluated at the last epoch).
    A directory holding a run of a different config is an error: results must not be mixed."""
    stored = run.run_dir / "config.yaml"
    if not stored.is_file():
        return "new"
    old = yaml.safe_load(stored.read_text())
    new = yaml.safe_load(to_yaml(run.cfg))
    if old != new:
        raise UserError(f"{run.run_dir}: holds a run with a different config ({_first_difference(old, new)}); "
                        f"use another --out")
    metrics = run.run_dir / "metrics.json"
    if metrics.is_file():
        epochs = [entry["epoch"] for entry in json.loads(metrics.read_text()).get("epochs", [])]
        if epochs and max(epochs) >= run.cfg.train.epochs:
            return "done"
    return "partial"


def run_study(plan: Sequence[StudyRun], env) -> dict[tuple[str, int], str]:
    """Train every unfinished run in order (in this process, or on every rank of a process group).
    Returns each run's outcome: `done` (already finished), `trained`, or `failed: <reason>`."""
    from unidml.engine.trainer import Trainer

    outcome: dict[tuple[str, int], str] = {}
    for number, run in enumerate(plan, 1):
        state = run_state(run)
        label = f"[{number}/{len(plan)}] {run.loss} seed {run.seed}"
        if state == "done":
            outcome[(run.loss, run.seed)] = "done"
            if env.is_main:
                print(f"{label}: finished earlier, kept ({run.run_dir})", flush=True)
            continue
        if env.is_main:
            print(f"{label}: {'resuming' if state == 'partial' else 'training'} -> {run.run_dir}", flush=True)
        try:
            Trainer(run.cfg, run.run_dir, env).fit()
            outcome[(run.loss, run.seed)] = "trained"
        except (UserError, ConfigError) as exc:
            outcome[(run.loss, run.seed)] = f"failed: {exc}"
            if env.is_main:
                print(f"{label}: failed: {exc}", flush=True)
        gc.collect()
    return outcome


def describe(cfg: DictConfig) -> dict[str, Any]:
    """What the study held fixed, for the report header."""
    return {"model": f"{cfg.model.arch} (pretrained: {cfg.model.pretrained or 'none'})",
            "data": f"{cfg.data.dataset} at {cfg.data.root}, {cfg.data.image_size} px, val_classes={cfg.data.val_classes}",
            "budget": f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}, lr {cfg.train.lr}, "
                      f"momentum {cfg.train.momentum}{' (Nesterov)' if cfg.train.nesterov else ''}, "
                      f"warm-up {cfg.train.warmup_iters} it, precision {cfg.engine.precision}",
            "selection": f"best epoch by {cfg.eval.split} Recall@1"}
