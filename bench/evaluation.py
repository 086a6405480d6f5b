"""Benchmark: retrieval evaluation time and peak memory, ours vs PML's AccuracyCalculator vs plain torch.

    python bench/evaluation.py [--n 60000] [--dim 512] [--classes 6000] [--large-gallery 200000]

Data: n random clustered embeddings (unit class centres plus Gaussian noise, uniform random labels,
so class sizes vary), self-retrieval; metrics Recall@1, MAP@R and R-Precision with k = largest class
size (what AccuracyCalculator's k="max_bin_count" does). Every measurement runs in a fresh process
that loads the same saved arrays, so its peak RSS (minus the RSS after loading) is the method's own
working memory. Methods:
  ours      unidml.evaluation.retrieval_metrics (FAISS IndexFlatIP proposes candidates, exact float64
            re-scoring orders them), one process; also prints the re-scoring share of its time
  ours x2   the same search sharded over 2 gloo ranks (1 thread each), exact merge
  pml       pytorch_metric_learning AccuracyCalculator(k="max_bin_count")
  torch     plain torch brute force: 2048-row blocks of X @ X.T, self masked, topk
`--large-gallery N` adds one run of ours with 20k queries against N references (memory_budget_mb=1024).
Timings on a shared machine are noisy: the table prints wall and CPU seconds of each run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_data(n: int, dim: int, classes: int, seed: int = 0, noise: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[labels] + rng.standard_normal((n, dim)).astype(np.float32) * (noise / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----------------------------------------------------------------------------- methods (child side)
class Timed:
    """Wraps a method: wall seconds spent in it, calls and query rows passed to it."""

    def __init__(self, cls, name: str) -> None:
        self.seconds, self.rows, self.inner = 0.0, 0, getattr(cls, name)
        timed = self

        def wrapper(index, queries, *rest, **kw):
            start = time.perf_counter()
            try:
                return timed.inner(index, queries, *rest, **kw)
            finally:
                timed.seconds += time.perf_counter() - start
                timed.rows += len(queries) if name == "_propose" else len(rest[0])

        setattr(cls, name, wrapper)


def run_ours(x, labels, args) -> dict:
    from unidml.evaluation import retrieval_metrics
    from unidml.evaluation.knn import ShardIndex

    # Re-scoring = exact float64 scores of each query's contenders and their sort (ShardIndex._finish);
    # proposals = FAISS searches, first pass and widened re-searches (ShardIndex._propose).
    rescoring, proposals = Timed(ShardIndex, "_finish"), Timed(ShardIndex, "_propose")
    start = time.perf_counter()
    out = retrieval_metrics(x, labels, ks=(1,), memory_budget_mb=args.budget)
    total = time.perf_counter() - start
    return {"recall@1": out["recall@1"], "map@r": out["map@r"], "r_precision": out["r_precision"],
            "rescoring_s": rescoring.seconds, "rescoring_share": rescoring.seconds / total,
            "faiss_s": proposals.seconds, "proposal_passes": proposals.rows / len(x)}


def run_pml(x, labels, args) -> dict:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                              k="max_bin_count")
    out = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
    return {"recall@1": 100 * out["precision_at_1"], "map@r": 100 * out["mean_average_precision_at_r"],
            "r_precision": 100 * out["r_precision"]}


def run_torch(x, labels, args) -> dict:
    import torch

    xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
    counts = torch.bincount(lt)
    relevant = counts[lt] - 1
    k = int(relevant.max())
    sums = torch.zeros(3, dtype=torch.float64)
    counted = 0
    for start in range(0, len(x), 2048):
        rows = torch.arange(start, min(start + 2048, len(x)))
        scores = xt[rows] @ xt.T
        scores[torch.arange(len(rows)), rows] = float("-inf")
        ids = scores.topk(k, dim=1).indices
        match = lt[ids] == lt[rows, None]
        r = relevant[rows]
        keep = r > 0
        match, r = match[keep], r[keep]
        ranks = torch.arange(1, k + 1)
        rel = match & (ranks[None, :] <= r[:, None])
        sums[0] += match[:, 0].double().sum()
        sums[1] += ((rel.cumsum(1) / ranks) * rel).sum(1).div(r).double().sum()
        sums[2] += (rel.sum(1) / r).double().sum()
        counted += int(keep.sum())
    s = (100 * sums / counted).tolist()
    return {"recall@1": s[0], "map@r": s[1], "r_precision": s[2]}


def _rank_worker(rank: int, world: int, port: int, data_dir: str, budget: float, queue) -> None:
    import faiss
    import torch
    import torch.distributed as dist

    from unidml.evaluation.distributed import Collectives
    from unidml.evaluation.retrieval import sharded_retrieval_metrics

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, labels = np.load(Path(data_dir) / "x.npy"), np.load(Path(data_dir) / "labels.npy")
    part = np.array_split(np.arange(len(x)), world)[rank]
    base = current_rss_mb()
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    out = sharded_retrieval_metrics(x, labels, np.arange(len(x)), x[part], labels[part], part, self_retrieval=True,
                                    ks=(1,), metrics=("recall", "map_at_r", "r_precision"), metric="cosine",
                                    memory_budget_mb=budget, device="cpu", comm=Collectives(True))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    dist.destroy_process_group()
    queue.put({"rank": rank, "wall": wall, "cpu": cpu, "mem": peak_rss_mb() - base,
               "metrics": {k: out[k] for k in ("recall@1", "map@r", "r_precision")}})


def run_two_ranks(data_dir: str, budget: float) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, data_dir, budget, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return {"wall": max(r["wall"] for r in results), "cpu": sum(r["cpu"] for r in results),
            "mem": max(r["mem"] for r in results), "metrics": results[0]["metrics"]}


def run_large(data_dir: str, budget: float) -> dict:
    from unidml.evaluation import retrieval_metrics

    x, y = np.load(Path(data_dir) / "x.npy"), np.load(Path(data_dir) / "labels.npy")
    queries, query_labels, gallery, labels = x[:20000], y[:20000], x[20000:], y[20000:]
    base = current_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    out = retrieval_metrics(queries, query_labels, gallery, labels, ks=(1, 10, 100), memory_budget_mb=budget)
    return {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu, "mem": peak_rss_mb() - base,
            "metrics": {k: v for k, v in out.items() if k != "num_queries"}}


def child(method: str, data_dir: str, budget: float) -> None:
    """One measurement in this fresh process (libraries imported before the clock starts); prints JSON."""
    sys.path.insert(0, str(ROOT))
    import faiss  # noqa: F401
    import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401
    import torch  # noqa: F401

    import unidml.evaluation  # noqa: F401
    if method == "ours x2":
        print(json.dumps(run_two_ranks(data_dir, budget)))
        return
    if method == "large":
        print(json.dumps(run_large(data_dir, budget)))
        return
    x, labels = np.load(Path(data_dir) / "x.npy"), np.load(Path(data_dir) / "labels.npy")
    fn = {"ours": run_ours, "pml": run_pml, "torch": run_torch}[method]
    base = current_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    metrics = fn(x, labels, argparse.Namespace(budget=budget))
    print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                      "mem": peak_rss_mb() - base, "metrics": metrics}))


# ----------------------------------------------------------------------------- driver (parent side)
def measure(method: str, data_dir: str, budget: float) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--data", data_dir, "--budget", str(budget)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=6000)
    parser.add_argument("--budget", type=float, default=1024.0, help="eval.memory_budget_mb")
    parser.add_argument("--methods", nargs="+", default=["ours", "pml", "torch", "ours x2"])
    parser.add_argument("--large-gallery", type=int, default=0, help="also run 20k queries x N references")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.budget)
        return
    with tempfile.TemporaryDirectory() as tmp:
        x, labels = make_data(args.n, args.dim, args.classes)
        np.save(Path(tmp) / "x.npy", x)
        np.save(Path(tmp) / "labels.npy", labels)
        sizes = np.bincount(labels)
        print(f"data: {args.n} x {args.dim}, {args.classes} classes (sizes {sizes.min()}..{sizes.max()}), "
              f"k = {sizes.max() - 1}, self-retrieval, memory_budget_mb={args.budget:g}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        results = {}
        for method in args.methods:
            results[method] = r = measure(method, tmp, args.budget)
            m = r["metrics"]
            print(f"{method:8s} wall {r['wall']:7.1f}s  cpu {r['cpu']:7.1f}s  peak +{r['mem']:7.0f} MB  "
                  f"R@1 {m['recall@1']:.4f}  MAP@R {m['map@r']:.4f}  RP {m['r_precision']:.4f}", flush=True)
        if "ours" in results:
            m = results["ours"]["metrics"]
            print(f"ours: exact re-scoring {m['rescoring_s']:.2f}s = {100 * m['rescoring_share']:.1f}% of its wall "
                  f"time; FAISS proposals {m['faiss_s']:.1f}s, {m['proposal_passes']:.4f} search passes per query")
            for method in [m for m in results if m != "ours"]:
                print(f"{method} / ours: wall x{results[method]['wall'] / results['ours']['wall']:.2f}, "
                      f"cpu x{results[method]['cpu'] / results['ours']['cpu']:.2f}")
        print(f"load average at the end {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")
        if args.large_gallery:
            g, gl = make_data(20000 + args.large_gallery, args.dim, args.large_gallery // 10, seed=1)
            np.save(Path(tmp) / "x.npy", g)
            np.save(Path(tmp) / "labels.npy", gl)
            r = measure("large", tmp, args.budget)
            full = 20000 * args.large_gallery * 4 / 2**20
            print(f"large: 20000 queries x {args.large_gallery} references, budget {args.budget:g} MB: wall "
                  f"{r['wall']:.1f}s cpu {r['cpu']:.1f}s peak +{r['mem']:.0f} MB (a full score matrix would be "
                  f"{full:.0f} MB) metrics {r['metrics']}")


if __name__ == "__main__":
    main()
