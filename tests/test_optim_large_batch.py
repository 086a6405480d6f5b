"""LARS and LAMB against their formulas, the trust ratio's exclusions and zero-norm cases, resume, the
learning rate's scaling with the global batch, and the config and recipe rules of the optimizer keys."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from unidml.config import ConfigError, TrainConfig
from unidml.engine.distributed import init_distributed
from unidml.engine.large_batch_optim import Lamb, Lars
from unidml.engine.optim import (
    build_optimizer,
    build_scheduler,
    effective_lr,
    lr_scaling_line,
    optimizer_groups,
    scaled_lr,
)
from unidml.engine.trainer import Trainer
from unidml.run_config import load_run_config
from unidml.study.compare import plan_losses
from unidml.study.recipe import recipe_train, with_optimizer

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
# Each parameter below goes through about 40 rounded float64 operations in two steps (norms of at most 6
# elements, moments, bias corrections), so it is off from the exact value by < 40 x 2^-53 relative,
# ~4e-15; 1e-13 leaves room for that and is still ~10^7 below what any change of formula moves (eps
# 1e-6 against gradients ~1, a bias correction 1 - 0.9 = 0.1, a trust ratio ~1 in a 1e-2 step).
RTOL, ATOL = 1e-13, 1e-15


class Tiny(nn.Module):
    """A matrix (decayed, trust-ratio adapted), its bias and a norm weight (neither decayed nor adapted)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], dtype=torch.float64))
        self.bias = nn.Parameter(torch.tensor([0.1, -0.2], dtype=torch.float64))
        self.norm_weight = nn.Parameter(torch.tensor([1.0, 0.9], dtype=torch.float64))


# two steps of fixed gradients per parameter (a backward pass would only add its own rounding)
GRADS = {"weight": [np.array([[0.3, -0.1, 0.2], [0.05, 0.4, -0.6]]), np.array([[-0.2, 0.3, 0.1], [0.7, -0.1, 0.2]])],
         "bias": [np.array([0.5, -0.25]), np.array([0.1, 0.3])],
         "norm_weight": [np.array([-0.2, 0.1]), np.array([0.4, -0.05])]}


def two_steps(module: nn.Module, optimizer: torch.optim.Optimizer, grads: dict = GRADS) -> None:
    for step in range(2):
        for name, p in module.named_parameters():
            p.grad = torch.tensor(grads[name][step], dtype=p.dtype)
        optimizer.step()


def norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(x * x)))


def lamb_reference(w, grads, lr, betas, eps, decay, adapt):
    """LAMB, Algorithm 2 of You et al. 2020 (phi = identity), in float64 NumPy."""
    (b1, b2), m, v = betas, np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + decay * w
        ratio = norm(w) / norm(u) if adapt and norm(w) > 0 and norm(u) > 0 else 1.0
        w = w - lr * ratio * u
    return w


def lars_reference(w, grads, lr, momentum, eta, decay, adapt):
    """LARS, Algorithm 1 of You et al. 2017, with the learning rate outside the momentum buffer."""
    buf = np.zeros_like(w)
    for g in grads:
        ratio = eta * norm(w) / (norm(g) + decay * norm(w)) if adapt and norm(w) > 0 and norm(g) > 0 else 1.0
        buf = momentum * buf + ratio * (g + decay * w)
        w = w - lr * buf
    return w


def values(module: nn.Module) -> dict[str, np.ndarray]:
    return {name: p.detach().numpy().copy() for name, p in module.named_parameters()}


def test_lamb_two_steps_match_the_formula_with_biases_and_norm_weights_unadapted():
    module = Tiny()
    start = values(module)
    lr, betas, eps, decay = 0.01, (0.9, 0.999), 1e-6, 0.1
    groups = optimizer_groups(module, lr, decay)
    assert {g["name"]: (len(g["params"]), g["layer_adaptation"], g["weight_decay"]) for g in groups} == \
        {"loss/decay": (1, True, decay), "loss/no_decay": (2, False, 0.0)}
    two_steps(module, Lamb(groups, lr=lr, betas=betas, eps=eps))
    for name, got in values(module).items():
        adapted = name == "weight"
        want = lamb_reference(start[name], GRADS[name], lr, betas, eps, decay if adapted else 0.0, adapted)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
    # the exclusion matters: the bias adapted by its trust ratio would have moved elsewhere
    adapted_bias = lamb_reference(start["bias"], GRADS["bias"], lr, betas, eps, 0.0, True)
    assert np.abs(values(module)["bias"] - adapted_bias).max() > 1e-4


