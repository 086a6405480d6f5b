"""Counting the host syncs a piece of code would make on a GPU, while it runs on the CPU.

On CUDA the host waits for the device whenever a value computed there is read on the host, or a
result's shape depends on its data. On the CPU nothing waits, so the counter looks at what the
code asks for instead, at the two levels torch exposes:

- dispatched ops (`TorchDispatchMode`): `_local_scalar_dense` (`.item()`, `int()`, `float()`,
  `bool()` of a tensor), data-dependent output shapes (`nonzero`, `masked_select`, `unique`,
  `bincount`, `repeat_interleave` without `output_size`, boolean-mask indexing, `equal`), and copies
  from a device to the CPU;
- Python calls (`TorchFunctionMode`): `Tensor.tolist()` / `.numpy()` / `.cpu()` (device to host)
  and `torch.tensor(..., device=...)` / `torch.as_tensor(..., device=...)` (a blocking host-to-device
  copy of host data).

Each event is attributed to the innermost stack frame outside torch: only events whose frame lies
in `unidml/` count (the Triton interpreter's own copies, for one, do not).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
PRODUCT = str(Path(__file__).resolve().parents[1] / "unidml")
TORCH = str(Path(torch.__file__).resolve().parent)

SCALAR_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
DATA_SHAPED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
               aten.unique_consecutive.default, aten.bincount.default, aten.argwhere.default}
MASK_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


def _to_host(func, args, kwargs) -> bool:
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


@dataclass
class SyncLog:
    """What was counted: (kind, op, 'file:line') per event whose innermost non-torch frame is under `roots`."""

    roots: tuple[str, ...] = (PRODUCT,)
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def record(self, kind: str, what: str) -> None:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if frame.filename.startswith(TORCH) or frame.filename == __file__:
                continue
            if frame.filename.startswith(self.roots):
                self.events.append((kind, what, f"{Path(frame.filename).name}:{frame.lineno}"))
            return

    def __len__(self) -> int:
        return len(self.events)

    def report(self) -> str:
        return "\n".join(f"  {kind:14s} {what:32s} {where}" for kind, what, where in self.events)


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, log: SyncLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SCALAR_READS:
            self.log.record("scalar read", str(func))
        elif func in DATA_SHAPED or (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            self.log.record("data shape", str(func))
        elif func in MASK_INDEXED and _bool_index(args):
            self.log.record("mask index", str(func))
        elif _to_host(func, args, kwargs):
            self.log.record("to host", str(func))
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    TO_HOST = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
    FROM_HOST = {torch.tensor, torch.as_tensor}

    def __init__(self, log: SyncLog) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.TO_HOST:
            self.log.record("to host", getattr(func, "__name__", str(func)))
        elif func in self.FROM_HOST and kwargs.get("device") is not None:
            self.log.record("from host", getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


class count_host_syncs:
    """Context manager yielding a `SyncLog` of the host syncs the code inside makes (see the module doc),
    counting those made from files under `roots` (default: the unidml package)."""

    def __init__(self, *roots: str) -> None:
        self.roots = roots or (PRODUCT,)

    def __enter__(self) -> SyncLog:
        self.log = SyncLog(self.roots)
        self.modes = [_FunctionCounter(self.log), _DispatchCounter(self.log)]
        for mode in self.modes:
            mode.__enter__()
        return self.log

    def __exit__(self, *exc) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)
