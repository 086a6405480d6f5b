"""Task leases: one winner per task, takeover of a dead or silent holder, done tasks never handed out again."""
import subprocess
import sys
import time

import sqlalchemy as sa

from unidml.study.leases import TaskLeases


def engine(tmp_path):
    return sa.create_engine(f"sqlite:///{tmp_path / 'study.db'}", connect_args={"timeout": 60})


def test_one_worker_wins_a_task_and_a_done_task_stays_done(tmp_path):
    a, b = TaskLeases(engine(tmp_path)), TaskLeases(engine(tmp_path))
    assert a.claim("s", "trial0") and not b.claim("s", "trial0")
    assert b.claim("s", "trial1") and not a.claim("s", "trial1")
    a.finish("s", "trial0")
    rows = b.all("s")
    assert rows["trial0"].done and not rows["trial1"].done and rows["trial0"].owner == a.owner
    b.finish("s", "trial0")  # not its lease: no effect
    assert b.all("s")["trial0"].owner == a.owner
    assert not b.claim("s", "trial0")  # done: never again, whoever asks


def test_the_lease_of_a_dead_process_is_taken_over_once(tmp_path):
    child = subprocess.run([sys.executable, "-c", (
        "import sqlalchemy as sa; from unidml.study.leases import TaskLeases; "
        f"TaskLeases(sa.create_engine('sqlite:///{tmp_path / 'study.db'}')).claim('s', 'trial0')")], check=True)
    assert child.returncode == 0  # the holder has exited without finishing
    a, b = TaskLeases(engine(tmp_path)), TaskLeases(engine(tmp_path))
    assert a.is_stale(a.all("s")["trial0"])
    assert a.claim("s", "trial0")
    assert not b.claim("s", "trial0")  # a holds it now (alive, fresh heartbeat)
    lease = b.all("s")["trial0"]
    assert (lease.owner, lease.attempt) == (a.owner, 1)


def test_a_silent_holder_is_taken_over_after_stale_after_seconds(tmp_path):
    holder = TaskLeases(engine(tmp_path), stale_after=0.5)
    other = TaskLeases(engine(tmp_path), stale_after=0.5)
    other.owner = "elsewhere:1:5:abcd"  # a worker on another host: only its heartbeat tells it is alive
    assert other.claim("s", "seed0")
    assert not holder.claim("s", "seed0")
    time.sleep(0.6)
    assert holder.claim("s", "seed0")


def test_the_heartbeat_keeps_a_lease_fresh(tmp_path):
    holder = TaskLeases(engine(tmp_path), stale_after=0.6, heartbeat_every=0.1)
    holder.owner = "elsewhere:1:5:abcd"
    assert holder.claim("s", "trial0")
    watcher = TaskLeases(engine(tmp_path), stale_after=0.6)
    with holder.holding("s", "trial0"):
        time.sleep(1.0)
        assert not watcher.is_stale(watcher.all("s")["trial0"])
    time.sleep(0.7)
    assert watcher.is_stale(watcher.all("s")["trial0"])
