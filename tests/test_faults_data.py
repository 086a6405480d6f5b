"""Hostile images through both loaders: a decompression bomb never decodes (bounded peak memory), and
offenders follow `data.on_error` (training replaces, evaluation leaves out, `fail` names the file)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_data_fixtures import make_sop
from test_faults_fixtures import write_bomb

from unidml.config import DataConfig
from unidml.data_pipeline import build_dataset, build_eval_loader, build_train_loader
from unidml.errors import UserError

BACKENDS = ["torchvision", "dali"]
CPU = torch.device("cpu")
RSS_CEILING_KB = 2 * 2**20  # 2 GiB; decoding the 30000² header would need 2.7 GB for its RGB pixels alone


@pytest.fixture(scope="module")
def bomb_sop(tmp_path_factory) -> tuple[Path, list[str]]:
    """SOP tree with one 30000 x 30000 header-only JPEG in the train and one in the test split."""
    root = make_sop(tmp_path_factory.mktemp("bomb"), train_classes=3, test_classes=2, per_class=4, size=(40, 40))
    bombs = [str(write_bomb(root / "class001_final/1_0.JPG")), str(write_bomb(root / "class004_final/4_0.JPG"))]
    return root, bombs


def _cfg(root: Path, backend: str, **kw):
    base = dict(dataset="sop", root=str(root), backend=backend, image_size=16, resize_size=20, num_workers=1,
                val_classes=0.0)
    return OmegaConf.structured(DataConfig(**{**base, **kw}))


PEAK = textwrap.dedent("""
    import resource, sys, torch
    from omegaconf import OmegaConf
    from unidml.config import DataConfig
    from unidml.data_pipeline import build_dataset, build_eval_loader, build_train_loader
    cfg = OmegaConf.structured(DataConfig(dataset="sop", root=sys.argv[1], backend=sys.argv[2], image_size=16,
                                          resize_size=20, num_workers=1, val_classes=0.0))
    data = build_dataset(cfg)
    train = build_train_loader(cfg, data.train, global_batch_size=4, rank=0, world_size=1, seed=0, run_dir=None,
                               device=torch.device("cpu"))
    rows = sum(len(images) for images, _ in train)
    test = build_eval_loader(cfg, data.splits["test"], batch_size=4, rank=0, world_size=1, device=torch.device("cpu"))
    rows += sum(len(batch[0]) for batch in test)
    train.backend.close()  # torchvision workers exit, so their peak is in RUSAGE_CHILDREN
    test.backend.close()
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(rows, len(train.bad_log.seen), len(test.unreadable), peak)
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_decompression_bomb_never_raises_peak_memory_above_2gb(bomb_sop, backend):
    """ru_maxrss is a high-water mark of the whole process (and of its exited workers): a ceiling
    check with wide margin (a clean run of this script peaks well under 1 GiB)."""
    root, _ = bomb_sop
    result = subprocess.run([sys.executable, "-c", PEAK, str(root), backend], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows, replaced, left_out, peak_kb = map(int, result.stdout.split())
    assert (rows, replaced, left_out) == (12 + 7, 1, 1)  # 12 train images (one replaced), 7 of 8 test images
    assert peak_kb < RSS_CEILING_KB, f"peak RSS {peak_kb / 2**20:.2f} GiB"


@pytest.mark.parametrize("backend", BACKENDS)
def test_oversized_images_follow_on_error(bomb_sop, backend, tmp_path):
    root, bombs = bomb_sop
    data = build_dataset(_cfg(root, backend))
    loader = build_train_loader(_cfg(root, backend), data.train, global_batch_size=4, rank=0, world_size=1, seed=0,
                                run_dir=tmp_path, device=CPU)
    assert sum(len(images) for images, _ in loader) == 12  # replaced, so every batch is full
    listed = (tmp_path / "bad_images.txt").read_text().splitlines()
    assert listed == [f"{bombs[0]}\timage too large (900000000 pixels; data.max_pixels=178956970), not decoded"]
    small = _cfg(root, backend, max_pixels=1000)  # 40x40 = 1600 pixels: now every image is too large
    test = build_eval_loader(small, data.splits["test"], batch_size=4, rank=0, world_size=1, device=CPU)
    assert list(test) == [] and len(test.unreadable) == 8
    strict = _cfg(root, backend, on_error="fail")
    test = build_eval_loader(strict, data.splits["test"], batch_size=4, rank=0, world_size=1, device=CPU)
    with pytest.raises(UserError) as info:
        list(test)
    message = str(info.value)
    assert message.startswith(f"{bombs[1]}: image too large (900000000 pixels") and "\n" not in message


def test_the_size_limit_is_pils_own():
    from PIL import Image

    from unidml.config import MAX_PIXELS_LIMIT
    from unidml.data_pipeline.images import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS == MAX_PIXELS_LIMIT == 2 * Image.MAX_IMAGE_PIXELS


def test_eval_metric_names_are_the_metrics_modules():
    from unidml.config import EVAL_METRICS
    from unidml.evaluation.metrics import KNOWN_METRICS

    assert EVAL_METRICS == KNOWN_METRICS  # config validation accepts exactly what evaluation computes
