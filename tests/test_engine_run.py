"""Engine behaviour in one process: chunked embeddings (exact gradient), non-finite step skipping,
resume after a crash from a corrupted checkpoint, profiler traces and the projector snapshot."""
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from unidml.engine.distributed import init_distributed
from unidml.engine.trainer import Trainer
from unidml.errors import UserError
from unidml.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]


def base_overrides(data_root: Path) -> list[str]:
    """Tiny synthetic run (32 train images, batch 16 = 2 steps per epoch), no cross-sample layers."""
    return [f"data.root={data_root}", "data.synthetic.classes=8", "data.synthetic.per_class=8",
            "data.synthetic.size=32", "data.image_size=32", "data.resize_size=32", "data.num_workers=0",
            "data.backend=torchvision", "model.freeze_bn=true", "model.feature_bn=false", "train.batch_size=16",
            "train.lr=0.05", "train.momentum=0.5", "train.warmup_iters=2", "eval.ks=[1,2]", "eval.batch_size=32",
            "engine.precision=fp32", "data.val_classes=0", "eval.split=test"]  # all 4 training classes train


def trainer(run_dir: Path, overrides: list[str], loss: dict | None = None) -> Trainer:
    """The quickstart config with `overrides`, and its `loss` section replaced by `loss` if given."""
    config = REPO / "configs" / "quickstart.yaml"
    if loss is not None:
        data = yaml.safe_load(config.read_text())
        data["loss"] = loss
        config = run_dir.parent / f"{run_dir.name}.yaml"
        config.write_text(yaml.safe_dump(data))
    cfg = load_run_config(config, overrides)
    return Trainer(cfg, run_dir, init_distributed("cpu"))


def params(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.module.named_parameters()}


def row_dropout(module, inputs, output, p: float = 0.3):
    """Dropout on the backbone's output with masks drawn row by row from the global RNG.

    Row r's mask is the r-th draw of the step whatever the chunking, so a full-batch pass and K chunks
    see the same masks, and the chunked gradient equals the full-batch one only if the backward replay
    restores each chunk's RNG state (a replay that draws fresh masks changes the gradient)."""
    if not module.training:
        return output
    keep = torch.stack([torch.rand(output.shape[1:]) >= p for _ in range(len(output))])
    return output * keep / (1.0 - p)


