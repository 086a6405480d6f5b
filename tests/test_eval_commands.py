"""`unidml eval` and `unidml search` end to end on a tiny synthetic dataset and an untrained checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from command_helpers import command, write_untrained_checkpoint
from PIL import Image
from test_eval_oracle import brute_force_metrics

from unidml.errors import UserError
from unidml.launcher.commands import evaluate, search

OVERRIDES = ["data.synthetic.classes=6", "data.synthetic.per_class=5", "data.synthetic.size=32",
             "data.image_size=32", "data.resize_size=32", "data.num_workers=0", "data.backend=torchvision",
             "model.arch=resnet18", "model.pretrained=''", "model.pretrained_required=false", "eval.ks=[1,2,4]",
             "engine.precision=fp32", "engine.device=cpu",
             "data.val_classes=0", "eval.split=test"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An untrained checkpoint and its generated data (so each test can run alone, e.g. under -m slow)."""
    from unidml.data_pipeline import build_dataset
    from unidml.run_config import load_run_config

    root = tmp_path_factory.mktemp("eval_cmd")
    write_untrained_checkpoint(root, OVERRIDES)
    build_dataset(load_run_config(None, OVERRIDES + [f"data.root={root / 'data'}"]).data)
    return root


def embeddings_of(run_dir: Path, paths: tuple[str, ...]) -> np.ndarray:
    """The checkpoint's fp32 embeddings of images through the run's test transform (no evaluation code)."""
    from unidml.data_pipeline import build_eval_loader
    from unidml.data_pipeline.dataset import ImageSet
    from unidml.run_config import load_for_inference

    model, cfg = load_for_inference(str(run_dir / "run" / "checkpoints" / "best.pt"))
    images = ImageSet("x", paths, np.zeros(len(paths), np.int64))
    loader = build_eval_loader(cfg.data, images, batch_size=16, rank=0, world_size=1, device=torch.device("cpu"))
    with torch.no_grad():
        return torch.cat([model(batch) for batch, _, _ in loader]).numpy()


def test_eval_checkpoint_writes_metrics_equal_to_brute_force(run_dir, capsys):
    from unidml.data_pipeline import build_dataset
    from unidml.run_config import load_run_config

    assert command(evaluate, ["--checkpoint", str(run_dir / "run" / "checkpoints" / "best.pt")]) == 0
    record = json.loads((run_dir / "run" / "checkpoints" / "eval_best.json").read_text())  # named after the input
    test = build_dataset(load_run_config(None, OVERRIDES + [f"data.root={run_dir / 'data'}"]).data).splits["test"]
    want = brute_force_metrics(embeddings_of(run_dir, test.paths), test.labels, ks=(1, 2, 4))
    assert record["split"] == "test" and record["metric"] == "cosine"
    assert record["metrics"] == pytest.approx({**want, "unreadable_images": 0}, abs=1e-6) and record["unreadable"] == []
    assert "recall@1=" in capsys.readouterr().out


def test_eval_saved_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((30, 5)), rng.standard_normal((40, 5))
    ql, gl = rng.integers(0, 4, 30), rng.integers(0, 4, 40)
    np.savez(tmp_path / "emb.npz", query=q, query_labels=ql, gallery=g, gallery_labels=gl)
    assert command(evaluate, ["--embeddings", str(tmp_path / "emb.npz"), "--ks", "1", "3", "--metric", "euclidean",
                              "--out", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert got == pytest.approx(brute_force_metrics(q, ql, g, gl, ks=(1, 3), metric="euclidean"))
    np.savez(tmp_path / "bad.npz", query=q)
    with pytest.raises(UserError, match="query_labels"):
        command(evaluate, ["--embeddings", str(tmp_path / "bad.npz")])


@pytest.mark.slow
def test_search_contact_sheet_lists_the_brute_force_neighbours(run_dir, tmp_path, capsys):
    gallery = sorted(str(p.resolve()) for p in (run_dir / "data" / "images").rglob("*.jpg"))
    query = gallery[7]
    out = tmp_path / "sheet.png"
    assert command(search, ["--checkpoint", str(run_dir / "run" / "checkpoints" / "best.pt"), "--query", query,
                            "--gallery", str(run_dir / "data" / "images"), "--topk", "6", "--out", str(out)]) == 0
    listed = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    emb = torch.nn.functional.normalize(torch.from_numpy(embeddings_of(run_dir, tuple(gallery))), dim=1)
    scores = emb @ emb[7]
    scores[7] = float("-inf")  # the query itself is excluded by index
    want = [gallery[i] for i in torch.sort(scores, descending=True, stable=True).indices[:6]]
    assert listed == want
    with Image.open(out) as sheet:  # 7 cells (query + 6) on a 5-column grid: 2 rows
        assert sheet.size == (5 * (160 + 12), 2 * (160 + 30 + 12))
    with pytest.raises(UserError, match="not found"):
        command(search, ["--checkpoint", str(run_dir / "run" / "checkpoints" / "best.pt"), "--query", "nope.jpg"])
