"""`unidml embed` (+ `eval --embeddings`, `index`, `search --index`) on a tiny synthetic dataset and checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from command_helpers import TINY_RUN, command, write_untrained_checkpoint

from unidml.errors import UserError
from unidml.evaluation.embedding_files import read_embeddings
from unidml.launcher.commands import embed, evaluate, index, search
from unidml.serving import embedding_run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_untrained_checkpoint(tmp_path_factory.mktemp("embed_cmd"), TINY_RUN)


def test_embed_split_matches_the_checkpoint_evaluation(checkpoint, tmp_path, capsys):
    out = tmp_path / "test.npy"
    # Chunks of 8 = two eval batches of 4: the same batches as one pass, so the same vectors.
    assert command(embed, ["--checkpoint", str(checkpoint), "--split", "test", "--out", str(out),
                           "--chunk-size", "8"]) == 0
    vectors, labels, paths, meta = read_embeddings(out)
    assert vectors.shape == (15, 512) and meta["normalized"] and meta["count"] == 15
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)  # float32 unit vectors
    assert not (tmp_path / "test.npy.parts").exists()  # chunks merged and removed
    from unidml.data_pipeline import build_dataset
    from unidml.run_config import load_for_inference

    _, cfg = load_for_inference(checkpoint)
    test = build_dataset(cfg.data).splits["test"]
    assert paths == list(test.paths) and np.array_equal(labels, test.labels)

    assert command(evaluate, ["--embeddings", str(out), "--ks", "1", "2", "4", "--out", str(tmp_path / "e.json")]) == 0
    assert command(evaluate, ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "c.json")]) == 0
    from_file = json.loads((tmp_path / "e.json").read_text())["metrics"]
    from_checkpoint = json.loads((tmp_path / "c.json").read_text())["metrics"]
    # Same vectors up to re-normalisation (1e-7), so the same ranks: metrics equal to float printing precision.
    for key in ("recall@1", "recall@2", "recall@4", "map@r", "r_precision"):
        assert from_file[key] == pytest.approx(from_checkpoint[key], abs=1e-9)
    assert "15 x 512 embeddings written" in capsys.readouterr().out


def test_interrupted_embedding_resumes_from_its_chunks(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "a.npy"
    argv = ["--checkpoint", str(checkpoint), "--split", "test", "--out", str(out), "--chunk-size", "4"]
    saves = []
    original_save = embedding_run.ChunkStore.save

    def crash_after_two(store, chunk, vectors, rows):
        if len(saves) == 2:
            raise KeyboardInterrupt
        saves.append(chunk)
        original_save(store, chunk, vectors, rows)

    monkeypatch.setattr(embedding_run.ChunkStore, "save", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        command(embed, argv)
    assert sorted(p.name for p in (tmp_path / "a.npy.parts").glob("part-*")) == ["part-000000.npz", "part-000001.npz"]
    monkeypatch.setattr(embedding_run.ChunkStore, "save", original_save)
    import unidml.evaluation as evaluation

    extract, embedded = evaluation.extract_embeddings, []

    def counting(model, loader, **kwargs):
        found = extract(model, loader, **kwargs)
        embedded.append(len(found.indices))
        return found

    monkeypatch.setattr(evaluation, "extract_embeddings", counting)
    assert command(embed, argv) == 0
    assert embedded == [4, 3]  # 15 images in chunks of 4: only chunks 2 and 3 were embedded again
    monkeypatch.setattr(evaluation, "extract_embeddings", extract)
    command(embed, ["--checkpoint", str(checkpoint), "--split", "test", "--out", str(tmp_path / "b.npy")])
    resumed, uninterrupted = read_embeddings(out)[0], read_embeddings(tmp_path / "b.npy")[0]
    assert np.allclose(resumed, uninterrupted, atol=1e-6)  # other chunking, same per-image embeddings (fp32)


def test_chunks_of_other_inputs_are_refused(checkpoint, tmp_path):
    parts = tmp_path / "x.npy.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"checkpoint": "elsewhere"}))
    with pytest.raises(UserError, match="holds chunks of another embedding run"):
        command(embed, ["--checkpoint", str(checkpoint), "--split", "test", "--out", str(tmp_path / "x.npy")])
    with pytest.raises(UserError, match="--split 'nope': dataset 'synthetic' has splits train, test"):
        command(embed, ["--checkpoint", str(checkpoint), "--split", "nope", "--out", str(tmp_path / "y.npy")])


def test_embed_folder_and_list_inputs(checkpoint, tmp_path):
    from unidml.data_pipeline import build_dataset
    from unidml.run_config import load_for_inference

    _, cfg = load_for_inference(checkpoint)
    images = [Path(p) for p in build_dataset(cfg.data).splits["test"].paths[:5]]
    folder = tmp_path / "catalogue"
    for i, image in enumerate(images):
        target = folder / ("shoes" if i < 2 else "bags") / image.name if i < 4 else folder / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image.read_bytes())
    assert command(embed, ["--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(tmp_path / "f")]) == 0
    _, labels, paths, _ = read_embeddings(tmp_path / "f.npy")
    assert [Path(p).parent.name for p in paths] == ["catalogue", "bags", "bags", "shoes", "shoes"]  # sorted paths
    assert labels.tolist() == [-1, 0, 0, 1, 1]
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{p},{7 + i}\n" for i, p in enumerate(paths[:3])))
    assert command(embed, ["--checkpoint", str(checkpoint), "--images", str(tmp_path / "list.csv"),
                           "--out", str(tmp_path / "l.npy"), "--raw"]) == 0
    raw, labels, _, meta = read_embeddings(tmp_path / "l.npy")
    assert labels.tolist() == [7, 8, 9] and not meta["normalized"]
    normalised = read_embeddings(tmp_path / "f.npy")[0][:3]  # the same three images, normalised
    assert np.allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), normalised, atol=1e-6)
    (tmp_path / "bad.csv").write_text("a.jpg,shoe\n")
    with pytest.raises(UserError, match="bad.csv:1: expected 'path' or 'path,label'"):
        command(embed, ["--checkpoint", str(checkpoint), "--images", str(tmp_path / "bad.csv"), "--out", "z"])


@pytest.mark.slow
def test_index_and_search_with_it_agree_with_exact_search(checkpoint, tmp_path, capsys):
    from unidml.run_config import load_for_inference

    out = tmp_path / "gallery.npy"
    assert command(embed, ["--checkpoint", str(checkpoint), "--split", "test", "--out", str(out)]) == 0
    assert command(index, ["--embeddings", str(out), "--out", str(tmp_path / "g.index")]) == 0
    assert "exact search" in capsys.readouterr().out
    _, cfg = load_for_inference(checkpoint)
    query = read_embeddings(out)[2][3]
    assert command(search, ["--checkpoint", str(checkpoint), "--query", query, "--index", str(tmp_path / "g.index"),
                            "--topk", "4", "--out", str(tmp_path / "with_index.png")]) == 0
    with_index = capsys.readouterr().out.splitlines()[:4]
    assert command(search, ["--checkpoint", str(checkpoint), "--query", query, "--topk", "4",
                            "--out", str(tmp_path / "without.png")]) == 0
    without = capsys.readouterr().out.splitlines()[:4]
    assert with_index == without and (tmp_path / "with_index.png").is_file()  # same hits, scores, class marks
    assert all(query not in line for line in with_index)  # the query itself is never a hit


@pytest.mark.slow
def test_two_ranks_shard_the_chunks_and_write_the_same_file(checkpoint, tmp_path):
    """torchrun with 2 gloo ranks on CPU: each rank embeds every other chunk; rank 0 merges."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "unidml", "embed", "--checkpoint", str(checkpoint), "--split", "test",
           "--out", str(tmp_path / "dist.npy"), "--chunk-size", "4"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    command(embed, ["--checkpoint", str(checkpoint), "--split", "test", "--out", str(tmp_path / "one.npy"),
                    "--chunk-size", "4"])
    two, one = read_embeddings(tmp_path / "dist.npy"), read_embeddings(tmp_path / "one.npy")
    assert two[2] == one[2] and np.array_equal(two[1], one[1])
    assert np.allclose(two[0], one[0], atol=1e-6)  # same chunks and batches in another process (fp32)
