"""Fault probe: hostile inputs against the `unidml` command on tiny data, one line per case.

Each case runs `python -m unidml ...` in a child process (so a traceback shows as one), and states what
it expects: a clean error (exactly one `unidml: error:` line naming the cause, no traceback) or a run
that succeeds and keeps its checkpoints. Cases that touch a run directory count the checkpoint
generations lost afterwards (last.pt and prev.pt must both load and be two distinct files).

    python bench/fault_probe.py [--work DIR]

Prints `case | expected | observed | verdict` per case and a total: inputs tried, clean errors,
tracebacks, checkpoints lost, cases passed. Exit code 1 when any case failed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "quickstart.yaml")
TIMEOUT_S = 300
# Cases that inject a fault run the test-only entry (tests/fault_injection.py: the product reads no fault
# settings) instead of `python -m unidml`, with the spec in one of these variables.
FAULT_ENTRY = str(REPO / "tests" / "fault_injection.py")
FAULT_VARIABLES = {"UNIDML_TEST_CHECKPOINT_FAULT", "UNIDML_TEST_KILL"}


@dataclass
class Outcome:
    code: int
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("unidml: error: ")]

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    @property
    def clean_error(self) -> bool:
        return self.code != 0 and len(self.error_lines) == 1 and not self.traceback

    def observed(self) -> str:
        if self.traceback:
            last = [line for line in self.stderr.splitlines() if line.strip()][-1]
            return f"traceback ({last[:90]})"
        if self.clean_error:
            return f"rc {self.code}: {self.error_lines[0][len('unidml: error: '):][:110]}"
        return f"rc {self.code}" + (f", {len(self.error_lines)} error lines" if self.error_lines else "")


class Probe:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.data = work / "data"
        self.rows: list[tuple[str, str, str, bool]] = []
        self.clean = self.tracebacks = self.lost = 0

    def tiny(self, *extra: str) -> list[str]:
        return [f"data.root={self.data}", "data.synthetic.classes=8", "data.synthetic.per_class=8",
                "data.image_size=32", "data.resize_size=32", "train.batch_size=16", "data.num_workers=0",
                "train.warmup_iters=2", "train.epochs=2", "data.backend=torchvision", "engine.device=cpu",
                "engine.precision=fp32", *extra]

    def train(self, out: Path, *extra: str) -> list[str]:
        return ["train", "--config", CONFIG, "--out", str(out), *self.tiny(*extra)]

    def unidml(self, argv: list[str], env: dict[str, str] | None = None,
               preexec: Callable[[], None] | None = None) -> Outcome:
        child_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
        entry = [FAULT_ENTRY] if env and set(env) & FAULT_VARIABLES else ["-m", "unidml"]
        done = subprocess.run([sys.executable, *entry, *argv], env=child_env, capture_output=True,
                              text=True, timeout=TIMEOUT_S, preexec_fn=preexec)
        return Outcome(done.returncode, done.stderr)

    def record(self, case: str, expected: str, outcome: Outcome, passed: bool, lost: int = 0,
               observed: str = "") -> None:
        self.clean += outcome.clean_error
        self.tracebacks += outcome.traceback
        self.lost += lost
        text = observed or outcome.observed()
        if lost:
            text += f"; {lost} checkpoint generations lost"
        self.rows.append((case, expected, text, passed and not outcome.traceback and not lost))
        print(f"{case:<25}| {expected:<45}| {text:<120}| {'PASS' if self.rows[-1][3] else 'FAIL'}", flush=True)

    def expect_error(self, case: str, argv: list[str], fragment: str, **kw) -> Outcome:
        outcome = self.unidml(argv, **kw)
        ok = outcome.clean_error and fragment in outcome.error_lines[0]
        self.record(case, f"one line naming '{fragment[:28]}'", outcome, ok)
        return outcome


def generations_lost(directory: Path) -> int:
    """How many of last.pt / prev.pt fail to load, plus one if they are two names of one file."""
    from unidml.engine.checkpoint import CheckpointError, load

    names = [directory / "last.pt", directory / "prev.pt"]
    lost = 0
    for path in names:
        try:
            load(path)
        except CheckpointError:
            lost += 1
    if lost == 0 and names[0].stat().st_ino == names[1].stat().st_ino:
        lost += 1
    return lost


def epochs(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["epochs"]


def copy_of(base: Path, target: Path) -> Path:
    shutil.copytree(base, target)
    return target


def run_cases(p: Probe) -> None:
    base = p.work / "base"
    outcome = p.unidml(p.train(base))
    p.record("base_run", "rc 0, 3 evaluated epochs", outcome,
             outcome.code == 0 and [e["epoch"] for e in epochs(base)] == [0, 1, 2])
    ckpt = base / "checkpoints"

    # ---- checkpoints (issue items 1-3, 8 and the earlier probe's kinds)
    run = copy_of(base, p.work / "corrupt_last")
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    outcome = p.unidml(p.train(run, "train.resume=auto"))
    lost = generations_lost(run / "checkpoints")
    p.record("resume_past_corrupt_last", "rc 0, falls back, 2 generations kept", outcome,
             outcome.code == 0 and epochs(run) == epochs(base), lost)

    run = copy_of(base, p.work / "fsize")
    limit = (ckpt / "last.pt").stat().st_size // 2

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    outcome = p.unidml(p.train(run, "train.epochs=3", "train.resume=auto"), preexec=limited)
    newest = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    logged = outcome.clean_error and outcome.error_lines[0][15:] in (run / "train.log").read_text()
    ok = outcome.clean_error and "file-size limit" in outcome.error_lines[0] and logged and \
        max(e["epoch"] for e in epochs(run)) == newest
    p.record("file_size_limit", "one line, in train.log, metrics<=checkpoint", outcome, ok,
             generations_lost(run / "checkpoints"))

    for stage in ("writing", "prev_linked"):  # the third write: last.pt and prev.pt both exist before it
        run = p.work / f"enospc_{stage}"
        outcome = p.unidml(p.train(run), env={"UNIDML_TEST_CHECKPOINT_FAULT": f"3:{stage}:enospc"})
        ok = outcome.clean_error and "disk full" in outcome.error_lines[0]
        p.record(f"enospc_at_{stage}", "one line, 2 distinct generations", outcome, ok,
                 generations_lost(run / "checkpoints"))

    run = p.work / "killed"
    outcome = p.unidml(p.train(run), env={"UNIDML_TEST_KILL": f"0:0:{p.work / 'killed_marker'}"})
    killed = outcome.code == -signal.SIGKILL
    outcome = p.unidml(p.train(run, "train.resume=auto"))
    p.record("kill9_mid_epoch_resume", "killed, resumes to identical metrics", outcome,
             killed and outcome.code == 0 and epochs(run) == epochs(base), generations_lost(run / "checkpoints"))

    bad = p.work / "checkpoints"
    bad.mkdir()
    (bad / "random.pt").write_bytes(np.random.default_rng(0).bytes(1 << 16))
    p.expect_error("random_bytes_checkpoint", ["eval", "--checkpoint", str(bad / "random.pt")],
                   "no zip archive header")
    (bad / "half.pt").write_bytes((ckpt / "best.pt").read_bytes()[:100_000])
    p.expect_error("truncated_checkpoint", ["eval", "--checkpoint", str(bad / "half.pt")], "truncated")
    marker = p.work / "payload_ran"
    state = torch.load(ckpt / "best.pt", weights_only=True)
    torch.save({**state, "extra": _Payload(str(marker))}, bad / "evil.pt")
    outcome = p.expect_error("pickle_payload", ["eval", "--checkpoint", str(bad / "evil.pt")], "refused")
    if marker.exists():
        p.record("pickle_payload_ran", "payload never runs", outcome, False, observed="the payload ran")

    # ---- one line, never a traceback (items 4-7, 9, 10)
    afile = p.work / "afile"
    afile.write_text("a file\n")
    p.expect_error("out_under_a_file", p.train(afile / "run"), "is a regular file, not a directory")
    p.expect_error("out_unwritable", p.train(Path("/sys/unidml_probe")), "cannot create the run directory")
    p.expect_error("seed_negative", p.train(p.work / "o", "train.seed=-1"), "key 'train.seed'")
    p.expect_error("seed_huge", p.train(p.work / "o", "train.seed=99999999999999999999"), "key 'train.seed'")
    p.expect_error("image_size_1", p.train(p.work / "o", "data.image_size=1", "data.resize_size=1"),
                   "use data.image_size >= 32")
    p.expect_error("override_named", p.train(p.work / "o", "train.lr=-0.1"), "override 'train.lr=-0.1'")
    p.expect_error("lr_nan", p.train(p.work / "o", "train.lr=nan"), "key 'train.lr'")
    p.expect_error("unknown_key", p.train(p.work / "o", "train.lrr=0.1"), "train.lrr")
    p.expect_error("missing_config", ["train", "--config", str(p.work / "nope.yaml")], "config file not found")
    p.expect_error("rerun_into_a_run", p.train(base), "already holds a run")
    data_check(p)
    lost_rank(p)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def data_check(p: Probe) -> None:
    from PIL import Image

    root = p.work / "folder"
    for name in ("cat", "dog", "owl", "fox"):  # 4 classes: the derived test split takes half
        for i in range(3):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 32), (40 * i, 90, 200)).save(root / name / f"{i}.jpg")
    (root / "cat" / "1.jpg").write_bytes(b"not an image")
    (root / "empty_class").mkdir()
    argv = [sys.executable, "-m", "unidml", "data", "check", "--dataset", "folder", "--root", str(root)]
    done = subprocess.run(argv, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    outcome = Outcome(done.returncode, done.stderr)
    status = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    ok = done.returncode == 0 and "1 unreadable" in status and "1 class folders without images" in status
    p.record("data_check_status", "status names unreadable + empty class", outcome, ok, observed=status[:110])


def lost_rank(p: Probe) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    argv = [sys.executable, FAULT_ENTRY, *p.train(p.work / "ddp", "engine.backend=ddp")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "WORLD_SIZE": "2", "UNIDML_TEST_KILL": f"1:0:{p.work / 'rank_marker'}"}
    ranks = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errs = [proc.communicate(timeout=TIMEOUT_S)[1] for proc in ranks]
    outcome = Outcome(ranks[0].returncode, errs[0])
    ok = outcome.clean_error and "lost contact with rank 1 on host" in outcome.error_lines[0]
    p.record("ddp_rank_killed", "one line naming rank 1 and its host", outcome, ok)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="", help="scratch folder (default: a new temp folder, removed after)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="unidml_probe_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    p = Probe(work)
    print(f"{'case':<25}| {'expected':<45}| {'observed':<120}| verdict")
    try:
        run_cases(p)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    passed = sum(row[3] for row in p.rows)
    print(f"total: {len(p.rows)} inputs tried, {p.clean} clean errors, {p.tracebacks} tracebacks, "
          f"{p.lost} checkpoints lost, {passed}/{len(p.rows)} passed, {time.monotonic() - start:.0f} s")
    return 0 if passed == len(p.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
