"""A fair study: a variant owns its loss's optimizer recipe, the search reaches every optimizer family
with its own learning-rate range, and pruning spares trials that dip early."""
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from unidml.engine.optim import build_optimizer
from unidml.errors import UserError
from unidml.models import build_model
from unidml.study.compare import REPO_VARIANTS, plan_losses
from unidml.study.search_space import params_of, parse_search, suggest, values_of
from unidml.study.tuning import LossStudies, StudySettings, report_and_check

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
PAIRWISE = ("contrastive", "triplet", "multi_similarity")


def variants(tmp_path: Path, text: str, loss: str = "contrastive") -> Path:
    directory = tmp_path / "variants"
    directory.mkdir(exist_ok=True)
    (directory / f"{loss}.yaml").write_text(text)
    return directory


ADAMW = "loss: {name: contrastive}\ntrain: {optimizer: adamw, lr: 0.001, weight_decay: 0.0001, warmup_iters: 0}\n"


def test_a_variant_choosing_adamw_over_a_nesterov_base_trains_with_adamw(tmp_path):
    base = yaml.safe_load(QUICKSTART.read_text())
    assert base["train"]["nesterov"] is True and base["train"]["momentum"] == 0.9
    plan = plan_losses(QUICKSTART, ["contrastive"], variants=variants(tmp_path, ADAMW))[0]
    cfg = plan.config(0)
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_iters) == ("adamw", 1e-3,
                                                                                                    1e-4, 0)
    assert (cfg.train.momentum, cfg.train.nesterov) == (0.0, False)  # nothing of the base's SGD leaks in
    assert (cfg.train.epochs, cfg.train.batch_size) == (base["train"]["epochs"], base["train"]["batch_size"])
    model = build_model(cfg.model, int(cfg.data.image_size))
    optimizer = build_optimizer(model, cfg.train)
    assert type(optimizer) is torch.optim.AdamW
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = optimizer.state[next(model.parameters())]
    assert {"exp_avg", "exp_avg_sq"} <= set(state)  # an AdamW step, not SGD's momentum buffer


def test_the_search_switching_optimizer_brings_that_optimizers_defaults():
    plan = plan_losses(QUICKSTART, ["contrastive"])[0]
    sgd = plan.config(0, {"train.optimizer": "sgd", "train.lr": 0.05})
    assert (sgd.train.optimizer, sgd.train.lr, sgd.train.momentum, sgd.train.nesterov) == ("sgd", 0.05, 0.9, True)
    back = plan_losses(QUICKSTART, ["multi_similarity"])[0].config(0, {"train.optimizer": "adamw", "train.lr": 1e-3})
    assert (back.train.optimizer, back.train.momentum, back.train.nesterov) == ("adamw", 0.0, False)


