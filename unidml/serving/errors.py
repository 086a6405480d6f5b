"""The one error a request can end in: an HTTP status and a message, answered as JSON."""
from __future__ import annotations


class RequestError(Exception):
    """A request the service refuses: `status` (4xx, or 503 when the queue is full) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
