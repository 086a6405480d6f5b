"""Forward+backward time and memory of the rank losses (Smooth-AP, Recall@k surrogate): reference vs tiled.

Each (loss, backend, n) case runs in a fresh subprocess on n random d-dimensional fp32 embeddings, 4 per
class. Reported per case:
  peak extra   the most tensor bytes held at once during one forward+backward beyond those alive before
               it, counted exactly from torch's CPU allocator events (torch.profiler, profile_memory=True),
               as in bench/classifier.py;
  saved        the bytes autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks);
  n³ tensor    one fp32 n x n x n tensor, the size of each sigmoid tensor the reference materialises;
  time, CPU    wall and process CPU seconds of the best of `--reps` unprofiled passes after the profiled one
               (CPU seconds are steadier on a shared machine).
Ratios (CPU seconds, peak) are against the reference backend of the same loss and n, measured in the
same run; `|Δ loss|` is the tiled value's distance from the reference value (both fp32). A reference case whose expected
peak (about 4 n³ tensors) would not fit in 80 % of the memory available is not run.

  python bench/rank_losses.py                               # n = 256, 512, 1024; d = 128
  python bench/rank_losses.py --sizes 4096 --backends tiled --losses smooth_ap
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from memory_events import peak_cpu_bytes, saved_bytes

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("smooth_ap", "recall_at_k")
BACKENDS = ("reference", "tiled")
REFERENCE_CUBES = 4  # the reference's peak in fp32 n³ tensors (measured with this script, n = 128 to 1024: 4.0)


def _fits(backend: str, n: int) -> bool:
    if backend != "reference":
        return True
    with open("/proc/meminfo") as handle:
        free = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable"))
    return REFERENCE_CUBES * n ** 3 * 4 <= 0.8 * free


def run_case(loss_name: str, backend: str, n: int, d: int, reps: int) -> dict:
    """One case's figures (see the module docstring)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from unidml.losses import build_loss

    if not _fits(backend, n):
        raise SystemExit(f"not run: about {REFERENCE_CUBES} x n³ x 4 bytes would not fit in memory")
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(n, d, generator=gen)
    y = torch.arange(n // 4).repeat_interleave(4)
    loss = build_loss(loss_name, backend=backend)
    value = {}

    def forward():
        z = z0.clone().requires_grad_()
        value["loss"] = loss(z, y)
        return z

    def once():
        forward()
        value["loss"].backward()

    peak = peak_cpu_bytes(once)
    saved, _ = saved_bytes(forward)
    times = []
    for _ in range(reps):
        start, cpu = time.perf_counter(), time.process_time()
        once()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return {"loss": loss_name, "backend": backend, "n": n, "d": d, "threads": torch.get_num_threads(),
            "time_s": min(times)[0], "cpu_s": min(times)[1], "peak_mib": peak / 2 ** 20, "saved_mib": saved / 2 ** 20,
            "cube_mib": n ** 3 * 4 / 2 ** 20, "value": value["loss"].item()}


def _spawn(args: argparse.Namespace, loss_name: str, backend: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--case", loss_name, backend, str(n), "--d", str(args.d), "--reps", str(args.reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1][:120]
        return {"loss": loss_name, "backend": backend, "n": n, "error": reason, "cube_mib": n ** 3 * 4 / 2 ** 20}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """Markdown table with time and memory ratios against the reference of the same loss and n."""
    by_key = {(r["loss"], r["backend"], r["n"]): r for r in results}
    lines = ["| loss | n | backend | time (s) | CPU (s) | peak extra (MiB) | saved (MiB) | n³ tensor (MiB) | "
             "CPU / reference | peak / reference | \\|Δ loss\\| |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['loss']} | {r['n']} | {r['backend']} | {r['error']} | | | | "
                         f"{r['cube_mib']:,.1f} | | | |")
            continue
        base = by_key.get((r["loss"], "reference", r["n"]))
        ratios = ("", "", "")
        if base is not None and "error" not in base and base is not r:
            ratios = (f"{r['cpu_s'] / base['cpu_s']:.2f}", f"{r['peak_mib'] / base['peak_mib']:.4f}",
                      f"{abs(r['value'] - base['value']):.1e}")
        lines.append(f"| {r['loss']} | {r['n']} | {r['backend']} | {r['time_s']:.2f} | {r['cpu_s']:.2f} | "
                     f"{r['peak_mib']:,.1f} | "
                     f"{r['saved_mib']:,.2f} | {r['cube_mib']:,.1f} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--case-timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--case", nargs=3, metavar=("LOSS", "BACKEND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], int(args.case[2]), args.d, args.reps)))
        return
    results = [_spawn(args, loss_name, backend, n)
               for loss_name in args.losses for n in args.sizes for backend in args.backends]
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
