"""`RUN_DIR/train.log`: what a training said, kept with the run (main rank only).

Every record of the `unidml` loggers at INFO and above (data notes such as a derived split, fallbacks
to the core install, warnings, resume) plus the lines the trainer prints per evaluation, each with a
time stamp. Records logged before the run directory is claimed (while the dataset is read) are held in
memory and written once it is, so a refused run leaves another run's directory untouched. An error that
ends the run is written last: the one line the console shows for a user error (a full disk, a diverged
model), the traceback for anything else.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

LOGGER = "unidml"
MAX_HELD = 1000  # records held before the directory is claimed (more is a runaway loop, not a log)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Held(logging.Handler):
    """Holds records until a file is given, then writes them and every later one to it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        elif len(self.held) < MAX_HELD:
            self.held.append(record)


class RunLog:
    """The log of one run: create it when the run starts, `writing_to(run_dir)` once the directory is ours."""

    _current: _Held | None = None

    def __init__(self, enabled: bool) -> None:
        logger = logging.getLogger(LOGGER)
        if RunLog._current is not None:  # a run that failed before it was claimed: drop what it held
            logger.removeHandler(RunLog._current)
        self.handler = _Held() if enabled else None
        RunLog._current = self.handler
        if self.handler is not None:
            logger.addHandler(self.handler)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)

    @contextlib.contextmanager
    def writing_to(self, run_dir: Path) -> Iterator[None]:
        """Append the held records and every later one to `run_dir/train.log` for the duration of the block."""
        if self.handler is None:
            yield
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        self.handler.file = file
        for record in self.handler.held:
            file.emit(record)
        self.handler.held = []
        try:
            yield
        except Exception as exc:
            self._ended_by(exc)
            raise
        finally:
            logging.getLogger(LOGGER).removeHandler(self.handler)
            RunLog._current = None
            file.close()

    def _ended_by(self, exc: Exception) -> None:
        """Write the error that ends the run to the file only (the console reports it once, itself)."""
        from unidml.errors import UserError

        user = isinstance(exc, UserError)
        record = logging.makeLogRecord({"name": "unidml.train", "levelno": logging.ERROR, "levelname": "ERROR",
                                        "msg": f"error: {exc}" if user else f"stopped by {type(exc).__name__}: {exc}"})
        if not user:
            record.exc_info = (type(exc), exc, exc.__traceback__)
        self.handler.file.emit(record)

    def note(self, line: str) -> None:
        """A line the console shows through the progress bar (e.g. an epoch's metrics), for the file only."""
        if self.handler is not None and self.handler.file is not None:
            self.handler.file.emit(logging.makeLogRecord({"name": "unidml.train", "levelno": logging.INFO,
                                                          "levelname": "INFO", "msg": line}))
