"""Numeric edges of the pairwise losses on every backend: empty kept sets under huge exponents
(against float64 oracles) and labels that differ only above 32 bits."""
import pytest
from numerics_cases import check_extreme, check_wide_labels
from triton_interpreter import assert_runs_interpreted


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_empty_kept_sets_under_huge_exponents_match_float64(backend):
    assert not check_extreme(backend)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_labels_equal_mod_2_32_stay_distinct(backend):
    assert not check_wide_labels(backend)


@pytest.mark.timeout(300)
def test_triton_numeric_edges_under_the_interpreter():
    code = ("import numerics_cases as N; failures = N.check_extreme('triton') + N.check_wide_labels('triton'); "
            "assert not failures, failures")
    assert_runs_interpreted(code, timeout=280)
