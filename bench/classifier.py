"""Forward+backward time and peak extra memory of the fused classifier losses against the materialising ones.

Methods (one fresh subprocess per case):
  fused_ce           unidml `cross_entropy` (linear head + bias; fused kernels: tiled on CPU, triton on CUDA)
  torch_ce           F.linear + F.cross_entropy on the same weights (the n x C logits materialised)
  fused_proxy_anchor unidml `proxy_anchor` (fused per-proxy column reductions)
  pml_proxy_anchor   pytorch-metric-learning's ProxyAnchorLoss (materialises n x C)
Label smoothing 0 and no dropout, so both sides of a pair compute the same loss.

Peak extra memory: on CPU, the tensor bytes allocated by torch's CPU allocator, counted exactly from the
profiler's memory events (torch.profiler, profile_memory=True: one +bytes event per allocation, one
-bytes event per free, in time order): the maximum of their running sum over one forward+backward,
i.e. the most bytes the pass held at once beyond what existed before it (the weight gradient
included, the weights themselves not). This is deterministic, unlike an RSS high-water mark, which
depends on the malloc arena and page reuse. On CUDA: torch.cuda.max_memory_allocated minus the bytes
allocated before the pass. The profiled pass doubles as the warm-up; time is the best of `--reps`
unprofiled passes after it (the least disturbed by other processes on a shared machine). Ratios
are against the materialising method of the same loss measured in the same run.

  python bench/classifier.py                                   # C = 1e4, 1e5, 2e5; n = 4096; d = 512
  python bench/classifier.py --classes 1000000 --methods fused_ce
  python bench/classifier.py --device cuda --dtype bfloat16 --n 16384 --classes 1000000 --methods fused_ce torch_ce

The GPU suite, `python bench/classifier.py --device cuda --json OUT.json` (no `--classes`): bf16, n = 8192,
d = 512; first a correctness check of the fused kernels at C = 10^6 against the reference backend (n = 256,
see `check_case`), then all four methods at C = 10^5, then the fused ones alone at C = 10^6 (the
materialising baselines would not fit), with time and memory ratios against the baselines at C = 10^5.
Without a CUDA device it writes {"skipped": "no CUDA device"} and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from memory_events import peak_cpu_bytes

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fused_ce", "torch_ce", "fused_proxy_anchor", "pml_proxy_anchor")
BASELINE = {"fused_ce": "torch_ce", "fused_proxy_anchor": "pml_proxy_anchor"}


def _step(method: str, num_classes: int, d: int, device: str, dtype: str):
    """(forward function of (z, y) returning the loss, the weight tensor) for one method."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from unidml.losses import build_loss

    if method in ("fused_ce", "torch_ce"):
        loss = build_loss("cross_entropy", num_classes=num_classes, embedding_dim=d, device=device,
                          label_smoothing=0.0, dropout=0.0, zero_init=False).to(device)
        if method == "fused_ce":
            return loss, loss.head.weight
        autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")

        def plain(z, y):
            with autocast:
                return F.cross_entropy(F.linear(z, loss.head.weight, loss.head.bias), y)
        return plain, loss.head.weight
    if method == "fused_proxy_anchor":
        loss = build_loss("proxy_anchor", num_classes=num_classes, embedding_dim=d, device=device).to(device)
        return loss, loss.head.weight
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    loss = ProxyAnchorLoss(num_classes, d).to(device)
    return (lambda z, y: loss(z.float(), y)), loss.proxies


# Peak bytes of the materialising methods as multiples of one fp32 n x C matrix (measured on CPU with this
# script at C = 1e5: torch_ce 2.9x, PML 10.9x), used to skip a case that would not fit in memory.
DENSE_COPIES = {"torch_ce": 3.0, "pml_proxy_anchor": 11.0}


def _fits(method: str, num_classes: int, n: int, device: str) -> bool:
    """Whether a materialising method's expected peak fits in 80% of the memory available now."""
    if method not in DENSE_COPIES:
        return True
    if device == "cuda":
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        with open("/proc/meminfo") as handle:
            free = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable"))
    return DENSE_COPIES[method] * n * num_classes * 4 <= 0.8 * free


