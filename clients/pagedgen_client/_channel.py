"""Channel construction, per-call metadata and the retry policy, shared by
the sync and asyncio clients."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Union

import grpc

Pem = Union[bytes, str, "os.PathLike[str]", None]   # PEM bytes, or a path to a PEM file
Metadata = Sequence[tuple[str, str]]

DEFAULT_TARGET = "127.0.0.1:50051"
UNIX_SCHEME = "unix:"
UNIX_AUTHORITY = "localhost"        # the authority (and TLS name) of a unix: channel, unless options set one
_AUTHORITY_OPTIONS = ("grpc.default_authority", "grpc.ssl_target_name_override")


def check_target(target: str) -> str:
    """``target`` if gRPC can dial it, else ValueError saying what to write.

    Accepted: ``host:port``, a gRPC name URI (``dns:///name:port``...), and a
    Unix domain socket as ``unix:PATH`` (relative to the working directory, or
    absolute) or ``unix:///ABSOLUTE_PATH``. Over a socket the channel's
    authority is ``localhost`` (``ChannelConfig`` sets it), which is also
    the name TLS verifies; the ``grpc.default_authority`` option overrides it.
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError("target must be host:port or unix:PATH, got an empty string")
    if target.startswith(UNIX_SCHEME):
        path = target[len(UNIX_SCHEME):]
        if path.startswith("//") and not path.startswith("///"):
            raise ValueError(f"{target!r} names a host, which a Unix socket has not: "
                             f"write unix:PATH or unix:///ABSOLUTE_PATH")
        if not path.lstrip("/"):
            raise ValueError(f"{target!r} has no socket path: write unix:PATH or unix:///ABSOLUTE_PATH")
    return target


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE before the first chunk, with exponential backoff.

    ``max_attempts`` counts the first try; 1 disables retries.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1                # seconds before the 2nd attempt
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def backoffs(self) -> Iterator[float]:
        """The delay before each retry (max_attempts - 1 of them)."""
        delay = self.initial_backoff
        for _ in range(self.max_attempts - 1):
            yield min(delay, self.max_backoff)
            delay *= self.multiplier


def is_retryable(error: grpc.RpcError) -> bool:
    return getattr(error, "code", lambda: None)() == grpc.StatusCode.UNAVAILABLE


class Deadline:
    """The time left of a call's overall timeout, across its retries."""

    def __init__(self, timeout: float | None):
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def allows(self, delay: float) -> bool:
        left = self.remaining()
        return left is None or left > delay


def _read_pem(value: Pem) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    with open(value, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach the server: address, TLS, default metadata, gRPC options."""

    target: str = DEFAULT_TARGET                # host:port, unix:PATH or a gRPC URI (see check_target)
    secure: bool = False                        # TLS with the system roots when no root given
    root_certificates: Pem = None               # CA bundle that signed the server's certificate
    private_key: Pem = None                     # client key, for mutual TLS
    certificate_chain: Pem = None               # client certificate, for mutual TLS
    api_key: str | None = None                  # sent as "authorization: Bearer KEY"
    metadata: Metadata = ()                     # sent with every call
    options: Sequence[tuple[str, object]] = ()  # grpc channel arguments

    def __post_init__(self) -> None:
        check_target(self.target)

    @property
    def uses_tls(self) -> bool:
        return self.secure or any(x is not None for x in (self.root_certificates, self.private_key,
                                                          self.certificate_chain))

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.root_certificates),
            private_key=_read_pem(self.private_key),
            certificate_chain=_read_pem(self.certificate_chain),
        )

    def open_channel(self, grpc_module):
        """A channel to ``target`` from ``grpc`` (sync) or ``grpc.aio`` (async)."""
        credentials = self.credentials()
        options = list(self.options)
        if self.target.startswith(UNIX_SCHEME) and not any(key in _AUTHORITY_OPTIONS for key, _ in options):
            options.append(("grpc.default_authority", UNIX_AUTHORITY))    # gRPC's default: the escaped path
        if credentials is None:
            return grpc_module.insecure_channel(self.target, options=options)
        return grpc_module.secure_channel(self.target, credentials, options=options)

    def call_metadata(self, extra: Metadata | None) -> tuple[tuple[str, str], ...]:
        """Default metadata, the API key, then the call's own metadata."""
        items = list(self.metadata)
        if self.api_key:
            items.append(("authorization", f"Bearer {self.api_key}"))
        items.extend(extra or ())
        return tuple(items)
