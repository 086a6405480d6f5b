"""The `search:` section of the recipe variants: schema, one-line errors naming file and key, the repo's spaces."""
from pathlib import Path

import pytest

from unidml.errors import UserError
from unidml.study.compare import REPO_VARIANTS, plan_losses
from unidml.study.search_space import Dimension, parse_dimension, with_values

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def test_dimensions_parse_ranges_scales_and_choices():
    assert parse_dimension("train.lr", {"low": 0.001, "high": 0.1, "log": True}) == Dimension("train.lr", 0.001, 0.1,
                                                                                                log=True)
    assert parse_dimension("loss.power", {"low": 1, "high": 3, "type": "int"}) == Dimension("loss.power", 1, 3,
                                                                                             integer=True)
    assert parse_dimension("data.m_per_class", {"choices": [2, 4]}).choices == (2, 4)
    assert parse_dimension("loss.margin", {"low": 0, "high": 1, "step": 0.25}).step == 0.25


@pytest.mark.parametrize("spec, message", [
    ({"low": 0.1}, "needs both 'low' and 'high'"),
    ({"low": 1.0, "high": 0.1}, "needs low < high"),
    ({"low": 0.0, "high": 1.0, "log": True}, "a log scale needs low > 0"),
    ({"low": 0.1, "high": 1.0, "scale": "log"}, "unknown field"),
    ({"low": 0.5, "high": 2, "type": "int"}, "integer low, high and step"),
    ({"low": "a", "high": 1.0}, "low must be a number"),
    ({"choices": []}, "non-empty list"),
    ({"choices": [1, 1]}, "distinct scalars"),
    ({"choices": [1], "low": 0}, "takes no other key"),
    (0.1, "expected a mapping"),
])
def test_bad_dimensions_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_dimension("train.lr", spec)


def variant(tmp_path, search: str) -> Path:
    directory = tmp_path / "variants"
    directory.mkdir(exist_ok=True)
    (directory / "triplet.yaml").write_text(f"loss: {{name: triplet, margin: 0.2}}\ndata: {{sampler: m_per_class}}\n"
                                            f"search:\n{search}")
    return directory


@pytest.mark.parametrize("search, message", [
    ("  loss.margin: {low: 0.1, high: 0.01}\n", r"triplet.yaml: key 'search.loss.margin': needs low < high"),
    ("  loss.nope: {low: 0.1, high: 1.0}\n",
     r"key 'search.loss.nope': value 0.1 is refused: .*unknown parameter 'nope'"),
    ("  loss.mining: {choices: [semi_hard, sideways]}\n", r"key 'search.loss.mining': value 'sideways' is refused"),
    ("  train.seed: {choices: [0, 1]}\n", r"key 'search.train.seed': is fixed by the study"),
    ("  lr: {low: 0.1, high: 1.0}\n", r"key 'search.lr': expected a dotted key"),
    ("  - train.lr\n", r"key 'search': expected a mapping"),
])
def test_bad_search_sections_fail_in_one_line_naming_file_and_key(tmp_path, search, message):
    with pytest.raises(UserError, match=message) as info:
        plan_losses(QUICKSTART, ["triplet"], variants=variant(tmp_path, search))
    assert "\n" not in str(info.value)


def test_a_searched_key_cannot_also_be_set(tmp_path):
    directory = variant(tmp_path, "  train.lr: {low: 0.001, high: 0.1, log: true}\n")
    with pytest.raises(UserError, match=r"--set train.lr: is searched for loss 'triplet'"):
        plan_losses(QUICKSTART, ["triplet"], ["train.lr=0.01"], variants=directory)


def test_values_go_into_the_config_mapping_with_their_types():
    out = with_values({"train": {"lr": 0.1}, "data": None}, {"train.lr": 1e-05, "data.m_per_class": 8})
    assert out == {"train": {"lr": 1e-05}, "data": {"m_per_class": 8}}


def test_every_repo_variant_searches_rates_on_a_log_scale_and_validates():
    losses = sorted(p.stem for p in REPO_VARIANTS.glob("*.yaml"))
    plans = plan_losses(QUICKSTART, losses)
    for plan in plans:
        keys = {d.key: d for d in plan.dims}
        assert keys["train.lr"].log and keys["train.weight_decay"].log, plan.loss
        cfg = plan.config(3, {d.key: d.corners()[-1] for d in plan.dims}, epochs=2)
        assert (cfg.train.seed, cfg.train.epochs, cfg.train.lr) == (3, 2, keys["train.lr"].high)
