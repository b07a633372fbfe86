"""Serving gRPC on a Unix domain socket (``pagedgen serve --uds PATH``).

A sidecar and its neighbour share a directory (a Kubernetes ``emptyDir``)
and talk over ``unix:PATH`` instead of a TCP port: no port to allocate, no
address to expose, and the file's permissions decide who may connect.
Connecting needs write permission on the socket file, so its mode (0660 by
default: the server's user and group) is what lets a neighbour in; the
directory's own permissions guard the path from the first moment.
"""

from __future__ import annotations

import os
import socket
import stat

import grpc

MAX_PATH_BYTES = 107            # sun_path holds 108 bytes with the terminating NUL (Linux)


def check_path(path: str) -> None:
    """ValueError for a path no Unix socket address can hold (empty, too long)."""
    if not path.strip():
        raise ValueError("the Unix socket path must not be empty")
    if len(os.fsencode(os.path.abspath(path))) > MAX_PATH_BYTES:
        raise ValueError(f"Unix socket path {path!r} is longer than {MAX_PATH_BYTES} bytes as an absolute "
                         f"path (the limit of a socket address); pick a shorter one")


def check_free(path: str) -> None:
    """OSError when a live server holds ``path`` or it is no socket.

    gRPC unlinks whatever socket is at the path before it binds, which would
    silently take the address from a running server; a stale socket (left by
    a killed one: connecting is refused) is fine to replace.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"cannot listen on unix:{path}: the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return
        except OSError as e:
            raise OSError(f"cannot listen on unix:{path}: {e}") from None
    raise OSError(f"cannot listen on unix:{path}: another server is listening there")


def add_unix_port(server: grpc.aio.Server, path: str, mode: int,
                  credentials: grpc.ServerCredentials | None = None) -> str:
    """Bind ``unix:`` + the absolute ``path`` on a not yet started ``server``
    and give the socket ``mode``; returns that address.

    Call before ``server.start()``, so no call is served while the socket
    still has the umask's mode. gRPC removes the file when the server stops.
    """
    path = os.path.abspath(path)
    check_free(path)
    address = f"unix:{path}"
    try:
        bound = (server.add_insecure_port(address) if credentials is None
                 else server.add_secure_port(address, credentials))
    except RuntimeError as e:
        raise OSError(f"cannot bind {address} (does its directory exist, writable by this user?): {e}") from None
    if bound == 0:
        raise OSError(f"cannot bind {address} (does its directory exist, writable by this user?)")
    os.chmod(path, mode)
    return address
