"""``pagedgen bench ...``: wires the benchmark tools into the CLI."""

from __future__ import annotations


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (offline engine, vs. Hugging Face)",
                              description="Measure pagedgen on your hardware.")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="{offline}")
    from bench import offline

    offline.add_parser(sub)
