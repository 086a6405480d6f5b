"""Which host each rank runs on, and the one line a rank prints when it loses contact with another.

`record_peers()` all-gathers (rank, host name) once the process group is up. When a rank dies (killed,
out of memory), its peers fail inside their next collective with a backend error ("Connection closed
by peer" from gloo, an aborted communicator from NCCL); `lost_peer(exc)` turns that into `lost contact
with rank R on host H during all_reduce`. With two ranks the lost one is the other; with more, the
peer address in the backend's message narrows it to the ranks on that host, which the line lists.
"""
from __future__ import annotations

import re
import socket
from types import TracebackType

import torch.distributed as dist

from unidml.runtime.collectives import process_group_active

_peers: dict[int, str] = {}  # rank -> host name, for this process's group
_self: dict[str, int] = {}
LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
                "NCCL communicator was aborted", "remote process exited")
_ADDRESS = re.compile(r"\[([^\]]+)\]:\d+")


def record_peers() -> dict[int, str]:
    """All-gather every rank's host name (a collective: every rank calls it once after init)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (dist.get_rank(), socket.gethostname()))
    _peers.clear()
    _peers.update(dict(gathered))
    _self["rank"] = dist.get_rank()
    return dict(_peers)


def _collective(tb: TracebackType | None) -> str:
    """The torch.distributed call the error came out of (innermost), or DDP's gradient all-reduce."""
    names, files = [], []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    inner = [n for n, f in zip(names, files) if f.endswith("distributed_c10d.py") and not n.startswith("_")]
    if inner:
        return inner[-1]
    if "backward" in names or "_engine_run_backward" in names:
        return "the gradient all-reduce (backward)"
    return "a collective"


def _host_ranks(address: str) -> list[int]:
    """Ranks whose host name is or resolves to `address`."""
    ranks = []
    for rank, host in _peers.items():
        try:
            resolved = socket.gethostbyname(host)
        except OSError:
            resolved = ""
        if address in (host, resolved):
            ranks.append(rank)
    return ranks


def lost_peer(exc: BaseException) -> str | None:
    """The one line for a collective that failed because a peer rank is gone; None for any other error."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not _peers or not any(m in text for m in LOST_MARKERS):
        return None
    me = _self.get("rank", dist.get_rank() if process_group_active() else -1)
    during = _collective(exc.__traceback__)
    others = sorted(r for r in _peers if r != me)
    if len(others) == 1:
        return f"lost contact with rank {others[0]} on host {_peers[others[0]]} during {during}"
    match = _ADDRESS.search(text)
    candidates = [r for r in _host_ranks(match.group(1)) if r != me] if match else []
    if len(candidates) == 1:
        return f"lost contact with rank {candidates[0]} on host {_peers[candidates[0]]} during {during}"
    pool = candidates or others
    hosts = sorted({_peers[r] for r in pool})
    return (f"lost contact with a peer rank during {during}: one of ranks {', '.join(map(str, pool))} "
            f"on host{'s' if len(hosts) > 1 else ''} {', '.join(hosts)}")
