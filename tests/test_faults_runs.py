"""Fault and bad-input suite on real tiny runs: one-line errors with exit code 2 (the run directory
untouched), no inflated metrics from unreadable images, kills at random points and inside checkpoint
writes, and one writer per run directory.

One reference run (2 epochs on a tiny synthetic set) is shared by the module. Bad inputs go through
`unidml.launcher.cli.main` in this process (a traceback would surface as an exception); runs that are
killed are forked from a multiprocessing fork server that has unidml imported (no interpreter start).
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_injection import inject_checkpoint_fault
from test_eval_oracle import brute_force_metrics
from test_faults_fixtures import write_bomb

from unidml.engine import checkpoint
from unidml.engine.run_dir import LOCK_NAME, existing_run
from unidml.launcher.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
KS = (1, 2)


def tiny(data_root: Path, backend: str = "torchvision") -> list[str]:
    return [f"data.root={data_root}", "data.synthetic.classes=8", "data.synthetic.per_class=8",
            "data.synthetic.size=32", "data.image_size=32", "data.resize_size=32", "data.num_workers=0",
            f"data.backend={backend}", "train.epochs=2", "train.batch_size=16", "train.lr=0.01", "train.momentum=0.5",
            "train.warmup_iters=2", "data.val_classes=0", "eval.split=test", "eval.ks=[1,2]", "eval.batch_size=32",
            "engine.precision=fp32", "engine.device=cpu"]


def cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `unidml ARGV` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The one error line of a failed command (and that it is the only one)."""
    lines = [line for line in err.splitlines() if line.startswith("unidml: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Every file's (inode, size, mtime): a replaced, rewritten, added or removed file changes it."""
    return {str(p.relative_to(directory)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def epochs(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["epochs"]


@dataclass
class World:
    root: Path
    data: Path
    reference: Path
    seconds: float  # wall time of the reference run

    @property
    def last(self) -> Path:
        return self.reference / "checkpoints" / "last.pt"

    def train(self, out: Path, *extra: str) -> list[str]:
        return ["train", "--config", QUICKSTART, "--out", out, *tiny(self.data), *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("faults_runs")
    start = time.monotonic()
    w = World(root, root / "data", root / "reference", 0.0)
    code, out, err = cli(w.train(w.reference))
    assert code == 0, err
    w.seconds = time.monotonic() - start
    assert [e["epoch"] for e in epochs(w.reference)] == [0, 1, 2]
    return w


def sop_copy(w: World, name: str) -> Path:
    """A copy of the tiny dataset read in its SOP layout (so files can be broken without regeneration)."""
    target = w.root / name
    if not target.exists():
        shutil.copytree(w.data, target)
    return target


# ---------------------------------------------------------------------------------- one-line errors
def _empty_test(w: World, keep: int) -> list[str]:
    root = sop_copy(w, f"split{keep}")
    index = root / "Ebay_test.txt"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:1 + keep]) + "\n")
    return ["data.dataset=sop", f"data.root={root}"]


def _checkpoint_variant(w: World, name: str, change) -> Path:
    state = torch.load(w.last, weights_only=True)
    path = w.root / name
    torch.save(change(state), path)
    return path


class _Pickled:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def _query(w: World, kind: str) -> Path:
    path = w.root / "queries" / f"{kind}.jpg"
    path.parent.mkdir(exist_ok=True)
    sample = next((w.data / "images").rglob("*.jpg"))
    if kind == "text":
        path.write_text("not an image\n")
    elif kind == "zero":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(sample.read_bytes()[:200])
    elif kind == "bomb":
        write_bomb(path)
    return path


def _regular_file(w: World) -> Path:
    path = w.root / "afile"
    path.write_text("a file where a directory is expected\n")
    return path


def _search(w: World, query: Path, *extra) -> list[str]:
    return ["search", "--checkpoint", w.last, "--query", query, "--out", w.root / "sheet.png", *extra]


# (id, argv builder, what the one error line must name)
ERRORS = [
    ("embedding_dim", lambda w: w.train(w.root / "o1", "model.embedding_dim=-4"), "'model.embedding_dim'"),
    ("lr_negative", lambda w: w.train(w.root / "o1", "train.lr=-0.1"), "'train.lr'"),
    ("lr_nan", lambda w: w.train(w.root / "o1", "train.lr=nan"), "'train.lr'"),
    ("weight_decay_inf", lambda w: w.train(w.root / "o1", "train.weight_decay=inf"), "'train.weight_decay'"),
    ("epochs", lambda w: w.train(w.root / "o1", "train.epochs=-3"), "'train.epochs'"),
    ("num_workers", lambda w: w.train(w.root / "o1", "data.num_workers=-1"), "'data.num_workers'"),
    ("metrics", lambda w: w.train(w.root / "o1", "eval.metrics=[recall,bogus]"), "'eval.metrics'"),
    ("memory_budget", lambda w: w.train(w.root / "o1", "eval.memory_budget_mb=4"), "'eval.memory_budget_mb'"),
    ("crop_scale", lambda w: w.train(w.root / "o1", "data.crop_scale=[0.9,0.1]"), "'data.crop_scale'"),
    ("max_pixels", lambda w: w.train(w.root / "o1", "data.max_pixels=0"), "'data.max_pixels'"),
    ("loss_param_type", lambda w: w.train(w.root / "o1", "loss.label_smoothing=abc"), "'label_smoothing'"),
    ("empty_test_split", lambda w: w.train(w.root / "o2", *_empty_test(w, 0)), "split 'test' has 0 images"),
    ("one_image_test_split", lambda w: w.train(w.root / "o3", *_empty_test(w, 1)), "split 'test' has 1 images"),
    ("ks_beyond_gallery", lambda w: ["eval", "--checkpoint", w.last, "eval.ks=[1,1000]"], "eval.ks"),
    ("resume_arch", lambda w: w.train(w.root / "o4", f"train.resume={w.last}", "model.arch=resnet34"),
     "model.arch=resnet18 (this run: resnet34)"),
    ("resume_embedding_dim", lambda w: w.train(w.root / "o5", f"train.resume={w.last}", "model.embedding_dim=64"),
     "model.embedding_dim=0 (this run: 64)"),
    ("resume_class_count", lambda w: w.train(w.root / "o6", f"train.resume={w.last}", f"data.root={w.root / 'd10'}",
                                             "data.synthetic.classes=10"), "checkpoint's loss does not fit"),
    ("eval_embedding_dim", lambda w: ["eval", "--checkpoint", w.last, "model.embedding_dim=64"],
     "model.embedding_dim=0 (this run: 64)"),
    ("checkpoint_without_config", lambda w: ["eval", "--checkpoint", _checkpoint_variant(
        w, "noconfig.pt", lambda s: {k: v for k, v in s.items() if k != "config"})], "carries no run config"),
    ("checkpoint_bad_config", lambda w: ["eval", "--checkpoint", _checkpoint_variant(
        w, "badconfig.pt", lambda s: {**s, "config": "model: [unclosed"})], "badconfig.pt"),
    ("checkpoint_unsafe_pickle", lambda w: ["eval", "--checkpoint", _checkpoint_variant(
        w, "evil.pt", lambda s: {**s, "extra": _Pickled()})], "evil.pt: refused"),
    ("eval_out_directory", lambda w: ["eval", "--checkpoint", w.last, "--out", w.root], "--out"),
    ("search_text_query", lambda w: _search(w, _query(w, "text")), "text.jpg"),
    ("search_zero_byte_query", lambda w: _search(w, _query(w, "zero")), "zero.jpg: zero-byte file"),
    ("search_truncated_query", lambda w: _search(w, _query(w, "truncated")), "truncated.jpg"),
    ("search_bomb_query", lambda w: _search(w, _query(w, "bomb")), "bomb.jpg: image too large"),
    ("out_under_a_file", lambda w: w.train(_regular_file(w) / "run"), "afile is a regular file, not a directory"),
    ("out_is_a_file", lambda w: w.train(_regular_file(w)), "afile is a regular file, not a directory"),
    ("out_unwritable", lambda w: w.train(Path("/sys/unidml_run")), "/sys/unidml_run: cannot create the run directory"),
    ("seed_negative", lambda w: w.train(w.root / "o1", "train.seed=-1"), "override 'train.seed=-1': key 'train.seed'"),
    ("seed_huge", lambda w: w.train(w.root / "o1", "train.seed=99999999999999999999"), "key 'train.seed'"),
    ("image_size_1", lambda w: w.train(w.root / "o1", "data.image_size=1", "data.resize_size=1"),
     "override 'data.image_size=1': data.image_size: 1 px is smaller than the 32 px"),
    ("search_out_directory", lambda w: ["search", "--checkpoint", w.last, "--query",
                                        next((w.data / "images").rglob("*.jpg")), "--out", w.root], "--out"),
]


@pytest.mark.parametrize("make_argv, names", [pytest.param(a, n, id=i) for i, a, n in ERRORS])
def test_bad_input_is_one_line_exit_2_and_touches_no_run(world, make_argv, names):
    before = snapshot(world.reference)
    argv = make_argv(world)
    code, _, err = cli(argv)
    line = error_line(err)
    assert code == 2 and names in line, line
    assert "weights_only" not in line
    assert snapshot(world.reference) == before
    if argv[0] == "train":  # nothing of a run was written where it was refused
        assert existing_run(Path(argv[argv.index("--out") + 1])) == []


def test_a_diverging_model_stops_in_one_line_and_keeps_the_last_good_checkpoint(world):
    out = world.root / "diverged"
    code, _, err = cli(world.train(out, "train.lr=1e30", "train.warmup_iters=0"))
    line = error_line(err)
    assert code == 2 and "diverged in epoch 1" in line and "train.lr" in line
    stopped = json.loads((out / "metrics.json").read_text())["stopped"]
    assert stopped["reason"] == "non_finite" and stopped["epoch"] == 1
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_resume_continues(world, monkeypatch):
    out = world.root / "diskfull"
    inject_checkpoint_fault("2:writing:enospc", monkeypatch.setattr)  # the epoch-1 checkpoint
    code, _, err = cli(world.train(out))
    line = error_line(err)
    assert code == 2 and line.endswith("(free space, then rerun with train.resume=auto)") and "disk full" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 0
    monkeypatch.undo()
    assert cli(world.train(out, "train.resume=auto"))[0] == 0
    assert epochs(out) == epochs(world.reference)


def _copy_run(w: World, name: str) -> Path:
    """A copy of the finished reference run (to break and resume without touching it)."""
    target = w.root / name
    shutil.copytree(w.reference, target)
    return target


@pytest.mark.slow
def test_a_resume_past_a_corrupt_last_pt_keeps_the_good_generation(world):
    """last.pt cut in half: the run resumes from prev.pt (epoch 1), and the unreadable file is moved
    aside instead of becoming prev.pt at the next save: afterwards last.pt and prev.pt both load."""
    out = _copy_run(world, "corrupt_last")
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    code, _, err = cli(world.train(out, "train.resume=auto"))
    assert code == 0, err
    directory = out / "checkpoints"
    assert [torch.load(directory / n, weights_only=True)["epoch"] for n in ("last.pt", "prev.pt")] == [2, 1]
    assert (directory / "last.pt").stat().st_ino != (directory / "prev.pt").stat().st_ino
    assert [p.name.split("-")[0] for p in directory.glob("last.pt.corrupt-*")] == ["last.pt.corrupt"]
    assert epochs(out) == epochs(world.reference)  # epoch 2 retrained from epoch 1 to the same figures


@pytest.mark.slow
def test_a_file_size_limit_during_the_checkpoint_write_is_one_line(world):
    """The real torch writer under a real RLIMIT_FSIZE (a child process; SIGXFSZ ignored, so write(2)
    returns EFBIG): one line, recorded in train.log, and metrics.json lists no epoch that no checkpoint
    holds. The limit lets metrics and logs through but not a checkpoint with optimizer state."""
    import resource
    import subprocess

    out = _copy_run(world, "fsize_limit")
    before = snapshot(out / "checkpoints")
    limit = (out / "checkpoints" / "last.pt").stat().st_size // 2

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [sys.executable, "-m", "unidml", *map(str, world.train(out, "train.epochs=3", "train.resume=auto"))]
    done = subprocess.run(argv, env=env, preexec_fn=limited, capture_output=True, text=True, timeout=600)
    line = error_line(done.stderr)
    assert done.returncode == 2 and "file-size limit reached (ulimit -f) while writing the checkpoint" in line, line
    assert line.endswith("intact (raise the limit, then rerun with train.resume=auto)")
    assert snapshot(out / "checkpoints") == before  # nothing replaced, no temp file left
    assert [e["epoch"] for e in epochs(out)] == [0, 1, 2]
    assert line.removeprefix("unidml: error: ") in (out / "train.log").read_text().splitlines()[-1]


def test_a_checkpoint_with_any_name_resumes(world):
    snapshot_file = world.root / "snapshot"
    shutil.copyfile(world.last, snapshot_file)
    out = world.root / "renamed"
    code, _, err = cli(world.train(out, f"train.resume={snapshot_file}"))
    assert code == 0, err
    assert epochs(out) == epochs(world.reference)  # resumed at the end: nothing retrained


def test_an_empty_config_file_is_announced(tmp_path, caplog):
    from unidml.run_config import load_run_config

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with caplog.at_level("WARNING"):
        cfg = load_run_config(empty)
    assert cfg.train.epochs == 30
    assert [r.getMessage() for r in caplog.records] == [f"{empty}: the config file is empty; running on the defaults"]


# ------------------------------------------------------------------------------ unreadable images
def _embed(w: World, paths: list[str], backend: str) -> np.ndarray:
    """fp32 embeddings of image files through the run's test transform, without evaluation code."""
    from unidml.data_pipeline import build_eval_loader
    from unidml.data_pipeline.dataset import ImageSet
    from unidml.run_config import load_for_inference

    model, cfg = load_for_inference(w.last, [f"data.backend={backend}"])
    loader = build_eval_loader(cfg.data, ImageSet("x", tuple(paths), np.zeros(len(paths), np.int64)), batch_size=64,
                               rank=0, world_size=1, device=torch.device("cpu"))
    with torch.no_grad():
        return torch.cat([model(images) for images, _, _ in loader]).numpy()


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_unreadable_test_images_are_left_out_and_counted(world, backend):
    """10 of the 32 test images zero-byte: the metrics are those of the 22 readable ones alone (an
    independent brute-force ranking of their embeddings); a stand-in would duplicate a gallery image."""
    from unidml.data_pipeline.readers import read_sop

    root = sop_copy(world, "zero_test")
    test = read_sop(root).splits["test"]
    broken = set(test.paths[::3][:10])
    for path in broken:
        Path(path).write_bytes(b"")
    readable = [i for i, p in enumerate(test.paths) if p not in broken]
    want = brute_force_metrics(_embed(world, [test.paths[i] for i in readable], backend), test.labels[readable], ks=KS)
    out = world.root / f"zero_{backend}.json"
    code, stdout, err = cli(["eval", "--checkpoint", world.last, "--out", out, "data.dataset=sop",
                             f"data.root={root}", f"data.backend={backend}"])
    assert code == 0, err
    record = json.loads(out.read_text())
    # ratios of counts: equal unless float32 rounding reorders a near-tie (none in this tiny set)
    assert record["metrics"] == pytest.approx({**want, "unreadable_images": 10}, abs=1e-9)
    assert record["metrics"]["num_queries"] == 22 and sorted(record["unreadable"]) == sorted(broken)
    assert "(22 queries, 0 excluded: no relevant reference, 10 unreadable images left out)" in stdout


def test_search_never_lists_an_unreadable_gallery_image(world):
    gallery = world.root / "gallery"
    images = sorted((world.data / "images").rglob("*.jpg"))[32:44]
    for i, path in enumerate(images):
        target = gallery / f"{i:02d}.jpg"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, target)
        if i % 2:
            target.write_bytes(b"")
    code, stdout, err = cli(["search", "--checkpoint", world.last, "--query", gallery / "00.jpg", "--gallery", gallery,
                             "--topk", "8", "--out", world.root / "gallery_sheet.png"])
    assert code == 0, err
    hits = [line.split()[-1] for line in stdout.splitlines() if line.split()[1:2] == ["cos"]]  # "  1  cos 0.93  PATH"
    assert "6 unreadable gallery images left out" in stdout
    assert sorted(hits) == sorted(str((gallery / f"{i:02d}.jpg").resolve()) for i in (2, 4, 6, 8, 10))


# ---------------------------------------------------------------------------------- kills, lock
CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["torch", "torchvision", "unidml.launcher.cli", "unidml.engine.trainer"])


def _cli_child(argv: list[str], log: str, checkpoint_fault: str | None) -> None:
    """`unidml ARGV` with output to `log` (runs in a process forked from the fork server), its checkpoint
    writes observed by `checkpoint_fault` when given (tests/fault_injection.py)."""
    if checkpoint_fault:
        inject_checkpoint_fault(checkpoint_fault)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = main([str(a) for a in argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _start(argv: list, log: Path, checkpoint_fault: str | None = None):
    process = CONTEXT.Process(target=_cli_child, args=([str(a) for a in argv], str(log), checkpoint_fault))
    process.start()
    return process


def _recovers(w: World, run_dir: Path) -> None:
    """After a kill: a plain rerun is refused when anything of the run is on disk, and resuming ends
    with exactly the uninterrupted run's metrics."""
    if existing_run(run_dir):
        code, _, err = cli(w.train(run_dir))
        assert code == 2 and "already holds a run" in error_line(err)
    if (run_dir / "checkpoints" / "last.pt").exists():
        torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)  # complete, whatever the kill hit
    code, _, err = cli(w.train(run_dir, "train.resume=auto"))
    assert code == 0, err
    got, want = epochs(run_dir), epochs(w.reference)
    assert got == want, [(e["epoch"], k, g[k], e[k]) for g, e in zip(got, want) for k in e if g.get(k) != e[k]]
    assert not [p for p in run_dir.rglob("*.tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_kill_inside_a_checkpoint_write_loses_nothing(world, seed):
    rng = np.random.default_rng(seed)
    write, stage = int(rng.integers(1, 4)), str(rng.choice(checkpoint.WRITE_STAGES))  # 3 writes: epochs 0, 1, 2
    run_dir = world.root / f"killed_in_write_{seed}"
    child = _start(world.train(run_dir), world.root / f"kill{seed}.log",
                   f"{write}:{stage}:kill")
    child.join(timeout=600)
    # best_linked only happens when that epoch is the best so far: otherwise the run ends normally
    assert child.exitcode == -signal.SIGKILL or (stage == "best_linked" and child.exitcode == 0)
    _recovers(world, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 4])
def test_a_second_writer_is_refused_and_a_kill_at_a_random_time_loses_nothing(world, seed):
    run_dir = world.root / f"killed_at_random_{seed}"
    child = _start(world.train(run_dir), world.root / f"random{seed}.log")
    lock = run_dir / LOCK_NAME
    deadline = time.monotonic() + 300
    while not (lock.exists() and lock.read_text().strip() == str(child.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    claimed = time.monotonic()
    code, _, err = cli(world.train(run_dir, "train.resume=auto"))
    assert code == 2 and error_line(err).endswith(f"{run_dir}: in use by another run (PID {child.pid}); "
                                                  f"wait for it to finish or pass --out NEW_DIR")
    delay = np.random.default_rng(seed).uniform(0.1, 0.9) * world.seconds
    time.sleep(max(0.0, delay - (time.monotonic() - claimed)))
    child.kill()
    child.join(timeout=60)
    assert child.exitcode in (-signal.SIGKILL, 0)  # it may have finished first
    _recovers(world, run_dir)
