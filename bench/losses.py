"""Forward+backward time and peak memory of the losses per backend, against pytorch-metric-learning.

Every (loss, backend, n) case runs in a fresh subprocess: on CPU its peak memory is the RSS
high-water mark (resource.getrusage ru_maxrss) after the case minus the same mark right before it;
on CUDA it is torch.cuda.max_memory_allocated minus the memory allocated before it. Ratios are
against PML (`pml`) and our `reference` backend measured in the same run.

  python bench/losses.py --sizes 1024 8192 --losses contrastive multi_similarity supcon
  python bench/losses.py --device cuda --dtype bfloat16 --sizes 16384 --backends triton reference pml

`--n N` instead compares, at that one size, the fused backend with the GEMM floor (the three matmuls
of one pairwise forward+backward at the same shapes: V = X·Rᵀ, dX = G·R, dR = Gᵀ·X) and with PML,
after checking the fused backend against the reference at the timed d; it writes one JSON object
(`{"skipped": "no CUDA device"}` when --device cuda finds none):

  python bench/losses.py --device cuda --n 16384 --d 512 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("contrastive", "contrastive_dense", "multi_similarity", "supcon", "triplet", "triplet_all", "snca")
BACKENDS = ("tiled", "reference", "pml", "triton")
# Our side (loss name, parameters); the PML side is in _pml_loss. Random unit vectors in 512-d sit
# at distance ~1.41, so with neg_margin=1 no negative is active (the hinge's sparse case);
# `contrastive_dense` uses neg_margin=1.5, where every negative is active.
CASES = {"triplet": ("triplet", {"mining": "batch_hard", "margin": 0.1}),
         "triplet_all": ("triplet", {"mining": "all", "margin": 0.1}),
         "contrastive_dense": ("contrastive", {"neg_margin": 1.5})}


def _pml_loss(name: str):
    """(loss, miner) of pytorch-metric-learning with the settings our defaults reproduce."""
    from pytorch_metric_learning import losses, miners

    if name == "contrastive":
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0), None
    if name == "contrastive_dense":
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.5), None
    if name == "multi_similarity":
        return losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
    if name == "supcon":
        return losses.SupConLoss(temperature=0.1), None
    if name == "triplet":
        return losses.TripletMarginLoss(margin=0.1), miners.BatchHardMiner()
    if name == "triplet_all":
        return losses.TripletMarginLoss(margin=0.1), None
    raise ValueError(f"no pytorch-metric-learning counterpart for {name}")


def _make_step(name: str, backend: str):
    if backend == "pml":
        loss, miner = _pml_loss(name)
        return lambda z, y: loss(z, y, miner(z, y) if miner is not None else None)
    sys.path.insert(0, str(ROOT))
    from unidml.losses import build_loss

    loss_name, params = CASES.get(name, (name, {}))
    loss = build_loss(loss_name, backend=backend, **params)
    return lambda z, y: loss(z, y)


def run_case(name: str, backend: str, n: int, d: int, device: str, dtype: str, reps: int,
             threads: int | None = None) -> dict:
    """Wall and CPU time (median s) and peak extra memory (MiB) of `reps` forward+backward passes."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    step = _make_step(name, backend)
    z0 = torch.randn(n, d, device=device, dtype=getattr(torch, dtype))
    y = torch.randperm(n, device=device) % max(n // 4, 1)  # 4 images per class, like m-per-class
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    small = torch.randn(64, d, device=device, dtype=z0.dtype, requires_grad=True)
    step(small, torch.arange(64, device=device) % 16).backward()  # load code paths / compile before the baseline
    del small
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for i in range(reps + (1 if reps > 1 else 0)):  # one warm-up (compilation, allocator) when repeating
        z = z0.clone().requires_grad_()
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(z, y).backward()
        sync()
        if reps == 1 or i > 0:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        del z
    if device == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"loss": name, "backend": backend, "n": n, "d": d, "device": device, "dtype": dtype,
            "threads": torch.get_num_threads(), "time_s": statistics.median(times),
            "cpu_s": statistics.median(cpu_times), "peak_mib": peak_mib}


