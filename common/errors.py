"""The engine's exceptions: one base, a per-request kind and a fatal kind.

The gRPC service maps these to status codes in one place
(``service/errors.py``); nothing else needs to know the mapping.
"""

from __future__ import annotations


class PagedgenError(Exception):
    """Base of every error pagedgen raises on purpose."""


class InvalidRequestError(PagedgenError, ValueError):
    """The request is malformed; the caller must change it (INVALID_ARGUMENT)."""


class DuplicateRequestError(InvalidRequestError):
    """A request with this id is still in flight; ids are the caller's, so the
    caller must pick another or wait (ALREADY_EXISTS, HTTP 409)."""


class QueueFullError(PagedgenError):
    """The waiting queue is at ``max_queue``; retry later (RESOURCE_EXHAUSTED)."""


class EngineShutdownError(PagedgenError):
    """The engine is draining or stopped and takes no new requests (UNAVAILABLE)."""


class RequestFailedError(PagedgenError):
    """A model step failed for this request; others keep running (INTERNAL)."""

    def __init__(self, request_id: str, message: str):
        super().__init__(f"request {request_id} failed: {message}")
        self.request_id = request_id
        self.message = message

    def __reduce__(self):                   # crosses the engine process's pipe
        return type(self), (self.request_id, self.message)


class EngineDeadError(PagedgenError):
    """The engine loop died; every request fails fast (INTERNAL, health NOT_SERVING)."""
