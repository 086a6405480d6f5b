"""The dataset recipes: they hold the authors' settings, validate with every loss variant, and train one
step on a tiny fixture tree of their dataset's format (small images, ResNet-18, no pretrained weights)."""
import math
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from test_data_fixtures import make_cars, make_cub, make_inshop, make_sop

from unidml.config.schema import OPTIMIZER_DEFAULTS
from unidml.engine.distributed import init_distributed
from unidml.engine.optim import effective_lr
from unidml.engine.trainer import Trainer
from unidml.run_config import load_run_config
from unidml.study.compare import REPO_VARIANTS, plan_study

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = ("cub", "cars", "sop", "inshop", "sop_large_batch", "inshop_large_batch")
# docs/design.md, "Datasets" and "Training recipe": dataset, epochs, lr, momentum, Nesterov, train resize,
# jitter, BN1d, Recall@K set.
PAPER = {
    "cub": ("cub", 30, 0.02, 0.0, False, "shorter", [0.25, 0.25, 0.25, 0.0], False, [1, 2, 4, 8, 16, 32]),
    "cars": ("cars", 100, 0.05, 0.0, False, "square", [0.3, 0.3, 0.3, 0.1], True, [1, 2, 4, 8, 16, 32]),
    "sop": ("sop", 100, 0.003, 0.99, True, "square", [0.0] * 4, True, [1, 10, 100, 1000]),
    "inshop": ("inshop", 100, 0.003, 0.99, True, "none", [0.0] * 4, True, [1, 10, 20, 30, 40, 50]),
}
FIXTURES = {"cub": make_cub, "cars": make_cars, "inshop": make_inshop,
            "sop": lambda root: make_sop(root, train_classes=2, test_classes=2, per_class=2)}


@pytest.mark.parametrize("name", list(PAPER))
def test_recipe_holds_the_authors_settings(name):
    cfg = load_run_config(CONFIGS / f"{name}.yaml")
    dataset, epochs, lr, momentum, nesterov, resize, jitter, bn1d, ks = PAPER[name]
    assert cfg.data.dataset == dataset and cfg.data.sampler == "random"
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.momentum, cfg.train.nesterov) == (epochs, lr, momentum, nesterov)
    assert (cfg.train.batch_size, cfg.train.weight_decay, cfg.train.warmup_iters) == (128, 5e-4, 100)
    assert (cfg.data.train_resize, list(cfg.data.color_jitter), list(cfg.eval.ks)) == (resize, jitter, ks)
    assert (cfg.data.image_size, cfg.data.resize_size, list(cfg.data.crop_scale)) == (224, 256, [0.16, 1.0])
    assert (cfg.model.arch, cfg.model.pretrained, cfg.model.pretrained_required) == ("resnet50", "IMAGENET1K_V1", True)
    assert (cfg.model.embedding_dim, cfg.model.freeze_bn, cfg.model.feature_bn) == (0, True, bn1d)
    assert dict(cfg.loss) == {"name": "cross_entropy", "label_smoothing": 0.1, "dropout": 0.5}


@pytest.mark.parametrize("name", ["sop", "inshop"])
def test_large_batch_recipe_scales_the_recipe(name):
    small = load_run_config(CONFIGS / f"{name}.yaml")
    large = load_run_config(CONFIGS / f"{name}_large_batch.yaml")
    assert large.train.batch_size >= 1024 and large.engine.backend == "ddp"
    # LAMB with its rate stated at the reference batch and scaled by the square root (You et al. 2020)
    assert (large.train.optimizer, large.train.lr_scaling) == ("lamb", "sqrt")
    assert effective_lr(large.train) == pytest.approx(
        large.train.lr * math.sqrt(large.train.batch_size / large.train.lr_reference_batch))
    assert (large.train.momentum, large.train.nesterov, large.train.eps) == (0.0, False, 1e-6)  # no SGD key leaks
    assert large.train.warmup_iters > small.train.warmup_iters
    assert (large.data, large.model, large.loss, large.eval) == (small.data, small.model, small.loss, small.eval)
    header = (CONFIGS / f"{name}_large_batch.yaml").read_text()  # the comment states what the file sets
    assert f"global batch of {large.train.batch_size} images" in header
    assert f"to {effective_lr(large.train):.4f} at {large.train.batch_size}" in header


@pytest.mark.parametrize("name", ["cub", "sop_large_batch"])  # the recipes differ in batch size only: 128, 2048
def test_every_loss_variant_validates_on_every_recipe(name, tmp_path):
    from unidml.losses import LOSSES

    losses = sorted(p.stem for p in REPO_VARIANTS.glob("*.yaml"))
    assert {"cross_entropy", "contrastive", "triplet", "multi_similarity", "snca", "supcon", "pce"} <= set(losses)
    assert set(losses) <= set(LOSSES)
    plan = plan_study(CONFIGS / f"{name}.yaml", losses, 1, tmp_path)
    base = load_run_config(CONFIGS / f"{name}.yaml")
    base_train, base_model = OmegaConf.to_container(base.train), OmegaConf.to_container(base.model)
    for run in plan:
        variant = yaml.safe_load((REPO_VARIANTS / f"{run.loss}.yaml").read_text())
        own = run.loss == base.loss.name  # the base config's own loss keeps its sections
        assert run.cfg.loss.name == run.loss
        assert run.cfg.data.sampler == ("random" if run.loss == "cross_entropy" else variant["data"]["sampler"])
        recipe = {} if own or "train" not in variant else {**OPTIMIZER_DEFAULTS[variant["train"]["optimizer"]],
                                                            **variant["train"]}
        assert OmegaConf.to_container(run.cfg.train) == {**base_train, **recipe, "seed": 0, "resume": "auto"}
        assert OmegaConf.to_container(run.cfg.model) == {**base_model, **({} if own else variant.get("model", {}))}
        assert run.cfg.eval == plan[0].cfg.eval


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(PAPER))  # the large-batch recipes share these data/model/loss sections
def test_recipe_trains_one_step_on_a_fixture_tree(name, tmp_path):
    root = FIXTURES[name](tmp_path / "data")
    overrides = [f"data.root={root}", "model.arch=resnet18", "model.pretrained=", "data.image_size=32",
                 "data.resize_size=36", "data.num_workers=0", "data.backend=torchvision", "train.epochs=1",
                 "train.batch_size=4", "engine.precision=fp32", "engine.backend=single", "eval.batch_size=8",
                 "data.val_classes=0", "eval.split=test",  # the fixture trees have 2-3 training classes
                 "eval.ks=[1]"]  # and galleries of a few images: the recipes' larger K are refused there
    cfg = load_run_config(CONFIGS / f"{name}.yaml", overrides)
    trainer = Trainer(cfg, tmp_path / "run", init_distributed("cpu"))
    result = trainer.fit()
    assert trainer.step >= 1
    assert [entry["epoch"] for entry in result["epochs"]] == [0, 1]
    assert f"recall@{cfg.eval.ks[0]}" in result["best"] and "mi_knn" in result["best"]
