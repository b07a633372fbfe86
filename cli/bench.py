"""``pagedgen bench ...``: wires the benchmark tools into the CLI."""

from __future__ import annotations


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (a running server; the offline engine vs. Hugging Face)",
                              description="Measure pagedgen on your hardware.")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="{serve,offline,host-overhead}")
    from bench import host_overhead, offline, serve

    serve.add_parser(sub)
    offline.add_parser(sub)
    host_overhead.add_parser(sub)
