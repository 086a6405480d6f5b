"""Who runs which task of a study: leases in a table of the study's database.

Several workers (processes on one machine, or jobs on several nodes) share one study database. A
task (`trial3` of a loss, or the retraining `seed1`) is run by whoever holds its lease. Taking a
lease is one SQL statement that only one worker can win: an INSERT of the task's row (the primary
key refuses a second one), or, for a task whose holder died, an UPDATE conditioned on the attempt
number it read. A holder refreshes its row's heartbeat from a background thread; a lease is stale
when its holder is a process on this host that is gone, or its heartbeat is older than `stale_after`.
Stale leases are taken over, and the task resumes from its run directory's checkpoint.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

TABLE = "unidml_study_tasks"


@dataclass(frozen=True)
class Lease:
    """One task row: its holder, attempt number, last heartbeat (unix seconds) and whether it is done."""

    study: str
    task: str
    owner: str
    attempt: int
    heartbeat: float
    done: bool


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" where unknown: with the PID it
    identifies a process, so a reused PID is not mistaken for the lease's holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _this_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}:{uuid.uuid4().hex[:8]}"


def _process_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return not start or _start_time(pid) in ("", start)


class TaskLeases:
    """The lease table of one database (created on first use; any SQLAlchemy engine)."""

    def __init__(self, engine: sa.engine.Engine, stale_after: float = 600.0, heartbeat_every: float = 30.0) -> None:
        self.engine, self.stale_after, self.heartbeat_every = engine, stale_after, heartbeat_every
        self.owner = _this_owner()
        meta = sa.MetaData()
        self.table = sa.Table(
            TABLE, meta,
            sa.Column("study", sa.String(512), primary_key=True),
            sa.Column("task", sa.String(64), primary_key=True),
            sa.Column("owner", sa.String(256), nullable=False),
            sa.Column("attempt", sa.Integer, nullable=False),
            sa.Column("heartbeat", sa.Float, nullable=False),
            sa.Column("done", sa.Boolean, nullable=False))
        meta.create_all(engine, checkfirst=True)

    def all(self, study: str) -> dict[str, Lease]:
        """Every task row of `study`, by task name."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.table).where(self.table.c.study == study)).mappings().all()
        return {row["task"]: Lease(**row) for row in rows}

    def is_stale(self, lease: Lease, now: float | None = None) -> bool:
        """An unfinished lease whose holder is gone: a dead process on this host, or silent for `stale_after` s."""
        if lease.done:
            return False
        host, pid, start, _ = (lease.owner.split(":") + ["", "", "", ""])[:4]
        if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid), start):
            return True
        return (time.time() if now is None else now) - lease.heartbeat > self.stale_after

    def claim(self, study: str, task: str) -> bool:
        """Take the lease of `task` if it is free (no row) or stale; True when this worker now holds it."""
        table = self.table
        try:
            with self.engine.begin() as conn:
                conn.execute(table.insert().values(study=study, task=task, owner=self.owner, attempt=0,
                                                   heartbeat=time.time(), done=False))
            return True
        except IntegrityError:
            pass
        lease = self.all(study).get(task)
        if lease is None or not self.is_stale(lease):
            return False
        with self.engine.begin() as conn:
            won = conn.execute(table.update().where(
                table.c.study == study, table.c.task == task, table.c.attempt == lease.attempt,
                table.c.done.is_(False)).values(owner=self.owner, attempt=lease.attempt + 1, heartbeat=time.time()))
        return won.rowcount == 1

    def _touch(self, study: str, task: str, **values) -> None:
        table = self.table
        with self.engine.begin() as conn:
            conn.execute(table.update().where(table.c.study == study, table.c.task == task, table.c.owner == self.owner)
                         .values(heartbeat=time.time(), **values))

    def finish(self, study: str, task: str) -> None:
        """Mark a held task done (it is never run again)."""
        self._touch(study, task, done=True)

    @contextmanager
    def holding(self, study: str, task: str) -> Iterator[None]:
        """Refresh the lease's heartbeat every `heartbeat_every` seconds while the body runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_every):
                try:
                    self._touch(study, task)
                except sa.exc.OperationalError:  # database busy: the next beat retries
                    continue

        thread = threading.Thread(target=beat, name=f"lease-{task}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
