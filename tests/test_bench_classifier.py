"""bench/classifier.py's GPU suite: its skip line without CUDA, and its correctness check on the Triton path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_interpreter import assert_runs_interpreted

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_gpu_suite_without_cuda_writes_skipped(tmp_path):
    out = tmp_path / "classifier.json"
    proc = subprocess.run([sys.executable, "bench/classifier.py", "--device", "cuda", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text()) == {"skipped": "no CUDA device"}


def triton_check_case() -> None:
    """The suite's check on the Triton kernels (bf16 embeddings, fp32 weights); run under TRITON_INTERPRET=1."""
    sys.path.insert(0, str(ROOT / "bench"))
    from classifier import check_case
    from triton_interpreter import faithful_bf16_dot

    faithful_bf16_dot()
    result = check_case(300, 20, 40, "cpu", "bfloat16", backend="triton")
    assert result["passed"], result
    assert result["unit_roundoff"] == 2.0 ** -8


@pytest.mark.timeout(200)
def test_gpu_check_passes_on_the_triton_path():
    pytest.importorskip("triton")
    assert_runs_interpreted("import test_bench_classifier as t; t.triton_check_case()", timeout=180)