def _spawn(args: argparse.Namespace, name: str, backend: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--case", name, backend, str(n), "--d", str(args.d), "--device", args.device,
           "--dtype", args.dtype, "--reps", str(args.reps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["killed"])[-1][:120]
        return {"loss": name, "backend": backend, "n": n, "error": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _skip_reason(name: str, backend: str, n: int, args: argparse.Namespace) -> str | None:
    if backend == "pml" and name == "snca":
        return "no PML counterpart"
    if backend in ("pml", "reference") and n > args.max_dense_n:
        return f"dense n x n above --max-dense-n {args.max_dense_n}"
    if backend == "triton" and args.device != "cuda":
        return "triton needs CUDA"
    return None


def verify(device: str, dtype: str, backends: list[str], n: int = 1000, d: int = 64) -> list[str]:
    """Compare each non-reference backend with the reference on `device`; return the mismatches.

    Kernel-level: every backend gets the same prepared (normalised, then cast to `dtype`) embeddings,
    the reference their fp32 upcast, and the per-row sums are weighted by the same random upstream
    gradient. fp32: sums and gradients within 1e-4 (relative; gradients in Frobenius norm). Half
    inputs: sums within 1e-3, gradients within 2^-5 (the fused backward rounds dL/dV to the input
    dtype before its tensor-core dot).
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from unidml.kernels.pairwise.dispatch import pairwise_rows, triton_supports
    from unidml.losses import build_loss

    torch.manual_seed(0)
    z = torch.randn(n, d, device=device)
    y = torch.randint(0, n // 5, (n,), device=device)
    upstream = torch.rand(n, 2, device=device)
    rtol, grad_rtol = (1e-4, 1e-4) if dtype == "float32" else (1e-3, 2.0 ** -5)
    problems = []
    cases = [CASES.get(name, (name, {})) for name in LOSSES] + [("contrastive", {"distance": "cosine"}),
                                                                 ("triplet", {"mining": "semi_hard", "margin": 0.1})]
    for name, params in cases:
        loss = build_loss(name, backend="tiled", **params)
        x = z if not loss.normalize else torch.nn.functional.normalize(z, dim=1)
        x = x.to(getattr(torch, dtype))
        results = {}
        for backend in ["reference"] + [b for b in backends if b not in ("reference", "pml")]:
            if backend == "triton" and not triton_supports(loss.spec):
                continue
            xx = (x if backend == "triton" else x.float()).detach().clone().requires_grad_()
            sums, counts = pairwise_rows(loss.spec, xx, xx, y, y, 0, backend)
            (sums * upstream).sum().backward()
            results[backend] = (sums.detach().float(), counts, xx.grad.float())
        want_sums, want_counts, want_grad = results.pop("reference")
        for backend, (sums, counts, grad) in results.items():
            sum_err = ((sums - want_sums).abs().max() / want_sums.abs().max().clamp(min=1.0)).item()
            grad_err = ((grad - want_grad).norm() / want_grad.norm().clamp(min=1e-12)).item()
            same_counts = bool(torch.equal(counts, want_counts))
            status = "ok" if sum_err <= rtol and grad_err <= grad_rtol and same_counts else "MISMATCH"
            line = (f"{status} {name} {params} {backend} {dtype}: sums rel err {sum_err:.2e}, "
                    f"grad rel err {grad_err:.2e}, counts {'equal' if same_counts else 'DIFFER'}")
            print(line, flush=True)
            if status != "ok":
                problems.append(line)
    return problems


PML_ALL_TRIPLETS_MAX_N = 4096


def gemm_floor_s(n: int, d: int, device: str, dtype: str, reps: int) -> float:
    """Median time of the three matmuls one pairwise forward+backward cannot avoid at n x n x d."""
    import torch

    x = torch.randn(n, d, device=device, dtype=getattr(torch, dtype))
    g = torch.randn(n, n, device=device, dtype=x.dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(reps + 1):  # the first is a warm-up
        sync()
        start = time.perf_counter()
        x @ x.T, g @ x, g.T @ x
        sync()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_report(args: argparse.Namespace) -> dict:
    """Fused backend (triton on CUDA, tiled on CPU) vs the GEMM floor vs PML at n = args.n, with the
    kernel check at the timed d first; ratios are of medians measured in this run."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    fused = "triton" if args.device == "cuda" else "tiled"
    mismatches = verify(args.device, args.dtype, [fused], n=args.verify_n, d=args.d)
    floor = gemm_floor_s(args.n, args.d, args.device, args.dtype, args.reps)
    results = []
    for name in args.losses:
        times = {}
        for backend in (fused, "pml"):
            if backend == "pml" and (name == "snca" or (name == "triplet_all" and args.n > PML_ALL_TRIPLETS_MAX_N)):
                continue  # no counterpart; PML lists every (a, p, n) index triple (~0.8 G at n = 16k)
            row = run_case(name, backend, args.n, args.d, args.device, args.dtype, args.reps)
            row["vs_gemm_floor"] = row["time_s"] / floor
            times[backend] = row["time_s"]
            results.append(row)
        if "pml" in times:
            results[-2]["vs_pml"] = times[fused] / times["pml"]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {"device": device, "dtype": args.dtype, "n": args.n, "d": args.d, "reps": args.reps,
            "verify": {"n": args.verify_n, "d": args.d, "ok": not mismatches, "mismatches": mismatches},
            "gemm_floor_s": floor, "results": results}


def _floor_table(report: dict) -> str:
    lines = [f"device={report['device']} dtype={report['dtype']} n={report['n']} d={report['d']} "
             f"check at d={report['d']}: {'ok' if report['verify']['ok'] else 'MISMATCH'}; "
             f"GEMM floor {report['gemm_floor_s'] * 1e3:.2f} ms",
             "| loss | backend | fwd+bwd (ms) | / GEMM floor | / PML | peak extra mem (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in report["results"]:
        vs_pml = f"{r['vs_pml']:.2f}" if "vs_pml" in r else "-"
        lines.append(f"| {r['loss']} | {r['backend']} | {r['time_s'] * 1e3:.2f} | {r['vs_gemm_floor']:.2f} | "
                     f"{vs_pml} | {r['peak_mib']:.1f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Bar charts of time and peak memory per loss and backend (one figure per n)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "time_s" in r]
    sizes = sorted({r["n"] for r in ok})
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 3.2 * len(sizes)), squeeze=False)
    for row, n in enumerate(sizes):
        rows = [r for r in ok if r["n"] == n]
        labels = [f"{r['loss']}\n{r['backend']}" for r in rows]
        for col, (key, unit) in enumerate((("time_s", "s"), ("peak_mib", "MiB"))):
            ax = axes[row][col]
            ax.bar(range(len(rows)), [r[key] for r in rows])
            ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
            ax.set_yscale("log")
            ax.set_title(f"n={n}: forward+backward {'time' if col == 0 else 'peak extra memory'} ({unit})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _table(results: list[dict]) -> str:
    by_key = {(r["loss"], r["backend"], r["n"]): r for r in results}
    lines = ["| loss | n | backend | wall (s) | CPU (s) | peak extra mem (MiB) | wall / PML | CPU / PML | mem / PML "
             "| wall / ref | CPU / ref | mem / ref |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['loss']} | {r['n']} | {r['backend']} | {r.get('error') or r['skipped']} |"
                         + " |" * 8)
            continue
        cells = []
        for base in ("pml", "reference"):
            other = by_key.get((r["loss"], base, r["n"]))
            ok = other is not None and "time_s" in other
            cells += [f"{r['time_s'] / other['time_s']:.2f}" if ok else "-",
                      f"{r['cpu_s'] / max(other['cpu_s'], 1e-9):.2f}" if ok else "-",
                      f"{r['peak_mib'] / max(other['peak_mib'], 1e-9):.3f}" if ok else "-"]
        lines.append(f"| {r['loss']} | {r['n']} | {r['backend']} | {r['time_s']:.3f} | {r['cpu_s']:.2f} | "
                     f"{r['peak_mib']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs=3, metavar=("LOSS", "BACKEND", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--losses", nargs="+", default=["contrastive", "multi_similarity", "supcon"], choices=LOSSES)
    parser.add_argument("--backends", nargs="+", default=["tiled", "reference", "pml"], choices=BACKENDS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 4096, 8192])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="embedding dtype (default: bfloat16 with --n, float32 otherwise)")
    parser.add_argument("--n", type=int, help="compare with the GEMM floor and PML at this one size (JSON report)")
    parser.add_argument("--verify-n", type=int, default=2048, help="rows of the kernel check before --n timings")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    parser.add_argument("--max-dense-n", type=int, default=16384, help="largest n for backends that build n x n")
    parser.add_argument("--case-timeout", type=int, default=3600)
    parser.add_argument("--json", type=Path, help="also write all results here")
    parser.add_argument("--plot", type=Path, help="also draw the results into this PNG")
    parser.add_argument("--verify", action="store_true",
                        help="only compare --backends with the reference on --device/--dtype (exit 1 on mismatch)")
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.n else "float32"
    if args.n:
        if "--losses" not in sys.argv:
            args.losses = ["contrastive", "multi_similarity", "supcon", "triplet", "triplet_all"]
        report = floor_report(args)
        print(json.dumps(report) if "skipped" in report else _floor_table(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return 0 if "skipped" in report or report["verify"]["ok"] else 1
    if args.verify:
        return 1 if verify(args.device, args.dtype, args.backends) else 0
    if args.case:
        name, backend, n = args.case
        print(json.dumps(run_case(name, backend, int(n), args.d, args.device, args.dtype, args.reps, args.threads)))
        return 0
    results = []
    for n in args.sizes:
        for name in args.losses:
            for backend in args.backends:
                reason = _skip_reason(name, backend, n, args)
                result = {"loss": name, "backend": backend, "n": n, "skipped": reason} if reason \
                    else _spawn(args, name, backend, n)
                results.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    print(f"device={args.device} dtype={args.dtype} d={args.d} reps={args.reps} "
          f"threads={args.threads or 'default'} cpus={os.cpu_count()}")
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
