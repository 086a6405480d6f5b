"""bench/losses.py's GEMM-floor report: the JSON contract bench/gpu_check.sh reads."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA device")
def test_floor_report_without_cuda_writes_skipped(tmp_path):
    out = tmp_path / "losses.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "losses.py"), "--device", "cuda", "--n", "16384",
                           "--d", "512", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text()) == {"skipped": "no CUDA device"}


def test_floor_report_on_cpu_checks_then_times_against_the_floor(tmp_path):
    out = tmp_path / "losses.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "losses.py"), "--device", "cpu", "--n", "96",
                           "--d", "24", "--verify-n", "60", "--reps", "1", "--losses", "contrastive",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["verify"] == {"n": 60, "d": 24, "ok": True, "mismatches": []} and report["gemm_floor_s"] > 0
    rows = {(r["loss"], r["backend"]): r for r in report["results"]}
    assert set(rows) == {("contrastive", "tiled"), ("contrastive", "pml")}
    for r in rows.values():
        assert r["vs_gemm_floor"] == pytest.approx(r["time_s"] / report["gemm_floor_s"])
    assert rows[("contrastive", "tiled")]["vs_pml"] == pytest.approx(
        rows[("contrastive", "tiled")]["time_s"] / rows[("contrastive", "pml")]["time_s"])