@pytest.mark.parametrize("text, message", [
    ("loss: {name: contrastive}\ntrain: {optimizer: adamw, lr: 0.001, warmup_iters: 0}\n",
     r"contrastive.yaml: key 'train.weight_decay': missing"),
    ("loss: {name: contrastive}\ntrain: {optimizer: adamw, lr: 0.001, weight_decay: 0, warmup_iters: 0, epochs: 3}\n",
     r"contrastive.yaml: key 'train.epochs': a variant sets only the recipe keys"),
    ("loss: {name: contrastive}\ntrain: {optimizer: adagrad, lr: 0.001, weight_decay: 0, warmup_iters: 0}\n",
     r"contrastive.yaml: key 'train.optimizer': 'adagrad' is not one of sgd, adamw, lars, lamb"),
])
def test_a_bad_variant_train_section_is_one_line(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as info:
        plan_losses(QUICKSTART, ["contrastive"], variants=variants(tmp_path, text))
    assert "\n" not in str(info.value)


def test_cross_entropy_keeps_the_base_recipe():
    base = yaml.safe_load(QUICKSTART.read_text())["train"]
    cfg = plan_losses(QUICKSTART, ["cross_entropy"])[0].config(0)
    assert {k: cfg.train[k] for k in base if k != "seed"} == {k: v for k, v in base.items() if k != "seed"}


@pytest.mark.parametrize("loss", PAIRWISE)
def test_pairwise_variants_carry_optimizer_and_head_in_recipe_and_search(loss):
    variant = yaml.safe_load((REPO_VARIANTS / f"{loss}.yaml").read_text())
    assert {"optimizer", "lr", "weight_decay", "warmup_iters"} <= set(variant["train"])
    assert "feature_bn" in variant["model"]
    assert {"train.optimizer", "train.lr", "model.feature_bn"} <= set(variant["search"])
    plan = plan_losses(QUICKSTART, [loss])[0]
    ranges = {d.given[1]: (d.low, d.high, d.log) for d in plan.dims if d.key == "train.lr"}
    assert ranges == {"sgd": (1e-2, 0.3, True), "adamw": (1e-4, 3e-3, True)}


CONDITIONAL = {"train.optimizer": {"choices": ["adamw", "sgd"]},
               "train.lr": {"given": "train.optimizer", "adamw": {"low": 1e-4, "high": 3e-3, "log": True},
                            "sgd": {"low": 1e-2, "high": 0.3, "log": True}}}


def test_a_conditional_range_is_drawn_only_on_its_branch():
    checked = []
    dims = parse_search(CONDITIONAL, "v.yaml", checked.append)
    assert [(d.name, d.given) for d in dims] == [("train.optimizer", None),
                                                  ("train.lr|adamw", ("train.optimizer", "adamw")),
                                                  ("train.lr|sgd", ("train.optimizer", "sgd"))]
    assert {"train.optimizer": "sgd", "train.lr": 0.3} in checked  # each branch's corners with its choice
    assert {"train.optimizer": "adamw", "train.lr": 1e-4} in checked
    drawn = suggest(optuna.trial.FixedTrial({"train.optimizer": "sgd", "train.lr|sgd": 0.05}), dims)
    assert drawn == {"train.optimizer": "sgd", "train.lr": 0.05}
    assert params_of(drawn, dims) == {"train.optimizer": "sgd", "train.lr|sgd": 0.05}
    assert values_of(params_of(drawn, dims), dims) == drawn
    assert params_of({"train.optimizer": "adamw", "train.lr": 0.05}, dims) == {"train.optimizer": "adamw"}  # outside


@pytest.mark.parametrize("spec, message", [
    ({"train.lr": {"given": "train.optimizer", "sgd": {"low": 0.01, "high": 0.3}}},
     r"key 'search.train.lr': given: 'train.optimizer' must be a categorical search key listed before"),
    ({**CONDITIONAL, "train.lr": {"given": "train.optimizer", "lamb": {"low": 0.01, "high": 0.3}}},
     r"key 'search.train.lr': 'lamb' is not a choice of train.optimizer"),
])
def test_bad_conditional_entries_are_one_line(spec, message):
    with pytest.raises(UserError, match=message):
        parse_search(spec, "v.yaml", lambda values: None)


def test_trial_zero_is_the_recipe_and_the_fingerprint_holds_the_branches(tmp_path):
    plan = plan_losses(QUICKSTART, ["contrastive"])[0]
    studies = LossStudies(StudySettings(out=tmp_path, trials=2, seeds=1), [plan], f"sqlite:///{tmp_path / 's.db'}")
    recipe = studies.recipe_values("contrastive")
    assert recipe["train.optimizer"] == "adamw" and recipe["train.lr|adamw"] == 1e-3 and "train.lr|sgd" not in recipe
    assert recipe["model.feature_bn"] is False and recipe["loss.neg_margin"] == 0.5
    givens = [d["given"] for d in studies.fingerprint(plan)["search"] if d["key"] == "train.lr"]
    assert givens == [["train.optimizer", "adamw"], ["train.optimizer", "sgd"]]
    trial = studies.start_trial("contrastive", 0)
    assert suggest(trial, plan.dims) == values_of(recipe, plan.dims)


def _curve_run(studies, slot: int, curve: list[float]) -> int | None:
    """Report `curve` (val R@1 at epochs 1..E) for trial `slot`; the epoch it was stopped at, or None."""
    trial = studies.start_trial("cross_entropy", slot)
    suggest(trial, studies.plans["cross_entropy"].dims)
    for epoch, value in enumerate(curve, start=1):
        if report_and_check(trial, {"epoch": epoch, "splits": {"val": {"recall@1": value}}}, len(curve), "recall@1"):
            studies.studies["cross_entropy"].tell(trial, state=optuna.trial.TrialState.PRUNED)
            return epoch
    studies.studies["cross_entropy"].tell(trial, max(curve))
    return None


STEADY = [44.0, 46.0, 48.0, 50.0, 52.0, 54.0, 55.0, 56.0, 57.0, 58.0]
LATE_BLOOMER = [30.0, 28.0, 31.0, 38.0, 54.0, 60.0, 64.0, 67.0, 69.0, 70.0]  # dips below everyone, ends best
FLAT_BAD = [30.0] * 10


@pytest.mark.parametrize("share, bloomer_stopped", [(0.5, None), (0.2, 2)])
def test_pruning_keeps_a_late_bloomer_and_cuts_a_flat_bad_trial(tmp_path, share, bloomer_stopped):
    plan = plan_losses(QUICKSTART, ["cross_entropy"])[0]
    settings = StudySettings(out=tmp_path, trials=5, seeds=1, prune_warmup_share=share)
    defaults = StudySettings(out=tmp_path, trials=1, seeds=1)
    assert (defaults.prune_startup_trials, defaults.prune_warmup_share) == (3, 0.5)
    studies = LossStudies(settings, [plan], f"sqlite:///{tmp_path / 's.db'}")
    for slot, offset in enumerate((-1.0, 0.0, 1.0)):  # three completed trials: the median is STEADY
        assert _curve_run(studies, slot, [v + offset for v in STEADY]) is None
    # with the default share (half of 10 epochs) the dip at epochs 1-4 is never judged; at 20 % it is cut
    assert _curve_run(studies, 3, LATE_BLOOMER) == bloomer_stopped
    assert _curve_run(studies, 4, FLAT_BAD) == settings.prune_after(10)
    if bloomer_stopped is None:
        assert studies.best("cross_entropy").user_attrs["unidml_slot"] == 3  # the late bloomer is the choice


def test_a_variant_file_trains_on_its_own_and_an_override_switches_the_optimizer():
    from unidml.run_config import load_run_config

    alone = load_run_config([QUICKSTART, REPO_VARIANTS / "contrastive.yaml"])  # as `unidml train --config A --config B`
    assert (alone.train.optimizer, alone.train.momentum, alone.train.nesterov, alone.train.lr) == ("adamw", 0.0,
                                                                                                   False, 1e-3)
    switched = load_run_config(QUICKSTART, ["train.optimizer=adamw"])  # refused while Nesterov leaked, before
    assert (switched.train.optimizer, switched.train.nesterov) == ("adamw", False)
    kept = load_run_config(QUICKSTART, ["train.optimizer=adamw", "train.optimizer=sgd", "train.momentum=0.5"])
    assert (kept.train.momentum, kept.train.nesterov) == (0.5, True)
