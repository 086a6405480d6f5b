"""The small parts the trainer orchestrates: precision, device choice, collectives without a group,
the step meter, the run guard and the evaluation-pair lookup."""
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from unidml.config import PRECISIONS, to_yaml
from unidml.data_pipeline.dataset import DatasetDescription, ImageSet
from unidml.engine.backends import StepOutcome
from unidml.engine.evaluator import eval_pair
from unidml.engine.guards import RunGuard
from unidml.engine.meter import StepMeter
from unidml.engine.run_record import RunRecord
from unidml.errors import UserError
from unidml.run_config import load_run_config
from unidml.runtime import collectives
from unidml.runtime import precision as precision_module
from unidml.runtime.device import choose_device
from unidml.runtime.precision import (
    DTYPES,
    Precision,
    precision_of,
    resolve_precision,
    settle_precision,
    warn_if_emulated,
)
from unidml.study.compare import run_state


def test_precision_names_dtypes_and_autocast():
    assert tuple(DTYPES) == PRECISIONS
    assert Precision("bf16").dtype == torch.bfloat16 and Precision("fp16").dtype == torch.float16
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with Precision("fp32").autocast("cpu"):
        assert layer(x).dtype == torch.float32
    with Precision("bf16").autocast("cpu"):
        assert layer(x).dtype == torch.bfloat16
    assert not Precision("bf16").grad_scaler(torch.device("cpu")).is_enabled()
    assert precision_of(load_run_config(None, ["engine.precision=fp16"])) == Precision("fp16")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        Precision("fp8")


@pytest.mark.parametrize("native, device, expected", [
    (True, "cpu", "bf16"), (False, "cpu", "fp32"), (True, "cuda", "bf16"), (False, "cuda", "fp16")])
def test_auto_precision_picks_bf16_only_where_it_is_native(monkeypatch, native, device, expected):
    monkeypatch.setattr(precision_module, "native_bf16", lambda dev: native)
    assert resolve_precision("auto", device) == expected
    assert [resolve_precision(name, device) for name in PRECISIONS] == list(PRECISIONS)  # explicit names stay


def test_settled_config_is_concrete_and_warns_on_emulated_bf16(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(precision_module, "native_bf16", lambda dev: False)
    auto = load_run_config(None, ["engine.precision=auto", "engine.device=cpu"])
    settled = settle_precision(auto)
    assert settled.engine.precision == "fp32" and auto.engine.precision == "auto"  # the caller's config is kept
    # A study's run directory stores the settled config: the same `auto` config still matches it.
    (tmp_path / "config.yaml").write_text(to_yaml(settled))
    assert run_state(tmp_path, auto) == "partial"
    warn_if_emulated(precision_of(settled), "cpu")
    assert not caplog.records
    explicit = load_run_config(None, ["engine.precision=bf16", "engine.device=cpu"])
    assert settle_precision(explicit).engine.precision == "bf16"  # asked for explicitly: kept, with a warning
    warn_if_emulated(precision_of(explicit), "cpu")
    assert "engine.precision=bf16 on a CPU without bf16 kernels" in caplog.text


def test_device_choice():
    assert choose_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert choose_device("auto", 0) == torch.device("cuda", 0)
    else:
        assert choose_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="engine.device=cuda but no CUDA device is available"):
            choose_device("cuda")


def test_cuda_index_follows_local_rank_or_the_one_visible_device():
    from unidml.runtime.device import cuda_index

    assert [cuda_index(r, 4) for r in range(4)] == [0, 1, 2, 3]  # torchrun: every GPU visible
    assert [cuda_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # SLURM: one GPU per process
    assert cuda_index(5, 4) == 1
    with pytest.raises(UserError, match="no CUDA device is visible to this process"):
        cuda_index(0, 0)


def test_kernel_launch_guard_selects_the_tensor_device(monkeypatch):
    """CUDA tensors make their own device current for the launch (recorded here through a stand-in for
    torch.cuda.device, since this machine may have no GPU); CPU tensors need no guard."""
    import contextlib
    from types import SimpleNamespace

    from unidml.runtime.device import on_device_of

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext(entered.append(d)))
    with on_device_of(SimpleNamespace(device=torch.device("cuda", 1))):
        assert entered == [torch.device("cuda", 1)]
    with on_device_of(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_collectives_without_a_process_group():
    assert not collectives.process_group_active()
    assert collectives.world_size() == 1 and collectives.rank() == 0
    t = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce_sum(t) is t
    collectives.barrier()  # nothing to wait for


def test_step_meter_splits_wait_from_busy_and_sums_values():
    pause = 0.02

    def slow_loader():
        for i in range(4):
            time.sleep(pause)
            yield i

    meter = StepMeter(steps=2, images_per_step=8, desc="t", enabled=False)
    for item in meter.timed(slow_loader()):
        meter.add({"loss": torch.tensor(float(item))})
        time.sleep(pause / 2)
        meter.done(stepped=item % 2 == 1)
    # sleep() never returns early; the scheduler may add delay, so only lower bounds are exact.
    assert meter.wait >= 4 * pause and meter.busy >= 4 * pause / 2
    assert meter.images == 16 and meter.steps == 2  # counted with the progress bar disabled too
    assert meter.means(4) == {"loss": pytest.approx(1.5)}
    rates = meter.rates()
    assert rates["images_per_s"] == pytest.approx(16 / (meter.wait + meter.busy))
    assert rates["data_wait_pct"] == pytest.approx(100 * meter.wait / (meter.wait + meter.busy))
    assert rates["step_time_ms"] == pytest.approx(1000 * (meter.wait + meter.busy) / 2)
    meter.close()


def test_run_guard_counts_skips_and_stops_after_too_many(tmp_path: Path):
    record = RunRecord(tmp_path, True, "test")
    guard = RunGuard(max_skipped_steps=2, record=record, checkpoints=tmp_path / "checkpoints")
    guard.after_step(StepOutcome(float("nan"), applied=False), epoch=0, step=0)
    guard.after_step(StepOutcome(1.0, applied=True), epoch=0, step=1)
    assert guard.skipped_total == 1 and guard.consecutive == 0
    guard.after_step(StepOutcome(float("inf"), applied=False), epoch=0, step=2)
    with pytest.raises(UserError, match="engine.max_skipped_steps: 2 consecutive non-finite steps at step 3"):
        guard.after_step(StepOutcome(float("nan"), applied=False), epoch=0, step=3)
    assert json.loads((tmp_path / "metrics.json").read_text())["stopped"]["reason"] == "non_finite"


def test_run_guard_stops_on_non_finite_weights(tmp_path: Path):
    guard = RunGuard(3, RunRecord(tmp_path, False, "test"), tmp_path / "checkpoints")
    layer = nn.Linear(2, 2)
    guard.after_epoch(layer, epoch=1, step=5)
    with torch.no_grad():
        layer.bias[0] = float("nan")
    with pytest.raises(UserError, match="diverged in epoch 1 \\(non-finite values in bias\\)"):
        guard.after_epoch(layer, epoch=1, step=5)


def test_eval_pair_names_the_option_that_asked(tmp_path: Path):
    images = ImageSet("test", ("a.jpg", "b.jpg"), torch.tensor([0, 1]).numpy())
    dataset = DatasetDescription("toy", tmp_path, {"train": images, "test": images}, {"test": ("test", None)})
    assert eval_pair(dataset, "test") == ("test", None)
    with pytest.raises(UserError) as info:
        eval_pair(dataset, "val", "--split")
    assert str(info.value).startswith("--split: 'val' is not evaluated for dataset 'toy' (available: test;")
