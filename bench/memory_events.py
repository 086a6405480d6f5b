"""Exact CPU memory figures for the benchmarks and the memory tests, from torch's own accounting (not RSS)."""
from __future__ import annotations

from typing import Any, Callable


def peak_cpu_bytes(run: Callable[[], Any]) -> int:
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


def saved_bytes(run: Callable[[], Any]) -> tuple[int, Any]:
    """(bytes of the tensors autograd saves for backward while `run()` builds its graph, what `run` returned)."""
    import torch

    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return total, out