def step_gradients(t: Trainer, images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The gradient one micro-batch accumulates into every parameter, the global RNG seeded with `seed`."""
    t.module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    t.train_step(images, labels, ends_step=False)
    return {n: p.grad.clone() for n, p in t.module.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("loss", [{"name": "cross_entropy", "dropout": 0.3}, {"name": "multi_similarity"}])
def test_embed_chunks_give_the_full_batch_gradient(tmp_path, loss):
    """K=4 chunks (gradient caching with RNG replay) == one full-batch pass, for a model with dropout,
    a loss with its own parameters and dropout (cross-entropy) and a pairwise loss.

    Both trainers start from the weights one full-batch epoch reached (cross-entropy's classifier starts
    at zero, and sends no gradient into the backbone before its first step). The gradients are compared,
    not the weights after several steps: this untrained network with frozen BatchNorm is not normalised,
    so SGD amplifies any rounding difference from step to step and the end weights test that
    amplification rather than the chunking."""
    trainers = {}
    for chunks in (1, 4):
        overrides = base_overrides(tmp_path / "data") + [f"engine.embed_chunks={chunks}"]
        t = trainer(tmp_path / f"k{chunks}", overrides, loss)
        t.module.model.backbone.register_forward_hook(row_dropout)
        trainers[chunks] = t
    full, chunked = trainers[1], trainers[4]
    full.train_epoch(0)
    chunked.module.load_state_dict(full.module.state_dict())
    images, labels = next(iter(chunked.loader))
    batch_sizes = []
    for t in (full, chunked):
        t.module.model.register_forward_hook(lambda m, i, o: batch_sizes.append(len(o)))
    reference = step_gradients(full, images, labels, seed=1)
    other_masks = step_gradients(full, images, labels, seed=2)
    grads = step_gradients(chunked, images, labels, seed=1)
    assert batch_sizes == [16, 16] + [4] * 8  # one 16-image forward each, or 4 no-grad chunks then 4 replays
    assert set(grads) == set(reference) and any(".backbone." in f".{n}" for n in grads)

    def worst_relative_difference(a: dict, b: dict) -> float:
        return max(((a[n] - b[n]).abs().max() / a[n].abs().max()).item() for n in a if a[n].abs().max() > 0)

    # Not bit-equal: the chunks run the network's GEMMs on 4-row instead of 16-row inputs and sum the
    # per-sample parameter gradients in another order, each a relative difference of a few float32
    # epsilons (1.2e-7) per sum, about 1e-6 of the largest entry in the end. A replay that draws other
    # dropout masks, or a cached gradient lost, changes the gradient by far more than that:
    assert worst_relative_difference(reference, grads) < 1e-5
    assert worst_relative_difference(reference, other_masks) > 1e-2


@pytest.mark.timeout(180)
def test_embed_chunks_with_train_mode_batchnorm_warns_and_is_recorded(tmp_path, caplog):
    overrides = base_overrides(tmp_path / "data") + ["engine.embed_chunks=2", "model.freeze_bn=false",
                                                     "model.feature_bn=true"]
    with caplog.at_level(logging.WARNING, logger="unidml.engine.embed_chunks"):
        t = trainer(tmp_path / "bn", overrides)
    warnings = [r.getMessage() for r in caplog.records if "embed_chunks" in r.getMessage()]
    assert len(warnings) == 1 and "not the full-batch gradient" in warnings[0]
    assert "feature_bn" in warnings[0] and "backbone.bn1" in warnings[0]
    (tmp_path / "bn").mkdir()
    t.record.flush()
    record = json.loads((tmp_path / "bn" / "metrics.json").read_text())["embed_chunks"]
    assert record["chunks"] == 2 and record["exact"] is False
    assert "feature_bn" in record["batch_dependent_layers"] and "backbone.bn1" in record["batch_dependent_layers"]
    bn = [m for m in t.module.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(record["batch_dependent_layers"]) == len(bn)  # every BatchNorm layer trains here

    caplog.clear()
    frozen = base_overrides(tmp_path / "data") + ["engine.embed_chunks=2"]  # frozen BN2d, no BN1d
    with caplog.at_level(logging.WARNING, logger="unidml.engine.embed_chunks"):
        t = trainer(tmp_path / "frozen", frozen)
    assert not [r for r in caplog.records if "embed_chunks" in r.getMessage()]
    assert t.record.embed_chunks == {"chunks": 2, "exact": True, "batch_dependent_layers": []}


def nan_embeddings(module, inputs, output):
    """NaN training embeddings (evaluation, in eval mode, sees the real ones: it refuses non-finite input)."""
    return output * float("nan") if module.training else output


@pytest.mark.timeout(180)
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    t = trainer(tmp_path / "one", base_overrides(tmp_path / "data") + ["train.epochs=1", "engine.max_skipped_steps=3"])
    before = params(t)
    handle = t.module.model.register_forward_hook(nan_embeddings)
    t.train_step(*next(iter(t.loader)), ends_step=True)  # NaN loss -> non-finite gradient -> not applied
    handle.remove()
    assert t.guard.skipped_total == 1 and t.guard.consecutive == 1 and t.step == 1
    assert all(torch.equal(before[n], p) for n, p in t.module.named_parameters())
    t.train_step(*next(iter(t.loader)), ends_step=True)
    assert t.guard.consecutive == 0 and t.guard.skipped_total == 1
    assert any(not torch.equal(before[n], p) for n, p in t.module.named_parameters())

    run = tmp_path / "stop"
    t = trainer(run, base_overrides(tmp_path / "data") + ["train.epochs=3", "engine.max_skipped_steps=2"])
    t.module.model.register_forward_hook(nan_embeddings)
    with pytest.raises(UserError, match="engine.max_skipped_steps: 2 consecutive non-finite steps"):
        t.fit()  # epoch 0 is evaluated and checkpointed, then 2 skipped steps
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and state["step"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_crash_then_corrupt_checkpoint_resume_matches_uninterrupted_run(tmp_path, caplog):
    """Run A: 3 epochs straight (with engine.profile=true: traces and the projector snapshot).
    Run B: crashes at the start of epoch 3; its newest checkpoint is then truncated, so
    train.resume=auto refuses it, falls back to the epoch-1 checkpoint, and finishes equal to A."""
    overrides = base_overrides(tmp_path / "data") + ["train.epochs=3"]
    run_a = tmp_path / "a"
    a = trainer(run_a, overrides + ["engine.profile=true"])
    a.fit()
    traces = sorted((run_a / "profile").glob("trace_step*.json"))
    assert len(traces) == 1 and json.loads(traces[0].read_text())["traceEvents"]
    assert (run_a / "tb" / "projector_config.pbtxt").is_file()

    run_b = tmp_path / "b"
    b = trainer(run_b, overrides)
    original = b.train_epoch

    def crash_in_epoch_3(epoch, *args):
        if epoch == 2:
            raise RuntimeError("simulated crash")
        return original(epoch, *args)

    b.train_epoch = crash_in_epoch_3
    with pytest.raises(RuntimeError, match="simulated crash"):
        b.fit()
    last = run_b / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        resumed = trainer(run_b, overrides + ["train.resume=auto"])
        resumed.fit()
    assert re.search(r"last\.pt: moved aside as last\.pt\.corrupt-\d{8}T\d{6} \(it failed to load\)", caplog.text)
    assert len(list((run_b / "checkpoints").glob("last.pt.corrupt-*"))) == 1  # kept, not deleted
    assert resumed.step == a.step == 6
    for name, value in a.module.state_dict().items():
        assert torch.allclose(value.float(), resumed.module.state_dict()[name].float(), rtol=1e-5, atol=1e-7), name
    history_a = json.loads((run_a / "metrics.json").read_text())["epochs"]
    history_b = json.loads((run_b / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in history_b] == [0, 1, 2, 3]
    for ea, eb in zip(history_a, history_b):
        assert ea["recall@1"] == pytest.approx(eb["recall@1"])
        assert ea.get("train_loss") == pytest.approx(eb.get("train_loss"))


@pytest.mark.slow
def test_grad_accum_leftover_steps_at_the_epoch_end_with_the_mean_over_its_group(tmp_path):
    """4 micro-batches with grad_accum=3: steps after micro-batches 3 and 4, the second with the
    gradient of the mean loss over its one micro-batch (not 1/3 of it, nor carried into the next epoch).
    Each step's accumulated gradient is compared with an independent one: autograd of the group's mean
    loss on a copy of the module at the step's starting parameters."""
    import copy

    t = trainer(tmp_path / "run", base_overrides(tmp_path / "data") + ["train.batch_size=8", "train.grad_accum=3"])
    assert len(t.loader) == 4 and t.steps_per_epoch == 2
    group, checks, inner_step = [], [], t.backend.step

    def train_step(images, labels, ends_step):
        group.append((images.clone(), labels.clone()))
        return Trainer.train_step(t, images, labels, ends_step)

    def step():
        reference = copy.deepcopy(t.module)
        reference.zero_grad(set_to_none=True)
        torch.stack([reference(images, labels) for images, labels in group]).mean().backward()
        ours = {n: p.grad.clone() for n, p in t.module.named_parameters() if p.grad is not None}
        expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        checks.append((len(group), ours, expected))
        group.clear()
        return inner_step()

    t.train_step, t.backend.step = train_step, step
    for epoch in range(2):
        t.train_epoch(epoch)
    assert [size for size, _, _ in checks] == [3, 1, 3, 1] and t.step == 4
    for _, ours, expected in checks:
        assert ours.keys() == expected.keys()
        for name in ours:  # fp32 sums of the same terms in another order: relative error ~1e-6
            assert torch.allclose(ours[name], expected[name], rtol=1e-4, atol=1e-6), name



def test_accumulation_groups_and_the_deepspeed_refusal():
    from unidml.engine.accumulation import check_groups, ends_group, group_size, steps_in_epoch

    # 7 micro-batches, grad_accum 3: groups [0 1 2] [3 4 5] [6]
    assert [ends_group(m, 7, 3) for m in range(7)] == [False, False, True, False, False, True, True]
    assert [group_size(m, 7, 3) for m in range(7)] == [3, 3, 3, 3, 3, 3, 1]
    assert steps_in_epoch(7, 3) == 3 and steps_in_epoch(6, 3) == 2
    check_groups(7, 3, "ddp")
    check_groups(6, 3, "deepspeed")
    with pytest.raises(UserError, match=r"train.grad_accum: 3 does not divide the 7 micro-batches of an epoch "
                                        r"\(1 left over\)") as info:
        check_groups(7, 3, "deepspeed")
    assert "\n" not in str(info.value)
