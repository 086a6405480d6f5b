"""`unidml compare` without tuning: run planning (aliases, variants, overrides, protocol), resumability,
and a tiny study end to end."""
import json
from pathlib import Path

import pytest
import yaml

from unidml.engine.trainer import Trainer
from unidml.errors import UserError
from unidml.launcher.cli import main
from unidml.study.compare import REPO_VARIANTS, parse_losses, plan_study, run_state

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def tiny(data_root: Path) -> list[str]:
    sets = [f"data.root={data_root}", "data.synthetic.classes=16", "data.synthetic.per_class=6",
            "data.synthetic.size=32", "data.image_size=32", "data.resize_size=32", "data.num_workers=0",
            "data.backend=torchvision", "train.epochs=1", "train.batch_size=16", "train.lr=0.01",
            "train.warmup_iters=1", "eval.ks=[1,2]", "eval.batch_size=64", "engine.precision=fp32"]
    return [arg for item in sets for arg in ("--set", item)]


def test_loss_names_aliases_and_errors():
    assert parse_losses("ce, contrastive,ms,cross_entropy") == ["cross_entropy", "contrastive", "multi_similarity"]
    with pytest.raises(UserError, match="unknown loss 'no_such_loss'"):
        parse_losses("ce,no_such_loss")


def test_plan_swaps_only_the_loss_sampler_and_head(tmp_path):
    plan = plan_study(QUICKSTART, ["cross_entropy", "triplet"], 2, tmp_path, ["train.epochs=3"])
    assert [(r.loss, r.seed, r.run_dir) for r in plan] == [
        ("cross_entropy", 0, tmp_path / "cross_entropy" / "seed0"),
        ("cross_entropy", 1, tmp_path / "cross_entropy" / "seed1"),
        ("triplet", 0, tmp_path / "triplet" / "seed0"), ("triplet", 1, tmp_path / "triplet" / "seed1")]
    ce, triplet = plan[0].cfg, plan[2].cfg
    base = yaml.safe_load(QUICKSTART.read_text())
    assert dict(ce.loss) == base["loss"] and ce.data.sampler == "random"
    assert dict(triplet.loss) == {"name": "triplet", "margin": 0.1, "mining": "all", "distance": "euclidean",
                                  "normalize": True}
    assert (triplet.data.sampler, triplet.data.m_per_class) == ("m_per_class", 4)
    ms = plan_study(QUICKSTART, ["multi_similarity"], 1, tmp_path)[0].cfg
    assert yaml.safe_load((REPO_VARIANTS / "multi_similarity.yaml").read_text())["model"] == {"feature_bn": True}
    assert ce.model.feature_bn is False and dict(ms.model) == {**ce.model, "feature_bn": True}
    assert (ce.train.optimizer, ce.train.lr) == ("sgd", base["train"]["lr"])  # CE keeps the base's recipe
    assert (triplet.train.optimizer, triplet.train.lr, triplet.train.nesterov) == ("adamw", 1e-3, False)
    for run in plan:  # the budget stays the base's
        assert (run.cfg.train.epochs, run.cfg.train.seed, run.cfg.train.resume) == (3, run.seed, "auto")
        assert (run.cfg.model.arch, run.cfg.train.batch_size, run.cfg.data.image_size) == (
            ce.model.arch, ce.train.batch_size, ce.data.image_size)
    distributed = plan_study(QUICKSTART, ["cross_entropy", "snca"], 1, tmp_path, cross_rank=True)
    assert "cross_rank" not in distributed[0].cfg.loss and distributed[1].cfg.loss.cross_rank is True


def test_bad_variant_and_bad_override_fail_before_training(tmp_path):
    variants = tmp_path / "variants"
    variants.mkdir()
    (variants / "snca.yaml").write_text("loss: {name: snca}\neval: {ks: [1]}\n")
    with pytest.raises(UserError, match="snca.yaml: a variant holds only 'loss'.*'model', 'train' and 'search'"):
        plan_study(QUICKSTART, ["snca"], 1, tmp_path, variants=variants)
    with pytest.raises(UserError, match="contrastive.yaml: recipe variant of loss 'contrastive' not found"):
        plan_study(QUICKSTART, ["contrastive"], 1, tmp_path, variants=variants)
    with pytest.raises(UserError, match="key 'loss'.*unknown parameter 'margin'"):
        plan_study(QUICKSTART, ["snca"], 1, tmp_path, ["loss.margin=0.1"])


def test_a_directory_of_another_config_is_refused(tmp_path):
    run = plan_study(QUICKSTART, ["cross_entropy"], 1, tmp_path)[0]
    assert run_state(run.run_dir, run.cfg) == "new"
    run.run_dir.mkdir(parents=True)
    other = plan_study(QUICKSTART, ["cross_entropy"], 1, tmp_path, ["train.epochs=5"])[0]
    assert run.cfg.train.epochs != 5
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(open(REPO / "configs" / "quickstart.yaml"))))
    with pytest.raises(UserError, match="holds a run with a different config"):
        run_state(run.run_dir, run.cfg)
    from unidml.config import to_yaml
    from unidml.runtime.precision import settle_precision
    # A run stores its config with `engine.precision: auto` resolved (the Trainer settles it).
    (run.run_dir / "config.yaml").write_text(to_yaml(settle_precision(other.cfg)))
    with pytest.raises(UserError, match=rf"train.epochs: 5 -> {run.cfg.train.epochs}\b"):
        run_state(run.run_dir, run.cfg)
    (run.run_dir / "config.yaml").write_text(to_yaml(settle_precision(run.cfg)))
    assert run_state(run.run_dir, run.cfg) == "partial"
    (run.run_dir / "metrics.json").write_text(json.dumps({"epochs": [{"epoch": 0}, {"epoch": 12}]}))
    assert run_state(run.run_dir, run.cfg) == "done"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_study_end_to_end_and_resumable(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    args = ["compare", "--config", str(QUICKSTART), "--losses", "ce,multi_similarity", "--seeds", "2",
            "--out", str(out), *tiny(tmp_path / "data")]
    assert main(args) == 0
    for loss in ("cross_entropy", "multi_similarity"):
        for seed in (0, 1):
            metrics = json.loads((out / loss / f"seed{seed}" / "metrics.json").read_text())
            assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
            assert {"test", "val"} <= metrics["epochs"][1]["splits"].keys()
            assert {"tightness", "contrast", "mi_knn"} <= metrics["epochs"][1].keys()
    # same seed, same initial network whatever the loss: identical evaluation before training
    first = [json.loads((out / loss / "seed0" / "metrics.json").read_text())["epochs"][0]["splits"]
             for loss in ("cross_entropy", "multi_similarity")]
    assert first[0] == first[1]
    page = (out / "summary.md").read_text()
    assert "| cross_entropy | 2 | 1.0 ± 0.0 |" in page and "| multi_similarity | 2 | 1.0 ± 0.0 |" in page
    assert "No tuning: every loss trains at its recipe variant's settings" in page
    for png in ("recall_at_k", "training_curves", "tightness_contrast", "mutual_information"):
        assert (out / f"{png}.png").stat().st_size > 0

    def refuse(self):
        raise AssertionError("a finished run was retrained")
    monkeypatch.setattr(Trainer, "fit", refuse)
    before = (out / "summary.csv").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert "retraining" not in capsys.readouterr().out
    assert (out / "summary.csv").read_text() == before