def test_lars_two_steps_match_the_formula_with_biases_and_norm_weights_unadapted():
    module = Tiny()
    start = values(module)
    lr, momentum, eta, decay = 0.5, 0.9, 0.001, 5e-4
    two_steps(module, Lars(optimizer_groups(module, lr, decay), lr=lr, momentum=momentum, trust_coefficient=eta))
    for name, got in values(module).items():
        adapted = name == "weight"
        want = lars_reference(start[name], GRADS[name], lr, momentum, eta, decay if adapted else 0.0, adapted)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
    adapted_bias = lars_reference(start["bias"], GRADS["bias"], lr, momentum, eta, 0.0, True)
    assert np.abs(values(module)["bias"] - adapted_bias).max() > 1e-2  # eta 0.001 would shrink its step ~1000x


def test_build_optimizer_gives_lars_and_lamb_the_config_keys_and_the_model_groups():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    for name, kind in (("lars", Lars), ("lamb", Lamb)):
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"optimizer": name, "lr": 0.2, "momentum": 0.8,
                                                                   "betas": [0.8, 0.99], "eps": 1e-7,
                                                                   "trust_coefficient": 0.02})
        optimizer = build_optimizer(module, cfg)
        assert type(optimizer) is kind
        adapted = {id(p): g["layer_adaptation"] for g in optimizer.param_groups for p in g["params"]}
        # conv and linear kernels adapted; conv/linear biases and BatchNorm weight/bias not
        assert [adapted[id(p)] for p in module.parameters()] == [True, False, False, False, True, False]
        group = optimizer.param_groups[0]
        if name == "lars":
            assert (group["momentum"], group["trust_coefficient"]) == (0.8, 0.02)
        else:
            assert (group["betas"], group["eps"]) == ((0.8, 0.99), 1e-7)


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_a_zero_weight_or_a_zero_gradient_takes_trust_ratio_one(kind):
    lr, decay = 0.1, 0.01
    zero_w = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))  # a zero-initialised layer
    zero_g = nn.Parameter(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64))
    start = zero_g.detach().clone()
    grad = torch.tensor([[0.3, -0.4, 0.1], [0.2, 0.0, -0.5]], dtype=torch.float64)
    if kind == "lars":
        optimizer = Lars([{"params": [zero_w, zero_g], "weight_decay": decay}], lr=lr, momentum=0.9)
    else:
        optimizer = Lamb([{"params": [zero_w]}, {"params": [zero_g], "weight_decay": 0.0}], lr=lr, eps=1e-6)
    zero_w.grad, zero_g.grad = grad.clone(), torch.zeros_like(grad)
    optimizer.step()
    assert torch.isfinite(zero_w).all() and torch.isfinite(zero_g).all()
    if kind == "lars":  # ratio 1: the plain step of gradient + decay (w = 0), and of the decay alone (g = 0)
        torch.testing.assert_close(zero_w.detach(), -lr * grad, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(zero_g.detach(), start - lr * decay * start, rtol=RTOL, atol=ATOL)
    else:  # ratio 1: Adam's first step, g / (|g| + eps) per element; a zero update leaves w where it was
        torch.testing.assert_close(zero_w.detach(), -lr * grad / (grad.abs() + 1e-6), rtol=RTOL, atol=ATOL)
        assert torch.equal(zero_g.detach(), start)


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_a_resumed_optimizer_takes_the_same_next_step(kind):
    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        module = Tiny()
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"optimizer": kind, "lr": 0.05, "momentum":
                                                                   0.9 if kind == "lars" else 0.0})
        return module, build_optimizer(module, cfg)

    module, optimizer = make()
    two_steps(module, optimizer)
    buffer = io.BytesIO()
    torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as checkpoints are read
    resumed, fresh = make()
    resumed.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    unresumed, plain = make()  # the weights without the optimizer state: its step differs (the test can tell)
    unresumed.load_state_dict(saved["model"])
    third = {name: grads[1] * 0.5 - 0.1 for name, grads in GRADS.items()}
    for m, o in ((module, optimizer), (resumed, fresh), (unresumed, plain)):
        for name, p in m.named_parameters():
            p.grad = torch.tensor(third[name], dtype=p.dtype)
        o.step()
    for (name, a), b in zip(module.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(unresumed.weight, module.weight)


def test_lr_scaling_arithmetic_and_what_the_run_logs():
    assert scaled_lr(0.1, "linear", 1024, 256) == pytest.approx(0.4, rel=1e-15)
    assert scaled_lr(0.1, "sqrt", 1024, 256) == pytest.approx(0.2, rel=1e-15)
    assert scaled_lr(0.1, "sqrt", 128, 512) == pytest.approx(0.05, rel=1e-15)
    assert scaled_lr(0.1, "none", 1024, 256) == 0.1
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"lr": 0.1, "batch_size": 512, "grad_accum": 2,
                                                               "lr_scaling": "linear"})
    assert effective_lr(cfg) == pytest.approx(0.4)  # 512 x 2 accumulated = 1024 images per step
    assert lr_scaling_line(cfg) == "lr 0.1 scaled linear to 0.4 for global batch 1024 (reference 256)"
    assert lr_scaling_line(OmegaConf.merge(cfg, {"lr_scaling": "none"})) is None


