"""Crash safety of checkpoint writes, the run-directory lock and guard, and one-line load refusals.

Kills land at every named point of `checkpoint.save_epoch` (tests/fault_injection.py) in a
forked child; afterwards `last.pt` must be a complete checkpoint (the old or the new one).
"""
from __future__ import annotations

import io
import os
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_injection import inject_checkpoint_fault

from unidml.engine import checkpoint
from unidml.engine.run_dir import RunDirLocked, claim_run_dir, existing_run, run_lock
from unidml.errors import UserError


def _forked(body) -> int:
    """Run `body()` in a forked child (no interpreter start-up) and return its wait status."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            body()
        except BaseException:
            code = 1
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def _write_three(directory: Path) -> None:
    for step in (1, 2, 3):
        checkpoint.save_epoch({"step": step, "w": torch.full((64,), float(step))}, directory, is_best=step != 2)


@pytest.fixture
def fault(monkeypatch):
    """Observe this test's checkpoint writes with `N:STAGE:ACTION` (writes counted from this call)."""
    def arm(spec: str) -> None:
        inject_checkpoint_fault(spec, monkeypatch.setattr)
    return arm


def _generations(directory: Path) -> tuple[int, int]:
    """(last.pt's step, prev.pt's step), after checking they are two files, not two names of one."""
    last, prev = directory / "last.pt", directory / "prev.pt"
    assert last.stat().st_ino != prev.stat().st_ino and last.read_bytes() != prev.read_bytes()
    return checkpoint.load(last)["step"], checkpoint.load(prev)["step"]


@pytest.mark.parametrize("stage", checkpoint.WRITE_STAGES)
def test_a_kill_anywhere_in_a_checkpoint_write_leaves_a_complete_last_pt(tmp_path, stage, fault):
    directory = tmp_path / "checkpoints"
    fault(f"3:{stage}:kill")
    status = _forked(lambda: _write_three(directory))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    placed = stage in ("last_renamed", "done")  # the new one only once it was renamed into place
    last, prev = _generations(directory)
    assert (last, prev) == ((3, 2 if stage == "done" else 1) if placed else (2, 1))
    best = checkpoint.load(directory / "best.pt")["step"]
    assert best == (1 if stage in ("writing", "written") else 3)
    stray = checkpoint.remove_temp_files(directory)
    temps = {"writing": 1, "written": 1, "best_linked": 1, "prev_linked": 2, "last_renamed": 1}  # new file, prev's name
    assert len(stray) == temps.get(stage, 0)
    assert sorted(p.name for p in directory.iterdir()) == ["best.pt", "last.pt", "prev.pt"]
    # the next write works from any of these states (links of one file included) and leaves no temp file
    checkpoint.save_epoch({"step": 4}, directory, is_best=True)
    assert _generations(directory) == (4, last) and checkpoint.load(directory / "best.pt")["step"] == 4
    assert sorted(p.name for p in directory.iterdir()) == ["best.pt", "last.pt", "prev.pt"]


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, fault):
    directory = tmp_path / "checkpoints"
    fault("3:writing:enospc")
    with pytest.raises(checkpoint.CheckpointError) as info:
        _write_three(directory)
    message = str(info.value)
    assert message.startswith(f"{directory / 'last.pt'}: disk full") and "intact" in message and "\n" not in message
    assert [checkpoint.load(directory / n)["step"] for n in ("last.pt", "prev.pt", "best.pt")] == [2, 1, 1]
    assert sorted(p.name for p in directory.iterdir()) == ["best.pt", "last.pt", "prev.pt"]  # no temp file left


@pytest.mark.parametrize("stage", checkpoint.WRITE_STAGES[:-1])
def test_a_failure_at_any_stage_keeps_two_distinct_generations(tmp_path, stage, fault):
    """ENOSPC at every point of the sequence: last.pt and prev.pt stay two different files (never two
    names of one), and the message says "intact" only while the new file is not yet in place."""
    directory = tmp_path / "checkpoints"
    fault(f"3:{stage}:enospc")
    with pytest.raises(checkpoint.CheckpointError) as info:
        _write_three(directory)
    message = str(info.value)
    placed = stage == "last_renamed"
    assert _generations(directory) == ((3, 1) if placed else (2, 1)) and "\n" not in message
    assert ("intact" in message) != placed and ("new checkpoint is in place" in message) == placed
    assert sorted(p.name for p in directory.iterdir()) == ["best.pt", "last.pt", "prev.pt"]  # no temp file left
    checkpoint.save_epoch({"step": 4}, directory, is_best=False)
    assert _generations(directory) == (4, 3 if placed else 2)


