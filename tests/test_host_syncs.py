"""At most one host sync per training step: counted on the CPU over one engine step per loss.

`sync_counter` counts what would make the host wait for a GPU (scalar reads, data-dependent shapes,
device<->host copies) made from unidml's own code. The one per-step read left is the backend's
gradient norm (the skip-a-non-finite-step decision); logging reads one more tensor every
`train.log_every` steps. The classifier losses and triplet run on the tiled backend (the CPU path);
the Triton path runs under TRITON_INTERPRET=1 in a subprocess, where the pairwise losses with a kernel
(contrastive, multi-similarity with a memory bank) and the classifier losses are counted.
"""
import json
from pathlib import Path

import pytest
import torch
import yaml
from sync_counter import count_host_syncs
from triton_interpreter import run_interpreted

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic.classes=8", "data.synthetic.per_class=8", "data.synthetic.size=32", "data.image_size=32",
        "data.resize_size=32", "data.num_workers=0", "data.backend=torchvision", "model.freeze_bn=true",
        "model.feature_bn=false", "train.batch_size=16", "engine.precision=fp32", "data.val_classes=0",
        "eval.split=test", "eval.ks=[1,2]"]
LOSSES = {
    "cross_entropy": {"name": "cross_entropy"},
    "proxy_anchor": {"name": "proxy_anchor"},
    "multi_similarity+xbm": {"name": "multi_similarity+xbm", "memory": {"size": 32, "start_step": 0}},
    "contrastive": {"name": "contrastive"},
    "triplet": {"name": "triplet", "mining": "all"},
}
TILED = ["cross_entropy", "proxy_anchor", "triplet"]
TRITON = ["cross_entropy", "multi_similarity+xbm", "contrastive"]  # proxy_anchor: same kernels as CE


def _trainer(work: Path, name: str, backend: str):
    from unidml.engine.distributed import init_distributed
    from unidml.engine.trainer import Trainer
    from unidml.run_config import load_run_config

    data = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    data["loss"] = {**LOSSES[name], "backend": backend}
    config = work / f"{name}-{backend}.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_run_config(config, [f"data.root={work / 'data'}", *TINY])
    return Trainer(cfg, work / f"run-{name}-{backend}", init_distributed("cpu"))


def step_syncs(work: str, name: str, backend: str, warm: bool = True) -> list[tuple[str, str, str]]:
    """The host syncs of one optimizer step of a tiny run of loss `name` on `backend`: the second one
    with `warm` (the first fills caches), else the first (under the interpreter, where nothing compiles
    and each step is slow)."""
    trainer = _trainer(Path(work), name, backend)
    trainer.module.train()
    batches = iter(trainer.loader)
    if warm:
        trainer.train_step(*next(batches), True)
    images, labels = next(batches)
    with count_host_syncs() as log:
        loss, _ = trainer.train_step(images, labels, True)
    assert torch.isfinite(loss)
    return log.events


def test_counter_sees_each_kind_of_sync():
    """The counter is not blind: each kind of sync made from a counted file is seen once."""
    t = torch.tensor([3, 0, 5])
    with count_host_syncs(__file__) as log:
        int(t.max())
        t[t > 0].sum()
        torch.unique(t)
        t.tolist()
        torch.tensor([1, 2], device=t.device)
        torch.where(t > 0, t, 0)  # no sync: a mask, not a data-dependent shape
    kinds = [kind for kind, _, _ in log.events]
    assert kinds == ["scalar read", "mask index", "data shape", "to host", "from host"], log.report()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", TILED)
def test_one_host_sync_per_step_tiled(tmp_path_factory, name):
    work = tmp_path_factory.getbasetemp() / "syncs"
    work.mkdir(exist_ok=True)
    events = step_syncs(str(work), name, "tiled")
    assert len(events) <= 1, f"{name}: {len(events)} host syncs in one step:\n{events}"


def test_logged_step_reads_the_device_once(tmp_path):
    trainer = _trainer(tmp_path, "cross_entropy", "tiled")
    from unidml.engine.meter import StepMeter

    meter = StepMeter(1, 16, "test", enabled=False)
    images, labels = next(iter(trainer.loader))
    for _ in meter.timed([0]):
        loss, grad_norm = trainer.train_step(images, labels, True)
        meter.done(stepped=True)
    with count_host_syncs() as log:
        trainer._log_step(meter, loss, grad_norm)
    assert len(log) == 1, log.report()


def triton_syncs(work: str) -> None:
    """Print (as JSON) each TRITON loss's step syncs; run under TRITON_INTERPRET=1 (see below)."""
    print(json.dumps({name: step_syncs(work, name, "triton", warm=False) for name in TRITON}))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_host_sync_per_step_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    proc = run_interpreted(f"import test_host_syncs as t; t.triton_syncs({str(tmp_path)!r})", timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(counts) == set(TRITON)
    for name, events in counts.items():
        assert len(events) <= 1, f"{name}: {len(events)} host syncs in one step:\n{events}"
