"""The one exception the client raises for a failed call."""

from __future__ import annotations

import grpc


class PagedgenClientError(Exception):
    """A call to the pagedgen server failed.

    ``code`` is the gRPC status code (``grpc.StatusCode``), ``message`` the
    server's details (for INVALID_ARGUMENT it names the offending field).
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "PagedgenClientError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")
