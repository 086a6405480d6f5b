"""Crash safety of checkpoint writes, the run-directory lock and guard, and one-line load refusals.

Kills land at every named point of `checkpoint.save_epoch` (via `UNIDML_TEST_CHECKPOINT_FAULT`) in a
forked child; afterwards `last.pt` must be a complete checkpoint (the old or the new one).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from unidml.engine import checkpoint, faults
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
    """Arm `UNIDML_TEST_CHECKPOINT_FAULT` with a fresh write counter."""
    def arm(spec: str) -> None:
        monkeypatch.setenv(faults.CHECKPOINT_ENV_VAR, spec)
        monkeypatch.setitem(faults._writes, "count", 0)
    return arm


@pytest.mark.parametrize("stage", faults.CHECKPOINT_STAGES)
def test_a_kill_anywhere_in_a_checkpoint_write_leaves_a_complete_last_pt(tmp_path, stage, fault):
    directory = tmp_path / "checkpoints"
    fault(f"3:{stage}:kill")
    status = _forked(lambda: _write_three(directory))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    last = checkpoint.load(directory / "last.pt")["step"]
    assert last == (3 if stage == "done" else 2)  # the new one only once it was renamed into place
    assert checkpoint.load(directory / "prev.pt")["step"] == (2 if stage in ("prev_linked", "done") else 1)
    best = checkpoint.load(directory / "best.pt")["step"]
    assert best == (3 if stage in ("best_linked", "prev_linked", "done") else 1)
    stray = checkpoint.remove_temp_files(directory)
    assert len(stray) == (1 if stage in ("writing", "written", "best_linked", "prev_linked") else 0)
    assert sorted(p.name for p in directory.iterdir()) == ["best.pt", "last.pt", "prev.pt"]
    # the next write works from any of these states (links of one file included) and leaves no temp file
    checkpoint.save_epoch({"step": 4}, directory, is_best=True)
    assert [checkpoint.load(directory / n)["step"] for n in ("last.pt", "prev.pt", "best.pt")] == [4, last, 4]
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


def test_load_refusals_are_one_line_and_never_invite_an_unsafe_load(tmp_path):
    good = tmp_path / "run.ckpt"  # any suffix is a checkpoint
    checkpoint.save_atomic({"step": 4}, good)
    assert checkpoint.load_source(good)[0]["step"] == 4 and checkpoint.load_source(tmp_path / "none") is None
    cases = {
        _save(tmp_path / "evil.pt", {"format": checkpoint.FORMAT, "x": _Pickled()}): "refused: the file contains",
        _save(tmp_path / "foreign.pt", {"weights": torch.ones(1)}): "not a unidml checkpoint",
        tmp_path: "is a directory",
        tmp_path / "missing.pt": "checkpoint not found",
    }
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    cases[truncated] = "corrupt or truncated checkpoint"
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
        checkpoint.stored_config({"model": {}}, "ck.pt")


def test_a_non_finite_parameter_or_buffer_is_found():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert checkpoint.first_non_finite(net) is None
    net[1].running_var[0] = float("inf")
    assert checkpoint.first_non_finite(net) == "1.running_var"
