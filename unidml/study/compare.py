"""Planning the loss comparison: which config each run of the study trains, and whether it already ran.

Each loss gets the base config with its recipe variant swapped in (`configs/pairwise/<loss>.yaml`:
the loss's published defaults, its optimizer recipe (`unidml.study.recipe`), the m-per-class
sampler, its embedding head, and the `search:` space its tuning draws from); the budget (epochs,
batch size, backbone, data, image size, evaluation) stays the base config's, then the user's `--set`
overrides apply to every run. A run is an ordinary run
directory; one whose metrics reach its last epoch with the same resolved config is never retrained,
an interrupted one resumes.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig

from unidml.config import STUDY_SECTION, to_yaml
from unidml.errors import UserError
from unidml.runtime.precision import precision_of, settle_precision
from unidml.study.recipe import recipe_train, with_optimizer
from unidml.study.search_space import Dimension, parse_search, with_values

ALIASES = {"ce": "cross_entropy", "xent": "cross_entropy", "ms": "multi_similarity"}
DEFAULT_LOSSES = "ce,contrastive,triplet,multi_similarity,snca,pce"
REPO_VARIANTS = Path(__file__).resolve().parents[2] / "configs" / "pairwise"
VARIANT_SECTIONS = {"loss", "data", "model", "train", STUDY_SECTION}
MEMORY_SUFFIX = "+xbm"  # a pairwise loss with cross-batch memory (unidml.losses.xbm)
OBJECTIVES = ("recall@1", "map@r")  # validation metrics a study can tune and select by
LOG_SECTION = "log"  # where a run is tracked does not change its results: never compared between runs


def without_log(mapping: dict[str, Any] | None) -> dict[str, Any]:
    """A config mapping without its `log` section (the trackers)."""
    return {key: value for key, value in (mapping or {}).items() if key != LOG_SECTION}


@dataclass(frozen=True)
class LossPlan:
    """One loss of the study: the config mapping its runs start from and its search space."""

    loss: str
    source: str
    mapping: dict[str, Any]
    dims: tuple[Dimension, ...] = ()
    overrides: tuple[str, ...] = field(default=())
    cross_rank: bool = False

    def config(self, seed: int, values: dict[str, Any] | None = None, epochs: int | None = None) -> DictConfig:
        """The validated config of one run: mapping + searched `values` + overrides + seed (resuming)."""
        from unidml.losses import loss_parameters
        from unidml.run_config import load_run_config

        forced = [f"train.seed={seed}", "train.resume=auto"] + ([f"train.epochs={epochs}"] if epochs else [])
        if self.cross_rank and "cross_rank" in loss_parameters(self.loss):
            forced.append("loss.cross_rank=true")
        values = values or {}
        mapping = with_optimizer(self.mapping, values.get("train.optimizer"), self.source)
        text = yaml.safe_dump(with_values(mapping, values), sort_keys=False)
        return load_run_config(text=text, source=self.source, overrides=[*self.overrides, *forced])


@dataclass(frozen=True)
class StudyRun:
    """One (loss, seed) training of the study and its resolved config."""

    loss: str
    seed: int
    run_dir: Path
    cfg: DictConfig


def parse_losses(text: str) -> list[str]:
    """`ce,contrastive,...` → canonical registry names, in order, without repeats."""
    from unidml.losses import LOSSES

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


def read_mapping(path: Path, what: str) -> dict[str, Any]:
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


def _variant(loss: str, variants: Path) -> tuple[Path, dict[str, Any]]:
    """The variant file of `loss` (cross-entropy without one: the paper's defaults and random sampling)."""
    path = variants / f"{loss}.yaml"
    if loss == "cross_entropy" and not path.is_file():
        return path, {"loss": {"name": "cross_entropy"}, "data": {"sampler": "random"}}
    inner = loss.removesuffix(MEMORY_SUFFIX)
    if not path.is_file() and inner != loss and (variants / f"{inner}.yaml").is_file():
        # `<loss>+xbm` without its own file: the plain loss's variant with the memory's default settings
        path, variant = _variant(inner, variants)
        return path, {**variant, "loss": {**variant["loss"], "name": loss}}
    if not path.is_file():
        raise UserError(f"{path}: recipe variant of loss '{loss}' not found (pass --variants DIR)")
    variant = read_mapping(path, f"recipe variant of loss '{loss}'")
    if set(variant) - VARIANT_SECTIONS or (variant.get("loss") or {}).get("name") != loss:
        raise UserError(f"{path}: a variant holds only 'loss' (with name: {loss}), 'data', 'model', 'train' and "
                        "'search' sections")
    return path, variant


def apply_variant(base: dict[str, Any], loss: str, variant: dict[str, Any], where: str = "<variant>") -> dict[str, Any]:
    """The base config's mapping with `loss` swapped in: kept as is when the base already trains
    `loss`; otherwise its `loss` section replaced by the variant's, the variant's `data` and `model`
    keys merged in and its `train` recipe in place of the base's (`recipe_train`)."""
    if (base.get("loss") or {}).get("name", "cross_entropy") == loss:
        return copy.deepcopy(base)
    out = copy.deepcopy(base)
    out["loss"] = copy.deepcopy(variant["loss"])
    for section in ("data", "model"):
        out[section] = _merge(base.get(section) or {}, variant.get(section) or {})
    if "train" in variant:
        out["train"] = recipe_train(base.get("train"), variant["train"], where)
    return out


def plan_losses(config: str | Path, losses: Sequence[str], overrides: Sequence[str] = (),
                variants: Path | None = None, cross_rank: bool = False, tuned: bool = True) -> list[LossPlan]:
    """Each loss's starting config and search space, validated (corners of every range included)
    before any training; when the study is `tuned`, a `--set` key that a loss searches is refused (the
    search would be void); untuned, a `--set` simply fixes that value for every loss."""
    base = read_mapping(Path(config), "config file")
    variants = Path(variants) if variants is not None else REPO_VARIANTS
    plans = []
    for loss in losses:
        path, variant = _variant(loss, variants)
        mapping = apply_variant(base, loss, variant, str(path))
        plan = LossPlan(loss, f"{config} [{loss}]", mapping, (), tuple(overrides), cross_rank)
        plan.config(0)
        dims = parse_search(variant.get(STUDY_SECTION), str(path), lambda values, p=plan: p.config(0, values))
        clash = sorted({item.split("=", 1)[0].strip() for item in overrides} & {d.key for d in dims})
        if clash and tuned:
            raise UserError(f"--set {clash[0]}: is searched for loss '{loss}' (search.{clash[0]} in {path}); "
                            f"drop the --set or the search entry")
        plans.append(LossPlan(plan.loss, plan.source, plan.mapping, dims, plan.overrides, cross_rank))
    return plans


def plan_study(config: str | Path, losses: Sequence[str], seeds: int, out: Path, overrides: Sequence[str] = (),
               variants: Path | None = None, cross_rank: bool = False) -> list[StudyRun]:
    """Every (loss, seed) run at the variants' own settings (no tuning), with its resolved config."""
    if seeds < 1:
        raise UserError(f"--seeds: must be >= 1, got {seeds}")
    plans = plan_losses(config, losses, overrides, variants, cross_rank, tuned=False)
    return [StudyRun(p.loss, seed, out / p.loss / f"seed{seed}", p.config(seed))
            for p in plans for seed in range(seeds)]


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def run_state(run_dir: Path, cfg: DictConfig) -> str:
    """`new` (nothing there), `partial` (started, same config) or `done` (evaluated at the last epoch).
    A directory holding a run of a different config (the `log` section aside) is an error: results must
    not be mixed."""
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        return "new"
    old = without_log(yaml.safe_load(stored.read_text()))
    new = without_log(yaml.safe_load(to_yaml(settle_precision(cfg))))
    if old != new:
        raise UserError(f"{run_dir}: holds a run with a different config ({_first_difference(old, new)}); "
                        f"use another --out")
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        epochs = [entry["epoch"] for entry in json.loads(metrics.read_text()).get("epochs", [])]
        if epochs and max(epochs) >= cfg.train.epochs:
            return "done"
    return "partial"


def describe(cfg: DictConfig) -> dict[str, Any]:
    """What the study held fixed for every loss (the budget), for the report header."""
    return {"model": f"{cfg.model.arch} (pretrained: {cfg.model.pretrained or 'none'})",
            "data": f"{cfg.data.dataset} at {cfg.data.root}, {cfg.data.image_size} px, "
                    f"val_classes={cfg.data.val_classes}",
            "training": f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}, precision {precision_of(cfg).name} "
                        f"(each loss's optimizer recipe is listed with it below)"}
