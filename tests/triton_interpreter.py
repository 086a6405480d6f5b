"""Running the Triton kernels' GPU code path on a CPU: a subprocess under TRITON_INTERPRET=1 (`run_interpreted`,
`assert_runs_interpreted`) and a faithful bf16 `tl.dot` for the interpreter, so tests need not upcast
(`faithful_bf16_dot`).

Triton's interpreter stores bf16 tensors as their uint16 bit patterns and its `create_dot` hands those
integers to numpy's matmul, so a bf16 `tl.dot` returns garbage (a kernel could only be tested there if
it upcast first, which hides the dtype bugs of the GPU path). `faithful_bf16_dot` widens bf16 operands to
fp32 exactly before the product: a product of two bf16 values is exact in fp32, so this is what a tensor
core computes with fp32 accumulation, up to the order of the sum. The kernels are untouched: they still
cast both operands to one dtype and `tl.dot`'s dtype checks still run before the patched product.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_PRELUDE = "import triton_interpreter; triton_interpreter.faithful_bf16_dot()\n"


def _as_float32(handle):
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if handle.dtype.scalar != tl.bfloat16:
        return handle
    return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def faithful_bf16_dot() -> None:
    """Patch the interpreter's `create_dot` to multiply bf16 operands by value (idempotent)."""
    from triton.runtime.interpreter import InterpreterBuilder

    original = InterpreterBuilder.create_dot
    if getattr(original, "faithful_bf16", False):
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, _as_float32(a), _as_float32(b), d, input_precision, max_num_imprecise_acc)

    create_dot.faithful_bf16 = True
    InterpreterBuilder.create_dot = create_dot


def run_interpreted(code: str, timeout: float, interpret: bool = True) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh process from the repository root with unidml and tests/ importable,
    under TRITON_INTERPRET=1 (set before triton is imported) with the faithful bf16 dot in place, unless
    `interpret` is False (ahead-of-time compilation needs the interpreter off)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
        code = _PRELUDE + code
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def assert_runs_interpreted(code: str, timeout: float) -> None:
    """`run_interpreted(code)` must exit 0; the assertion shows the tail of its stderr."""
    proc = run_interpreted(code, timeout)
    assert proc.returncode == 0, proc.stderr[-4000:] or f"exit code {proc.returncode}"