def run_case(method: str, num_classes: int, n: int, d: int, device: str, dtype: str, reps: int) -> dict:
    """Time (best of `reps`, s) and peak extra memory (MiB) of one forward+backward of `method`."""
    import torch

    if not _fits(method, num_classes, n, device):
        raise SystemExit(f"skipped: about {DENSE_COPIES[method]:.0f} x n x C x 4 bytes would not fit in memory")
    torch.manual_seed(0)
    step, weight = _step(method, num_classes, d, device, dtype)
    z0 = torch.randn(n, d, device=device).to(getattr(torch, dtype))
    y = torch.randint(0, num_classes, (n,), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def once():
        z = z0.clone().requires_grad_()
        step(z, y).backward()
        weight.grad = None
        sync()

    if device == "cuda":
        once()  # compile the kernels outside the measurement
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        once()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_cpu_bytes(once)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return {"method": method, "classes": num_classes, "n": n, "d": d, "device": device, "dtype": dtype,
            "threads": torch.get_num_threads(), "time_s": min(times), "peak_mib": peak / 2 ** 20,
            "weights_mib": weight.numel() * weight.element_size() / 2 ** 20}


UNIT = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24}  # unit roundoff


def check_case(num_classes: int, n: int, d: int, device: str, dtype: str, backend: str = "auto") -> dict:
    """The fused cross-entropy (and Proxy-Anchor's per-proxy log-sum-exps) against the reference backend.

    Inputs: z in `dtype`, weights fp32; the reference runs in fp32 on the same values with the weights rounded
    to the kernels' compute dtype (`unidml.kernels.classifier.common.compute_dtype`), so the forward differs by
    fp32 summation order only (relative 1e-4 asserted). The backward rounds G = ∂L/∂logits (P − Y)/n to the
    compute dtype (unit roundoff u) before its products, so |ΔdZ| ≤ 2u·(|G|·|W|) + 2u_z·|dZ| (dZ returned in
    z's dtype) and |ΔdW| ≤ 2u·(|G|ᵀ·|Z|) entrywise (plus 1e-5 of the largest entry). Proxy-Anchor's col_lse uses
    inverse norms of the unrounded weights: cosines are off by at most 2u, so |Δcol_lse| ≤ α·2u + 1e-4·|col_lse|.
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from unidml.kernels.classifier.common import compute_dtype, fp32_dot_precision
    from unidml.kernels.classifier.dispatch import class_scores
    from unidml.losses import build_loss

    torch.manual_seed(0)
    z0 = torch.randn(n, d, device=device).to(getattr(torch, dtype))
    y = torch.randint(0, num_classes, (n,), device=device)
    fused = build_loss("cross_entropy", num_classes=num_classes, embedding_dim=d, device=device,
                       label_smoothing=0.0, dropout=0.0, zero_init=False, backend=backend).to(device)
    reference = build_loss("cross_entropy", num_classes=num_classes, embedding_dim=d, device=device,
                           label_smoothing=0.0, dropout=0.0, zero_init=False, backend="reference").to(device)
    dot = str(compute_dtype(z0.dtype, torch.float32)).removeprefix("torch.")
    tf32 = dot == "float32" and fp32_dot_precision() == "tf32" and fused.backend == "triton"
    u = 2.0 ** -11 if tf32 else UNIT[dot]  # TF32 operands keep 11 significant bits
    with torch.no_grad():
        reference.head.weight.copy_(fused.head.weight.to(z0.dtype).float())
        fused.head.weight.copy_(reference.head.weight)  # representable in the compute dtype: the cast is exact
        reference.head.bias.copy_(fused.head.bias)
    runs = []
    for loss, z in ((fused, z0.clone()), (reference, z0.float())):
        z.requires_grad_()
        value = loss(z, y)
        value.backward()
        runs.append((value.detach().double(), z.grad.double(), loss.head.weight.grad.double()))
    (v_f, dz_f, dw_f), (v_r, dz_r, dw_r) = runs
    w, x = reference.head.weight.detach().double(), z0.double()
    p = torch.softmax(x @ w.T + reference.head.bias.detach().double(), dim=1)
    onehot = torch.nn.functional.one_hot(y, num_classes).double()
    g_abs = (p + onehot - 2 * p * onehot) / n
    bound_dz = 2 * u * (g_abs @ w.abs()) + 2 * UNIT[dtype] * dz_r.abs() + 1e-5 * dz_r.abs().max()
    bound_dw = 2 * u * (g_abs.T @ x.abs()) + 1e-5 * dw_r.abs().max()
    del p, onehot, g_abs
    out = {"classes": num_classes, "n": n, "d": d, "dtype": dtype, "unit_roundoff": u,
           "ce_loss_rel_err": float((v_f - v_r).abs() / v_r.abs()),
           "ce_dz_err_over_bound": float(((dz_f - dz_r).abs() / bound_dz).max()),
           "ce_dw_err_over_bound": float(((dw_f - dw_r).abs() / bound_dw).max())}
    alpha = 32.0
    x_unit = torch.nn.functional.normalize(z0.float(), dim=1).to(z0.dtype)
    w_proxy = fused.head.weight.detach()
    targets = y
    got = class_scores(x_unit, w_proxy, None, targets, scale=alpha, normalize=True, rows=False, columns=True,
                       backend=fused.backend).col_lse.double()
    want = class_scores(x_unit.float(), w_proxy.to(x_unit.dtype).float(), None, targets, scale=alpha,
                        normalize=True, rows=False, columns=True, backend="reference").col_lse.double()
    finite = torch.isfinite(want)
    bound = alpha * 2 * u + 1e-4 * want[finite].abs()
    out["pa_col_lse_err_over_bound"] = float(((got[finite] - want[finite]).abs() / bound).max())
    out["pa_infinite_entries_agree"] = bool(torch.equal(finite, torch.isfinite(got)))
    out["passed"] = (out["ce_loss_rel_err"] <= 1e-4 and out["ce_dz_err_over_bound"] <= 1
                     and out["ce_dw_err_over_bound"] <= 1 and out["pa_col_lse_err_over_bound"] <= 1
                     and out["pa_infinite_entries_agree"])
    return out


def _spawn(args: argparse.Namespace, method: str, num_classes: int, n: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--case", method, str(num_classes), "--n", str(n or args.n), "--d", str(args.d),
           "--device", args.device, "--dtype", args.dtype, "--reps", str(args.reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1][:120]
        return {"method": method, "classes": num_classes, "error": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """Markdown table with time and memory ratios against the materialising method of the same C."""
    by_key = {(r["method"], r["classes"]): r for r in results}
    lines = ["| C | method | time (s) | peak extra (MiB) | weights (MiB) | time / baseline | memory / baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['classes']} | {r['method']} | {r['error']} | | | | |")
            continue
        base = by_key.get((BASELINE.get(r["method"], r["method"]), r["classes"]))
        ratios = ("", "")
        if base is not None and "error" not in base and base is not r:
            ratios = (f"{r['time_s'] / base['time_s']:.2f}", f"{r['peak_mib'] / base['peak_mib']:.4f}")
        lines.append(f"| {r['classes']} | {r['method']} | {r['time_s']:.2f} | {r['peak_mib']:.1f} | "
                     f"{r['weights_mib']:.1f} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def gpu_suite(args: argparse.Namespace) -> dict:
    """The GPU suite of the module docstring: check, C = 10^5 against the baselines, C = 10^6 fused alone."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    args.dtype = "bfloat16" if args.dtype == "float32" else args.dtype
    check = _spawn(args, "check", 1_000_000, n=256)
    suite = {"device": torch.cuda.get_device_name(0), "n": args.n, "d": args.d, "dtype": args.dtype,
             "check": check, "results": []}
    if not check.get("passed"):
        suite["error"] = "correctness check failed: nothing timed"
        return suite
    for method in METHODS:
        suite["results"].append(_spawn(args, method, 100_000))
    for method in ("fused_ce", "fused_proxy_anchor"):
        suite["results"].append(_spawn(args, method, 1_000_000))
    by_key = {(r["method"], r["classes"]): r for r in suite["results"] if "error" not in r}
    suite["ratios"] = {}
    for fused, baseline in BASELINE.items():
        for classes in (100_000, 1_000_000):
            f, b = by_key.get((fused, classes)), by_key.get((baseline, 100_000))
            if f is not None and b is not None:
                suite["ratios"][f"{fused}@{classes} / {baseline}@100000"] = {
                    "time": f["time_s"] / b["time_s"], "peak_memory": f["peak_mib"] / b["peak_mib"]}
    return suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="default: 1e4 1e5 2e5 on a CPU; the GPU suite with --device cuda")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--case-timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--case", nargs=2, metavar=("METHOD", "CLASSES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case and args.case[0] == "check":
        print(json.dumps(check_case(int(args.case[1]), args.n, args.d, args.device, args.dtype)))
        return
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.n, args.d, args.device, args.dtype,
                                  args.reps)))
        return
    if args.classes is None and args.device == "cuda":
        args.n = 8192 if args.n == 4096 else args.n
        suite = gpu_suite(args)
        print(json.dumps(suite, indent=1))
        if args.json:
            args.json.write_text(json.dumps(suite, indent=1))
        return
    args.classes = args.classes or [10_000, 100_000, 200_000]
    results = []
    for num_classes in args.classes:
        for method in args.methods:
            results.append(_spawn(args, method, num_classes))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"n={args.n} d={args.d} device={args.device} dtype={args.dtype} reps={args.reps} "
          f"load average before/after: see stderr; now {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
