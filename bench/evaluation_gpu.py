"""Exact evaluation on one GPU, 60k x 512 self-retrieval: faiss-gpu flat index vs torch.mm + top-k.

Data: bench/evaluation.py's clustered unit embeddings (6,000 classes of varying size). Both methods
find each query's k nearest (k = largest class size, the query excluded) and score Recall@1, MAP@R
and R-Precision with unidml's metric code; the metrics of the two are compared (float32 near-ties
may order differently, so they are reported with their largest difference, not assumed equal).
Without faiss-gpu its column says why and torch is still timed. Part (d) of bench/gpu_check.sh.

    python bench/evaluation_gpu.py [--quick] [--out DIR] [--n 60000] [--dim 512]
"""
from __future__ import annotations

import argparse
import time

from gpu_part import ROOT, missing, part_args, run_part

METRIC_NAMES = ("recall@1", "map@r", "r_precision")
AGREE_POINTS = 0.05  # largest metric difference (percentage points) float32 near-ties may explain


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=6000)


def metrics_of(ids, labels) -> dict[str, float]:
    """Percent Recall@1 / MAP@R / R-Precision of neighbour ids (n, k), self excluded."""
    import importlib.util

    import numpy as np

    # unidml/evaluation/metrics.py alone: the package's __init__ imports faiss, which this part must
    # not need (it still times torch where faiss is absent).
    spec = importlib.util.spec_from_file_location("unidml_metrics", ROOT / "unidml" / "evaluation" / "metrics.py")
    metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metrics)
    MetricAccumulator, relevant_counts = metrics.MetricAccumulator, metrics.relevant_counts

    acc = MetricAccumulator(ks=(1,), metrics=("recall", "map_at_r", "r_precision"))
    acc.add(labels[ids] == labels[:, None], relevant_counts(labels, labels, self_retrieval=True))
    out = acc.result()
    return {name: round(float(out[name]), 4) for name in METRIC_NAMES if np.isfinite(out[name])}


def torch_topk(x, k: int, block: int = 4096):
    """Neighbour ids (n, k) from float32 torch.mm blocks with the query itself masked."""
    import torch

    ids = torch.empty(len(x), k, dtype=torch.int64, device=x.device)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for start in range(0, len(x), block):
            scores = x[start:start + block] @ x.T
            rows = torch.arange(len(scores), device=x.device)
            scores[rows, rows + start] = float("-inf")
            ids[start:start + block] = scores.topk(k, dim=1).indices
    finally:
        torch.set_float32_matmul_precision(saved)
    return ids


def faiss_topk(x, k: int):
    """Neighbour ids (n, k) from a faiss GpuIndexFlatIP (k + 1 searched, the query's own id dropped)."""
    import faiss
    import numpy as np

    index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), x.shape[1])
    index.add(x)
    _, found = index.search(x, k + 1)
    own = found == np.arange(len(x))[:, None]
    keep = ~own
    keep[~own.any(1), -1] = False  # rows where self was not returned: drop the last column instead
    return found[keep].reshape(len(x), k)


def timed(fn, *args):
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from evaluation import make_data

    n = 20000 if args.quick else args.n
    x, labels = make_data(n, args.dim, args.classes * n // args.n)
    k = int(np.bincount(labels).max()) - 1
    gx = torch.from_numpy(x).cuda()
    torch_topk(gx[:4096], k)  # warm-up: cuBLAS handles, allocator
    ids, torch_s = timed(torch_topk, gx, k)
    result = {"n": n, "dim": args.dim, "k": k,
              "torch": {"seconds": round(torch_s, 3), **metrics_of(ids.cpu().numpy(), labels)}}
    reason = missing("faiss")
    if reason is None:
        import faiss

        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            reason = "faiss has no GPU support here (faiss-cpu build)"
    if reason is not None:
        result["faiss_gpu"] = {"skipped": reason}
        return result
    faiss_topk(x[:4096], k)  # warm-up
    found, faiss_s = timed(faiss_topk, x, k)
    result["faiss_gpu"] = {"seconds": round(faiss_s, 3), **metrics_of(found, labels)}
    gap = max(abs(result["faiss_gpu"][m] - result["torch"][m]) for m in METRIC_NAMES)
    result.update(torch_over_faiss=round(torch_s / faiss_s, 3), metrics_max_diff_points=round(gap, 4),
                  metrics_agree=gap <= AGREE_POINTS)
    return result


if __name__ == "__main__":
    run_part("evaluation", part_args(__doc__, extra_args), measure)
