"""The classifier Triton kernels compile for an H100 (sm_90) without a GPU: ahead-of-time, through Triton's own
compiler and ptxas, for each compute dtype (bf16, fp16, fp32 with TF32 and IEEE), so a type or layout error
in the GPU code path fails here rather than on the first device run. The interpreter tests check values."""
from pathlib import Path

import pytest
from triton_interpreter import run_interpreted

ROOT = Path(__file__).resolve().parents[1]


def compile_all() -> None:
    """Compile every kernel's first autotune config per dtype (run without TRITON_INTERPRET; see below)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from unidml.kernels.classifier import triton_kernels as K

    pointers = {"X", "W", "T", "INV", "BIAS", "ROW_LSE", "COL_LSE", "GROW", "GCOL", "DX", "DV", "DB"}
    for dot, ptr, precision in ((tl.bfloat16, "*bf16", "ieee"), (tl.float16, "*fp16", "ieee"),
                                (tl.float32, "*fp32", "tf32"), (tl.float32, "*fp32", "ieee")):
        for name in ("fwd_rows", "fwd_cols", "bwd_dx", "bwd_dv"):
            kernel = getattr(K, name)
            config = kernel.configs[0]
            const = dict(config.kwargs, NORMALIZE=True, HAS_BIAS=True, DOT=dot, PRECISION=precision)
            if name.startswith("bwd"):
                const.update(HAS_ROW=True, HAS_COL=True)
            signature = {}
            for arg in kernel.fn.arg_names:
                if arg in const:
                    signature[arg] = "constexpr"
                elif arg in pointers:
                    signature[arg] = ptr if arg == "X" else "*i32" if arg == "T" else "*fp32"  # W: fp32 params
                else:
                    signature[arg] = "fp32" if arg == "scale" else "i32"
            assert set(signature) == set(kernel.fn.arg_names), name
            source = ASTSource(kernel.fn, signature,
                               constexprs={(kernel.fn.arg_names.index(k),): v for k, v in const.items()})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            assert compiled.asm["cubin"], f"{name} {dot}: no cubin"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    proc = run_interpreted("import test_kernels_classifier_compile as t; t.compile_all()", timeout=280,
                           interpret=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
