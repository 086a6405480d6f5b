"""Triton kernels equal the reference, run on CPU under TRITON_INTERPRET=1 in a subprocess."""
import pytest
from triton_interpreter import assert_runs_interpreted


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("which", ["random", "edge", "mixed"])
def test_triton_interpreter_matches_reference(which):
    assert_runs_interpreted(f"import losses_helpers; losses_helpers.triton_check({which!r})", timeout=580)
