"""bench/gpu_check.sh: skips every part without CUDA, and one failing part does not stop the others."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["train_step", "pairwise", "classifier", "evaluation", "data_pipeline", "smoke"]

# Stands in for python on a CUDA machine: answers the CUDA probe with 1; the train-step part writes
# its JSON, the pairwise part exits 3 without one, every other part exits 0 without one.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in
  *cuda.is_available*) echo 1 ;;
  *train_step_gpu.py*) echo '{"part": "train_step", "engine_images_per_s": 1.0}' > "$OUT/train_step.json" ;;
  *losses.py*) echo "kernel crashed" >&2; exit 3 ;;
  *) exit 0 ;;
esac
"""


def run_check(out: Path, env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), **env_extra}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_without_cuda_every_part_is_skipped_and_the_script_exits_0(tmp_path):
    start = time.monotonic()
    done = run_check(tmp_path, {"CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}, "--quick")
    assert time.monotonic() - start < 60
    assert done.returncode == 0, done.stderr
    for name in PARTS:
        assert json.loads((tmp_path / f"{name}.json").read_text())["skipped"] == "no CUDA device"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cuda"] is False
    assert [(p["part"], p["status"]) for p in summary["parts"]] == [(name, "skipped") for name in PARTS]


def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    done = run_check(out, {"PYTHON": str(fake)})
    assert done.returncode == 1  # a part failed
    status = {p["part"]: p["status"] for p in json.loads((out / "summary.json").read_text())["parts"]}
    assert status == {"train_step": "ok", "pairwise": "failed", "classifier": "failed", "evaluation": "failed",
                      "data_pipeline": "failed", "smoke": "failed"}
    assert json.loads((out / "train_step.json").read_text())["engine_images_per_s"] == 1.0
    assert "exit status 3" in json.loads((out / "pairwise.json").read_text())["failed"]
    assert "kernel crashed" in (out / "pairwise.log").read_text()
    assert "exit status 0" in json.loads((out / "smoke.json").read_text())["failed"]  # exit 0 but no JSON


def test_a_python_part_writes_its_skip_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    part = [sys.executable, str(ROOT / "bench" / "evaluation_gpu.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(part, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "evaluation.json").read_text()) == {"part": "evaluation", "quick": True,
                                                                     "skipped": "no CUDA device"}
