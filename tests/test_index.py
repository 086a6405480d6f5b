"""`unidml index`: exact and approximate FAISS indexes over embeddings, recall against exact search."""
from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest

from unidml.errors import UserError
from unidml.evaluation.embedding_files import write_embeddings
from unidml.launcher.commands import index
from unidml.serving.catalogue import ServedIndex


def command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    index.add_arguments(parser)
    return index.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """20,000 unit vectors in 200 clusters (d = 32), written as an `unidml embed` file."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, 32))
    labels = rng.integers(0, 200, 20_000)
    vectors = (centres[labels] + rng.standard_normal((20_000, 32))).astype(np.float32)  # overlapping clusters
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("index") / "emb.npy"
    write_embeddings(path, vectors, [f"img{i}.jpg" for i in range(len(vectors))], labels,
                           {"metric": "cosine", "normalized": True})
    return path, vectors


def numpy_top10(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact top-10 by inner product, in float64 (the independent reference)."""
    scores = vectors[rows].astype(np.float64) @ vectors.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def test_flat_index_is_exact(catalogue, tmp_path, capsys):
    path, vectors = catalogue
    assert command(["--embeddings", str(path), "--out", str(tmp_path / "flat.index")]) == 0
    assert "recall@10 = 1 by construction" in capsys.readouterr().out
    served = ServedIndex(tmp_path / "flat.index")
    rows = np.arange(0, 20_000, 997)
    want = numpy_top10(vectors, rows)
    for row, expected in zip(rows, want):
        got = served.search(vectors[row:row + 1], 9, exclude=[int(row)]).ids[0]
        # The row itself is excluded; float32 vs float64 scores may only swap exact near-ties (none here).
        assert got.tolist() == [i for i in expected if i != row][:9]


@pytest.mark.parametrize("factory, params, floor", [("IVF256,Flat", "nprobe=4", 0.5)])  # HNSW, PQ: bench/index.py
def test_approximate_index_recall_is_measured_and_printed(catalogue, tmp_path, capsys, factory, params, floor):
    path, vectors = catalogue
    out = tmp_path / "approx.index"
    assert command(["--embeddings", str(path), "--out", str(out), "--factory", factory, "--search-params", params,
                    "--recall-queries", "500"]) == 0
    printed = float(re.search(r"recall@10 vs exact search: ([0-9.]+) \(500 queries", capsys.readouterr().out).group(1))
    record = json.loads((tmp_path / "approx.index.json").read_text())
    assert record["factory"] == factory and record["recall@10_vs_exact"] == pytest.approx(printed, abs=5e-5)
    # Independent recall: the same 500 queries against the float64 numpy top-10, through the saved index.
    rows = np.random.default_rng(0).choice(len(vectors), size=500, replace=False)
    served = ServedIndex(out)
    _, found = served.index.search(vectors[rows], 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(numpy_top10(vectors, rows), found)])
    assert recall == pytest.approx(printed, abs=0.01)  # float32 near-ties at rank 10 may differ
    assert floor < printed <= 1.0


def test_bad_factory_and_parameters_are_one_line_errors(catalogue, tmp_path):
    path, _ = catalogue
    cases = ((["--factory", "IVF?,Flat"], "not a FAISS index-factory string"),
             (["--factory", "IVF16,Flat", "--search-params", "nprobes=3"], "--search-params 'nprobes=3'"))
    for argv, fragment in cases:
        with pytest.raises(UserError, match=fragment) as info:
            command(["--embeddings", str(path), "--out", str(tmp_path / "x.index"), *argv])
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="index .* not found"):
        ServedIndex(tmp_path / "missing.index")
