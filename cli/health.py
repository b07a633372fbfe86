"""``pagedgen health``: a probe of a running server's ``grpc.health.v1`` status.

It prints the status (``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN``...)
and exits 0 only for ``SERVING``, so it serves as a Kubernetes exec probe, a
Docker/Podman ``HEALTHCHECK`` or a script's wait step (``--wait``). Anything
else, an unreachable server included, exits 1 with the reason on stderr.
The health service stays open on a server with an API key; TLS and the key
are sent as ``pagedgen generate`` sends them.
"""

from __future__ import annotations

import argparse
import sys
import time

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1        # also: unreachable, or the service is unknown (Docker's "unhealthy")


def add_health_parser(sub) -> None:
    """Register ``health`` on the ``pagedgen`` subparsers (sets ``func``)."""
    p = sub.add_parser("health", help="exit 0 when a server's health service says SERVING",
                       description="Ask a running server's grpc.health.v1 service for its status, print it, and "
                                   "exit 0 only when it is SERVING (1 otherwise, or when the server is unreachable).")
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port or unix:PATH of the server (default: 127.0.0.1:50051)")
    p.add_argument("--service", default="",
                   help="the service to ask about (default: '', the whole server; or pagedgen.v1.Generate)")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of each health call in seconds (default: 5)")
    p.add_argument("--wait", type=float, default=0.0,
                   help="keep asking (every 0.5 s) for up to this many seconds until SERVING (default: 0, ask once)")
    p.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY' (health itself needs none)")
    p.add_argument("--tls-ca", default=None, help="use TLS, trusting this CA (PEM file)")
    p.add_argument("--tls-cert", default=None, help="with --tls-ca: this client's certificate (mutual TLS)")
    p.add_argument("--tls-key", default=None, help="with --tls-cert: its private key")
    p.add_argument("--quiet", action="store_true", help="print nothing; only the exit code tells")
    p.set_defaults(func=run_health)


def check_once(client, service: str, timeout: float) -> tuple[str, str | None]:
    """(status, error): the status name, or ("UNREACHABLE" / "ERROR", why) when no status came."""
    import grpc
    from pagedgen_client import PagedgenClientError

    try:
        return client.health(service, timeout=timeout), None
    except PagedgenClientError as e:
        if e.code == grpc.StatusCode.NOT_FOUND:          # the health service knows no such name
            return "SERVICE_UNKNOWN", None
        unreachable = e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return ("UNREACHABLE" if unreachable else "ERROR"), str(e)


def run_health(args: argparse.Namespace) -> int:
    """Ask (until ``--wait`` runs out), print the last status, return the exit code."""
    from pagedgen_client import Client

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        raise ValueError("--tls-cert needs --tls-ca (mutual TLS runs over TLS)")
    if args.timeout <= 0 or args.wait < 0:
        raise ValueError("--timeout must be > 0 and --wait >= 0")
    end = time.monotonic() + args.wait
    with Client(args.server, api_key=args.api_key, root_certificates=args.tls_ca,
                private_key=args.tls_key, certificate_chain=args.tls_cert) as client:
        while True:
            status, error = check_once(client, args.service, args.timeout)
            if status == "SERVING" or time.monotonic() + 0.5 > end:
                break
            time.sleep(0.5)
    if not args.quiet:
        sys.stdout.write(f"{status}\n")
        if error is not None:
            sys.stderr.write(f"pagedgen: {args.server}: {error}\n")
    return EXIT_SERVING if status == "SERVING" else EXIT_NOT_SERVING
