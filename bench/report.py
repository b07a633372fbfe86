"""Figures of a benchmark run: per-request records in, summaries, a terminal
table, JSON and a plot out. Shared by ``bench serve`` and ``bench offline``.

Definitions (as in vLLM's serving benchmark):

- TTFT: time from sending a request to its first token.
- TPOT: per request, (latency - TTFT) / (output tokens - 1); requests of one
  token have none.
- ITL: every gap between two consecutive streamed chunks that carry tokens.
- E2E latency: time from sending a request to its last token.
- Goodput: completed requests per second that met every SLO given.
- ITL added (``bench serve``, from the engine's timestamp on each message):
  per gap, the client's ITL minus the engine's time between the two steps:
  what the service and the network added to it. Free of clock offsets.
- Delivery lag: client receive time minus the engine's timestamp; only
  meaningful when client and server share a clock (the same host).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency"))
STATS = ("mean", "median", "p90", "p99")


@dataclass
class RequestRecord:
    """What one request did, as its client saw it (times in seconds)."""

    ok: bool
    start_s: float = 0.0                # when it was sent, from the start of the run
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0       # prompt tokens served from the prefix cache
    output_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    error: str | None = None            # the status code's name when it failed
    itls_added_s: list[float] = field(default_factory=list)     # per gap: client ITL - engine step gap
    lags_s: list[float] = field(default_factory=list)           # per message: received - engine time

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.latency_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def distribution(values_s: list[float]) -> dict:
    """mean, median, p90, p99, min and max in milliseconds (None when empty)."""
    if not values_s:
        return {"count": 0, **{k: None for k in (*STATS, "min", "max")}}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"count": int(ms.size), "mean": float(ms.mean()), "median": float(p50), "p90": float(p90),
            "p99": float(p99), "min": float(ms.min()), "max": float(ms.max())}


def summarize(records: list[RequestRecord], duration_s: float, *, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None) -> dict:
    """Every figure of one run (one load level) from its request records."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    n_in = sum(r.prompt_tokens for r in done)
    n_out = sum(r.output_tokens for r in done)
    n_cached = sum(r.cached_prompt_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    summary = {
        "completed": len(done), "failed": len(failed),
        "errors": dict(Counter(r.error or "UNKNOWN" for r in failed)),
        "duration_s": duration_s,
        "total_input_tokens": n_in, "total_output_tokens": n_out, "cached_prompt_tokens": n_cached,
        "prefix_cache_hit_rate": n_cached / n_in if n_in else 0.0,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(n_out),
        "total_token_throughput": per_s(n_in + n_out),
        "ttft_ms": distribution([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": distribution([t for t in (r.tpot_s for r in done) if t is not None]),
        "itl_ms": distribution([x for r in done for x in r.itls_s]),
        "e2el_ms": distribution([r.latency_s for r in done if r.latency_s is not None]),
    }
    added = [x for r in done for x in r.itls_added_s]
    if added:
        summary["itl_added_ms"] = distribution(added)
        summary["delivery_lag_ms"] = distribution([x for r in done for x in r.lags_s])
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = [r for r in done if _meets(r, slo_ttft_ms, slo_tpot_ms)]
        summary["goodput"] = {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms,
                              "good_requests": len(good), "request_goodput": per_s(len(good))}
    return summary


def _meets(r: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if slo_ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1000 > slo_ttft_ms):
        return False
    tpot = r.tpot_s
    return slo_tpot_ms is None or tpot is None or tpot * 1000 <= slo_tpot_ms


def records_json(records: list[RequestRecord]) -> list[dict]:
    return [{**asdict(r), "tpot_s": r.tpot_s} for r in records]


# -- terminal table -------------------------------------------------------------

def _rows(summaries: list[dict]) -> list[tuple[str, list[str]]]:
    def fmt(v, spec):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    rows = [
        ("Completed requests", [fmt(s["completed"], "d") for s in summaries]),
        ("Failed requests", [fmt(s["failed"], "d") for s in summaries]),
        ("Duration (s)", [fmt(s["duration_s"], ".2f") for s in summaries]),
        ("Input tokens", [fmt(s["total_input_tokens"], "d") for s in summaries]),
        ("Output tokens", [fmt(s["total_output_tokens"], "d") for s in summaries]),
        ("Request throughput (req/s)", [fmt(s["request_throughput"], ".2f") for s in summaries]),
        ("Output throughput (tok/s)", [fmt(s["output_throughput"], ".1f") for s in summaries]),
        ("Total throughput (tok/s)", [fmt(s["total_token_throughput"], ".1f") for s in summaries]),
        ("Prefix cache hit rate", [fmt(s["prefix_cache_hit_rate"], ".1%") for s in summaries]),
    ]
    if any("goodput" in s for s in summaries):
        rows.append(("Goodput (req/s)", [fmt(s.get("goodput", {}).get("request_goodput"), ".2f")
                                         for s in summaries]))
    for key, name in LATENCIES:
        for stat in STATS:
            rows.append((f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {name} (ms)",
                         [fmt(s[key][stat], ".1f") for s in summaries]))
    for key, name in (("itl_added_ms", "ITL added"), ("delivery_lag_ms", "delivery lag")):
        if any(key in s for s in summaries):
            for stat in ("median", "p90", "p99"):
                rows.append((f"{stat.capitalize() if stat == 'median' else stat.upper()} {name} (ms)",
                             [fmt(s.get(key, {}).get(stat), ".2f") for s in summaries]))
    return rows


def format_table(title: str, labels: list[str], summaries: list[dict]) -> str:
    """Rows of figures, one column per run (e.g. per concurrency of a sweep)."""
    rows = _rows(summaries)
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(lbl), *(len(r[1][i]) for r in rows)) for i, lbl in enumerate(labels)]
    rule = "=" * max(len(title), w0 + sum(w + 2 for w in widths))
    lines = [rule, title.center(len(rule)), rule,
             " " * w0 + "".join(f"  {lbl:>{w}}" for lbl, w in zip(labels, widths)),
             "-" * len(rule)]
    lines += [f"{name:<{w0}}" + "".join(f"  {v:>{w}}" for v, w in zip(vals, widths)) for name, vals in rows]
    lines.append(rule)
    return "\n".join(lines)


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


# -- plot -------------------------------------------------------------------------

def plot(path: str, title: str, labels: list[str], summaries: list[dict],
         records: list[list[RequestRecord]], baselines: dict[str, float] | None = None) -> None:
    """Latency distributions (CDFs per run) and throughput vs. latency across runs.

    ``baselines``: name -> output tokens/s of a run without latencies
    (e.g. HF ``generate()``), drawn as vertical lines on the throughput panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    samples = {
        "ttft_ms": lambda rs: [r.ttft_s for r in rs if r.ok and r.ttft_s is not None],
        "tpot_ms": lambda rs: [t for t in (r.tpot_s for r in rs if r.ok) if t is not None],
        "itl_ms": lambda rs: [x for r in rs if r.ok for x in r.itls_s],
        "e2el_ms": lambda rs: [r.latency_s for r in rs if r.ok and r.latency_s is not None],
    }
    for ax, (key, name) in zip(axes.flat, LATENCIES):
        all_ms = []
        for label, rs in zip(labels, records):
            ms = np.sort(np.asarray(samples[key](rs), dtype=np.float64)) * 1000.0
            if ms.size:
                ax.step(np.concatenate(([ms[0]], ms)), np.arange(ms.size + 1) / ms.size, where="post", label=label)
                all_ms.append(ms)
        if all_ms:
            lo, hi = min(m[0] for m in all_ms), max(m[-1] for m in all_ms)
            if lo > 0 and hi / lo > 50:
                ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name} distribution")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl_ms" else "fraction of gaps")
        ax.grid(alpha=0.3)
        if len(labels) > 1 and all_ms:
            ax.legend(fontsize=8)
    for ax, (key, name) in zip(axes.flat[4:], (LATENCIES[0], LATENCIES[1])):
        x = [s["output_throughput"] for s in summaries]
        for stat, style in (("median", "o-"), ("p99", "s--")):
            y = [s[key][stat] for s in summaries]
            pts = [(a, b) for a, b in zip(x, y) if b is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{stat} {name}")
        for label, a, s in zip(labels, x, summaries):
            if s[key]["median"] is not None:
                ax.annotate(label, (a, s[key]["median"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for bname, tok_s in (baselines or {}).items():
            ax.axvline(tok_s, color="gray", linestyle=":", label=f"{bname} ({tok_s:.0f} tok/s)")
        ax.set_title(f"output throughput vs. {name}")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
