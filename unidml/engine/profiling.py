"""Observability helpers: torch.profiler traces for a few steps, and device memory scalars."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch

WAIT, WARMUP, ACTIVE = 1, 1, 3  # profiled steps: skip 1, warm up 1, record 3


@contextlib.contextmanager
def step_profiler(trace_dir: Path | None, device: torch.device) -> Iterator[Callable[[], None]]:
    """Yield a `step()` callback to call after every optimizer step. With `trace_dir`, steps
    WAIT+WARMUP+1 .. WAIT+WARMUP+ACTIVE are recorded (CPU, and CUDA kernels on GPU) and written as a
    Chrome/Perfetto trace JSON into `trace_dir`; without it the callback does nothing."""
    if trace_dir is None:
        yield lambda: None
        return
    trace_dir.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def write(prof: torch.profiler.profile) -> None:
        prof.export_chrome_trace(str(trace_dir / f"trace_step{prof.step_num}.json"))

    schedule = torch.profiler.schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write,
                                record_shapes=False, with_stack=False) as prof:
        yield prof.step


def device_memory_mib(device: torch.device) -> dict[str, float]:
    """Allocated and peak-allocated accelerator memory (MiB) since the last call; empty on CPU."""
    if device.type != "cuda":
        return {}
    out = {"gpu_mem_allocated_mib": torch.cuda.memory_allocated(device) / 2**20,
           "gpu_mem_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    torch.cuda.reset_peak_memory_stats(device)
    return out
