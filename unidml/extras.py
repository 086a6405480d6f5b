"""Optional dependencies (the install extras `dali`, `deepspeed`, `triton`, `gpu`, `timm`, `export`, `study`,
`mlflow`, `wandb`):
whether each is installed, the one-line error when a chosen feature needs a missing one (`require`), and
the one line a run prints when an `auto` choice falls back because one is missing (`announce_fallback`).

The core install (`pip install -e .`) trains and evaluates everywhere: the torchvision loader stands in
for DALI, the tiled kernels for Triton, torch's DDP for DeepSpeed, faiss-cpu for faiss-gpu.
"""
from __future__ import annotations

import importlib.util
import logging

from unidml.errors import UserError

log = logging.getLogger("unidml")

# import name -> (package, what it provides, the extra that installs it)
OPTIONAL: dict[str, tuple[str, str, str]] = {
    "nvidia.dali": ("nvidia-dali", "the DALI data loader", "dali"),
    "deepspeed": ("deepspeed", "the DeepSpeed engine", "deepspeed"),
    "triton": ("triton", "the fused Triton kernels", "triton"),
    "optuna": ("optuna", "hyper-parameter tuning", "study"),
    "timm": ("timm", "timm backbones", "timm"),
    "onnx": ("onnx", "ONNX export", "export"),
    "onnxruntime": ("onnxruntime", "checking an ONNX export", "export"),
    "mlflow": ("mlflow-skinny", "the MLflow tracker", "mlflow"),
    "wandb": ("wandb", "the W&B tracker", "wandb"),
}
_announced: set[str] = set()


def installed(module: str) -> bool:
    """Whether `module` (dotted names allowed) can be imported, without importing it."""
    parts = module.split(".")
    try:
        return all(importlib.util.find_spec(".".join(parts[:i])) is not None for i in range(1, len(parts) + 1))
    except (ImportError, ValueError):  # a parent that is a plain module, or a broken install
        return False


def install_hint(module: str) -> str:
    """`pip install 'unidml[EXTRA]'` for an optional module."""
    return f"pip install 'unidml[{OPTIONAL[module][2]}]'"


def require(module: str, key: str) -> None:
    """UserError naming config key `key` when optional `module` is missing."""
    if not installed(module):
        package, what, _ = OPTIONAL[module]
        raise UserError(f"{key}: {what} needs {package}, which is not installed ({install_hint(module)})")


def announce_fallback(module: str, instead: str) -> None:
    """Say once per process that `auto` uses `instead` because optional `module` is missing."""
    if module not in _announced:
        _announced.add(module)
        package, what, _ = OPTIONAL[module]
        log.info("%s is not installed: using %s instead of %s (%s)", package, instead, what, install_hint(module))