def test_metrics_json_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    from unidml.engine import run_record

    target = tmp_path / "metrics.json"
    run_record.write_text_atomic('{"old": 1}\n', target)

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match=r"metrics.json: cannot write \(disk full\); the previous version is intact"):
        run_record.write_text_atomic('{"new": 2}\n', target)
    monkeypatch.undo()
    assert target.read_text() == '{"old": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path):
    run_dir = tmp_path / "run"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the first writer: holds the lock until killed
        with run_lock(run_dir):
            os.write(ready_w, b"x")
            time.sleep(60)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        with pytest.raises(RunDirLocked) as info:
            with claim_run_dir(run_dir, "auto", is_main=True):
                pass
        assert str(info.value) == (f"{run_dir}: in use by another run (PID {pid}); wait for it to finish "
                                   f"or pass --out NEW_DIR")
    finally:
        os.kill(pid, signal.SIGKILL)  # the kernel drops the flock with the process
        os.waitpid(pid, 0)
    with claim_run_dir(run_dir, "never", is_main=True):
        assert existing_run(run_dir) == []


@pytest.mark.parametrize("marker", ["checkpoints/last.pt", "checkpoints/prev.pt", "checkpoints/best.pt",
                                    "metrics.json", "checkpoints/deepspeed/epoch0001/mp_rank_00_model_states.pt"])
def test_any_checkpoint_or_metrics_file_marks_a_run(tmp_path, marker):
    run_dir = tmp_path / "run"
    (run_dir / marker).parent.mkdir(parents=True)
    (run_dir / marker).write_bytes(b"x")
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / ".last.pt.abc.tmp").write_bytes(b"partial")
    with pytest.raises(UserError) as info:
        with claim_run_dir(run_dir, "never", is_main=True):
            pass
    assert "already holds a run" in str(info.value) and marker in str(info.value) and "\n" not in str(info.value)
    assert not (run_dir / "checkpoints" / ".last.pt.abc.tmp").exists()  # temp files are cleaned first
    with claim_run_dir(run_dir, "auto", is_main=True):  # resuming is allowed
        pass


class _Pickled:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def _save(path: Path, state) -> Path:
    torch.save(state, path)
    return path


def _with_member(archive: Path, suffix: str, data: bytes) -> bytes:
    """The zip archive `archive` with the member ending in `suffix` replaced by `data`."""
    out = io.BytesIO()
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            target.writestr(name, data if name.endswith(suffix) else source.read(name))
    return out.getvalue()


def test_load_refusals_are_one_line_and_never_invite_an_unsafe_load(tmp_path):
    """Each refusal names its real cause: a file that is no zip at all (random bytes) is not called a
    pickle payload, a cut-off zip is called truncated, a refused import is named."""
    good = tmp_path / "run.ckpt"  # any suffix is a checkpoint
    checkpoint.save_atomic({"step": 4}, good)
    assert checkpoint.load_source(good)[0]["step"] == 4 and checkpoint.load_source(tmp_path / "none") is None
    cases = {
        _save(tmp_path / "evil.pt", {"format": checkpoint.FORMAT, "x": _Pickled()}): "refused: the file contains",
        _save(tmp_path / "foreign.pt", {"weights": torch.ones(1)}): "not a unidml checkpoint",
        tmp_path: "is a directory",
        tmp_path / "missing.pt": "checkpoint not found",
    }
    cases[_save(tmp_path / "evil_name.pt", {"x": _Pickled()})] = "pickled Python objects (GLOBAL posix.system)"
    for name, data, cause in (
            ("truncated.pt", good.read_bytes()[:100], "truncated: the zip archive has no end"),
            ("half.pt", good.read_bytes()[:good.stat().st_size // 2], "truncated: the zip archive has no end"),
            ("random.pt", np.random.default_rng(0).bytes(4096), "not a PyTorch checkpoint: no zip archive header"),
            ("empty.pt", b"", "empty file (0 bytes)"),
            ("badpickle.pt", _with_member(good, "data.pkl", b"\x80\x02o\x00garbage"),
             "corrupt checkpoint: its pickled data is malformed (Unsupported operand 111)")):
        (tmp_path / name).write_bytes(data)
        cases[tmp_path / name] = cause
    for path, fragment in cases.items():
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.load(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message
        assert "weights_only" not in message


def test_a_state_that_does_not_fit_names_the_first_difference(tmp_path):
    small, large = torch.nn.Linear(4, 8), torch.nn.Linear(4, 16)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_module_state(large, small.state_dict(), "ck.pt", "loss", "a different class count or loss")
    assert str(info.value) == ("ck.pt: the checkpoint's loss does not fit this loss: 'weight' is 8x4 in the checkpoint "
                               "but 16x4 here; a different class count or loss")
    with pytest.raises(checkpoint.CheckpointError, match="missing 'bias'"):
        checkpoint.load_module_state(small, {"weight": small.weight.detach()}, "ck.pt", "model")
    with pytest.raises(checkpoint.CheckpointError, match="carries no run config"):
        checkpoint.stored_config_text({"model": {}}, "ck.pt")


def test_a_non_finite_parameter_or_buffer_is_found():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert checkpoint.first_non_finite(net) is None
    net[1].running_var[0] = float("inf")
    assert checkpoint.first_non_finite(net) == "1.running_var"
