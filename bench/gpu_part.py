"""What every `bench/gpu_check.sh` part shares: its command line, the no-CUDA skip and its JSON file.

A part is `python bench/<part>.py [--quick] [--out DIR]`; it writes `DIR/<name>.json` (DIR defaults to
$OUT) the moment it finishes, and exits 0 when it measured or was skipped. Parts import only torch at
the top, so a missing optional library (faiss, DALI, DeepSpeed) becomes a skip reason, not a crash.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository runs uninstalled on the device machine (PYTHONPATH=.)
    sys.path.insert(0, str(ROOT))

NO_CUDA = "no CUDA device"


def part_args(doc: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """`--quick` (smaller sizes, fewer repetitions) and `--out DIR` (default $OUT), plus a part's own flags."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes for bench/gpu_check.sh --quick")
    parser.add_argument("--out", default=os.environ.get("OUT", ""), help="directory for the JSON (default: $OUT)")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def missing(module: str) -> str | None:
    """None when `module` imports, else a skip reason naming it."""
    try:
        __import__(module)
    except Exception as exc:  # an ImportError, or a broken install raising something else at import
        return f"{module} not importable ({type(exc).__name__}: {exc})"
    return None


def run_part(name: str, args: argparse.Namespace, measure: Callable[[argparse.Namespace], dict[str, Any]]) -> None:
    """Skip without CUDA, else measure; print the result as one JSON line and write OUT/<name>.json.

    A measurement that raises is recorded as `"failed"` with the error's one line (exit status 1), so
    the summary names what broke while the other parts still run.
    """
    import torch

    result: dict[str, Any] = {"part": name, "quick": args.quick}
    status = 0
    if not torch.cuda.is_available():
        result["skipped"] = NO_CUDA
    else:
        result.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
        try:
            result.update(measure(args))
        except Exception as exc:  # recorded, not hidden: the part's JSON says what failed
            traceback.print_exc()
            result["failed"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            status = 1
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"{name}.json").write_text(line + "\n")
    sys.exit(status)


def cuda_seconds(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Mean wall seconds of `fn()` over `reps` calls after `warmup` calls, CUDA-synchronised."""
    import time

    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps
