"""The Triton kernels' element offsets are 64-bit: past 2^31 elements an int32 product wraps."""
import pytest
from triton_interpreter import assert_runs_interpreted


@pytest.mark.timeout(120)
def test_element_offsets_past_2_31_under_the_interpreter():
    assert_runs_interpreted("import offsets_check; offsets_check.check()", timeout=110)
