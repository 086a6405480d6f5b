"""A killed DDP rank: its peer ends with one line naming the lost rank and its host, not gloo tracebacks."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import fault_injection
import pytest
from test_dist_runs import child_env, free_port

from unidml.runtime import peers

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_killed_rank_is_named_by_its_peer_in_one_line(tmp_path):
    """Two gloo processes; rank 1 SIGKILLs itself at its first step after the epoch-0 checkpoint
    (tests/fault_injection.py). Rank 0's next collective fails: one line, exit code 1, no traceback."""
    port = str(free_port())
    tiny = [f"data.root={tmp_path / 'data'}", "data.synthetic.classes=8", "data.synthetic.per_class=8",
            "data.image_size=32", "data.resize_size=32", "data.num_workers=0", "data.backend=torchvision",
            "train.batch_size=16", "train.warmup_iters=2", "train.epochs=2", "engine.backend=ddp",
            "engine.device=cpu", "engine.precision=fp32"]
    argv = [sys.executable, fault_injection.SCRIPT, "train", "--config", str(REPO / "configs" / "quickstart.yaml"),
            "--out", str(tmp_path / "run"), *tiny]
    ranks = [subprocess.Popen(argv, env=child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r),
                                                  WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                  **{fault_injection.KILL: f"1:0:{tmp_path / 'killed'}"}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=300) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert ranks[1].returncode == -9 and (tmp_path / "killed").exists()
    err = outputs[0][1]
    lines = [line for line in err.splitlines() if line.startswith("unidml: error: ")]
    assert ranks[0].returncode == 1 and "Traceback" not in err, err
    assert lines == [f"unidml: error: lost contact with rank 1 on host {socket.gethostname()} during all_reduce"]


def _failing(message: str) -> RuntimeError:
    """A backend error raised from inside a function named like a collective."""
    def barrier() -> None:
        raise RuntimeError(message)
    try:
        barrier()
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize("message, hosts, expected", [
    ("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.7]:41520",
     {0: "10.0.0.5", 1: "10.0.0.5", 2: "10.0.0.7", 3: "10.0.0.9"},
     "lost contact with rank 2 on host 10.0.0.7 during a collective"),
    ("Connection reset by peer [10.0.0.5]:1234", {0: "10.0.0.5", 1: "10.0.0.5", 2: "10.0.0.5"},
     "lost contact with a peer rank during a collective: one of ranks 1, 2 on host 10.0.0.5"),
    ("Connection closed by peer", {0: "a", 1: "b", 2: "c"},
     "lost contact with a peer rank during a collective: one of ranks 1, 2 on hosts b, c"),
    ("CUDA out of memory", {0: "a", 1: "b"}, None),
])
def test_which_rank_is_named_when_more_than_two_run(monkeypatch, message, hosts, expected):
    """With more than two ranks the peer address names the host; a host with several ranks is a list."""
    monkeypatch.setattr(peers, "_peers", hosts)
    monkeypatch.setattr(peers, "_self", {"rank": 0})
    assert peers.lost_peer(_failing(message)) == expected
