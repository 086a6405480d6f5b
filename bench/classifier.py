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
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


def _peak_cpu_bytes(run) -> int:
    """Most tensor bytes held at once during `run()` beyond those alive before it (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


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
        peak = _peak_cpu_bytes(once)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return {"method": method, "classes": num_classes, "n": n, "d": d, "device": device, "dtype": dtype,
            "threads": torch.get_num_threads(), "time_s": min(times), "peak_mib": peak / 2 ** 20,
            "weights_mib": weight.numel() * weight.element_size() / 2 ** 20}


def _spawn(args: argparse.Namespace, method: str, num_classes: int) -> dict:
    cmd = [sys.executable, __file__, "--case", method, str(num_classes), "--n", str(args.n), "--d", str(args.d),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 200_000])
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
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.n, args.d, args.device, args.dtype,
                                  args.reps)))
        return
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