def test_warmup_ramps_to_the_scaled_lr():
    module = Tiny()
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"optimizer": "lamb", "lr": 0.01, "batch_size": 1024,
                                                               "lr_scaling": "sqrt", "loss_lr_mult": 3.0})
    optimizer = build_optimizer(module, cfg)
    scheduler = build_scheduler(optimizer, warmup_iters=4, total_iters=20)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02 * 3 / 4] * 2)  # step 0: 1/4 of it
    for _ in range(3):
        optimizer.step()  # no gradients: nothing moves
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.06] * 2)  # the scaled lr x the multiplier


def test_a_run_logs_the_scaled_lr_once_and_trains_with_lamb(tmp_path, caplog):
    overrides = [f"data.root={tmp_path / 'data'}", "data.synthetic.classes=8", "data.synthetic.per_class=8",
                 "data.synthetic.size=32", "data.image_size=32", "data.resize_size=32", "data.num_workers=0",
                 "data.backend=torchvision", "model.freeze_bn=true", "train.batch_size=16", "train.epochs=1",
                 "train.optimizer=lamb", "train.lr=0.002", "train.lr_scaling=linear", "train.lr_reference_batch=8",
                 "train.warmup_iters=2", "eval.ks=[1]", "engine.precision=fp32", "data.val_classes=0",
                 "eval.split=test"]
    with caplog.at_level(logging.INFO, logger="unidml"):
        trainer = Trainer(load_run_config(QUICKSTART, overrides), tmp_path / "run", init_distributed("cpu"))
    lines = [r.getMessage() for r in caplog.records if "scaled" in r.getMessage()]
    assert lines == ["lr 0.002 scaled linear to 0.004 for global batch 16 (reference 8)"]
    assert type(trainer.backend.optimizer) is Lamb
    groups = trainer.backend.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.004] * len(groups))
    before = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    trainer.fit()
    after = dict(trainer.module.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], p) for n, p in after.items())


