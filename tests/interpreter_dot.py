"""A faithful bf16 `tl.dot` for Triton's interpreter, so tests run the GPU code path without upcasting.

The interpreter stores bf16 tensors as uint16 and its `create_dot` multiplies those raw bit patterns
as integers (fp8 operands it widens first, bf16 ones it does not). `faithful_bf16_dot` widens bf16
operands to fp32 exactly before the product: a product of two bf16 values is exact in fp32, so this
is what a tensor core computes with fp32 accumulation, up to the order of the sum. The kernels are
untouched: they still cast both operands to bf16 and call `tl.dot` on them.
"""
import numpy as np


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
