"""Numeric edges of the pairwise losses on every backend: empty kept sets under huge exponents
(against float64 oracles) and labels that differ only above 32 bits."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from numerics_cases import check_extreme, check_wide_labels

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_empty_kept_sets_under_huge_exponents_match_float64(backend):
    assert not check_extreme(backend)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_labels_equal_mod_2_32_stay_distinct(backend):
    assert not check_wide_labels(backend)


@pytest.mark.timeout(300)
def test_triton_numeric_edges_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    code = ("import numerics_cases as N, triton_interpreter as T; T.faithful_bf16_dot(); "
            "failures = N.check_extreme('triton') + N.check_wide_labels('triton'); "
            "assert not failures, failures")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