@pytest.mark.parametrize("overrides, message", [
    (["train.optimizer=adagrad"], "key 'train.optimizer': 'adagrad' is not one of sgd, adamw, lars, lamb"),
    (["train.optimizer=lars", "train.trust_coefficient=0"],
     "key 'train.trust_coefficient': must be a finite number > 0, got 0.0"),
    (["train.optimizer=lars", "train.trust_coefficient=nan"],
     "key 'train.trust_coefficient': must be a finite number > 0, got nan"),
    (["train.optimizer=lamb", "train.betas=[0.9,1.0]"],
     "key 'train.betas': must be two numbers [beta1, beta2], each in [0, 1), got [0.9, 1.0]"),
    (["train.optimizer=lamb", "train.eps=0"], "key 'train.eps': must be a finite number > 0, got 0.0"),
    (["train.optimizer=lamb", "train.momentum=0.9"], "key 'train.momentum': train.optimizer=lamb does not read it"),
    (["train.optimizer=lars", "train.nesterov=true"], "key 'train.nesterov': needs train.optimizer=sgd"),
    (["train.lr_scaling=cubic"], "key 'train.lr_scaling': 'cubic' is not one of none, linear, sqrt"),
    (["train.lr_reference_batch=0"], "key 'train.lr_reference_batch': must be > 0, got 0"),
    (["train.optimizer=lamb", "loss.head_parallel=true"], "key 'loss.head_parallel': train.optimizer=lamb needs"),
    (["train.optimizer=lars", "engine.backend=deepspeed", "engine.deepspeed_config=configs/deepspeed/zero1.json"],
     "key 'engine.backend': train.optimizer=lars needs whole tensors"),
])
def test_bad_optimizer_keys_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_run_config(QUICKSTART, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_choosing_lamb_or_lars_brings_their_defaults_and_nothing_of_sgd():
    base = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
            "warmup_iters": 50, "epochs": 10, "lr_scaling": "sqrt"}
    lamb = recipe_train(base, {"optimizer": "lamb", "lr": 0.004, "weight_decay": 0.01, "warmup_iters": 5}, "v.yaml")
    assert lamb == {"epochs": 10, "lr_scaling": "sqrt", "optimizer": "lamb", "lr": 0.004, "weight_decay": 0.01,
                    "warmup_iters": 5, "momentum": 0.0, "nesterov": False, "betas": [0.9, 0.999], "eps": 1e-6,
                    "trust_coefficient": 0.001}
    lars = recipe_train({**lamb, "betas": [0.8, 0.9]}, {"optimizer": "lars", "lr": 2.0, "weight_decay": 5e-4,
                                                         "warmup_iters": 5, "trust_coefficient": 0.01}, "v.yaml")
    assert (lars["momentum"], lars["nesterov"], lars["betas"], lars["eps"], lars["trust_coefficient"]) == \
        (0.9, False, [0.9, 0.999], 1e-8, 0.01)  # LAMB's betas do not leak into LARS; its own eta is kept
    switched = with_optimizer({"train": base}, "lamb", "search")["train"]
    assert (switched["optimizer"], switched["momentum"], switched["nesterov"], switched["eps"]) == \
        ("lamb", 0.0, False, 1e-6)
    loaded = load_run_config(QUICKSTART, ["train.optimizer=lamb"])  # the quickstart has Nesterov SGD
    assert (loaded.train.momentum, loaded.train.nesterov, list(loaded.train.betas), loaded.train.eps) == \
        (0.0, False, [0.9, 0.999], 1e-6)


def test_a_variant_choosing_lamb_over_a_nesterov_base_trains_with_lamb(tmp_path):
    directory = tmp_path / "variants"
    directory.mkdir()
    (directory / "contrastive.yaml").write_text(
        "loss: {name: contrastive}\ntrain: {optimizer: lamb, lr: 0.004, weight_decay: 0.01, warmup_iters: 5,"
        " betas: [0.9, 0.99]}\n")
    cfg = plan_losses(QUICKSTART, ["contrastive"], variants=directory)[0].config(0)
    assert (cfg.train.optimizer, cfg.train.momentum, cfg.train.nesterov, list(cfg.train.betas), cfg.train.eps) == \
        ("lamb", 0.0, False, [0.9, 0.99], 1e-6)
    assert type(build_optimizer(Tiny(), cfg.train)) is Lamb
