"""Running the Triton kernels' GPU code path on a CPU: a subprocess under TRITON_INTERPRET=1 (`run_interpreted`),
and a faithful bf16 `tl.dot` for the interpreter, so tests need not upcast (`faithful_bf16_dot`).

The interpreter stores bf16 tensors as uint16 and its `create_dot` multiplies those raw bit patterns
as integers (fp8 operands it widens first, bf16 ones it does not). `faithful_bf16_dot` widens bf16
operands to fp32 exactly before the product: a product of two bf16 values is exact in fp32, so this
is what a tensor core computes with fp32 accumulation, up to the order of the sum. The kernels are
untouched: they still cast both operands to bf16 and call `tl.dot` on them.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(code: str, timeout: float, interpret: bool = True) -> subprocess.CompletedProcess:
    """`python -c code` from the repository root with unidml and tests/ importable, under TRITON_INTERPRET=1
    (set before triton is imported) unless `interpret` is False (ahead-of-time compilation needs it off)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def faithful_bf16_dot() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "faithful_bf16", False):
        return
    original = builder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot.faithful_bf16 = True
    builder.create_dot = create_dot
