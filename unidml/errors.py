"""Errors a user can fix; the CLI prints them as one line instead of a traceback."""


class UserError(Exception):
    """Bad input named precisely: a config key, a data file, a checkpoint."""
