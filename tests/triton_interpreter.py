"""Test support for running the Triton kernels under TRITON_INTERPRET=1 on their GPU code path.

Triton's interpreter stores bf16 as its uint16 bit patterns and `create_dot` hands those integers to
numpy's matmul, so a bf16 `tl.dot` returns garbage (a kernel can only be tested there if it upcasts
first, which hides dtype bugs of the GPU path). `faithful_bf16_dot` makes the interpreter's dot read
bf16 operands as the numbers they encode (exact in fp32), leaving every kernel line unchanged: the
dtype checks of `tl.dot` (both operands one dtype) still run before it.
"""
from __future__ import annotations

import numpy as np


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


def run_interpreted(code: str, timeout: int) -> str:
    """Run Python `code` in a fresh process under TRITON_INTERPRET=1 (set before triton is imported),
    with this tree and tests/ importable and the faithful bf16 dot in place; its stderr tail if it
    failed, else "" (so `assert not run_interpreted(...)` shows why)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")]))
    prelude = "import triton_interpreter; triton_interpreter.faithful_bf16_dot()\n"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", prelude + code], env=env, cwd=root,
                          capture_output=True, text=True, timeout=timeout)
    return "" if proc.returncode == 0 else proc.stderr[-4000:] or f"exit code {proc.returncode}"
