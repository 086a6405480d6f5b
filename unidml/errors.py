"""Errors a user can fix; the CLI prints them as one line instead of a traceback."""


class UserError(Exception):
    """Bad input named precisely: a config key, a data file, a checkpoint."""


class EvaluationError(UserError, ValueError):
    """Embeddings or a request that cannot give honest metrics (non-finite rows, K beyond the gallery)."""


class RunEnded(Exception):
    """Raised by a callback to end a training on purpose (a pruned trial): the trackers mark the run
    killed, not failed."""
