"""``pagedgen bench serve``: load a running server through the client library.

Each load level sends a workload (``bench.datasets``) as fixed concurrency,
as Poisson arrivals at a request rate (``inf``: all at once, optionally
capped by a concurrency), or both; several values of one of them sweep.
Every request streams through ``AsyncClient.generate`` and is timed as its
client sees it (``bench.report`` defines the figures). Levels run one after
another on the same workload, each under its own ``cache_salt``, so a level
never hits prefix-cache blocks a previous one left behind.

``--launch`` starts the server itself (``bench.launch``) and times it to
SERVING. ``--compare offline`` also runs the workload through an engine in
this process first (``OfflineBaseline``) and reports serve/offline
throughput; ``--repeat`` alternates the two. With a metrics endpoint, each
level reports how long messages took from engine step to sent, from the
server's ``pagedgen_stream_delivery_seconds`` histogram.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import sys
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from itertools import islice

from bench.datasets import BenchRequest, Conversation, add_dataset_args, conversations, dataset_config, take
from bench.launch import add_engine_args
from bench.report import RequestRecord, format_table, plot, records_json, summarize, write_json


@dataclass(frozen=True)
class Load:
    """One level of a run: a concurrency cap and/or an arrival rate (requests/s)."""

    concurrency: int | None = None
    request_rate: float = math.inf

    @property
    def label(self) -> str:
        parts = []
        if self.concurrency is not None:
            parts.append(f"c={self.concurrency}")
        if math.isfinite(self.request_rate) or not parts:
            parts.append(f"rate={self.request_rate:g}/s")
        return " ".join(parts)


@dataclass(frozen=True)
class RunBounds:
    num_requests: int | None          # conversations to send at most
    duration_s: float | None          # stop sending (new turns too) after this long


def parse_list(text: str, kind: type) -> list:
    """'1,8,32' -> [1, 8, 32]; 'inf' -> [inf] for floats."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"not a comma-separated list of {kind.__name__}s: {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"values must be positive: {text!r}")
    return values


def build_loads(concurrency: str | None, request_rate: str | None) -> list[Load]:
    cs = parse_list(concurrency, int) if concurrency else [None]
    rates = parse_list(request_rate, float) if request_rate else [math.inf]
    if len(cs) > 1 and len(rates) > 1:
        raise ValueError("sweep either --concurrency or --request-rate, not both")
    return [Load(c, r) for c in cs for r in rates]


async def send(client, req: BenchRequest, *, t0: float, temperature: float, timeout: float | None,
               cache_salt: str | None) -> tuple[RequestRecord, list[int]]:
    """Stream one request; returns its record and its reply's token ids."""
    from pagedgen_client import PagedgenClientError

    start = time.perf_counter()
    rec = RequestRecord(ok=False, start_s=start - t0)
    reply: list[int] = []
    usage, last, finish, last_engine = None, None, None, None
    try:
        stream = client.generate(**req.inputs(), max_tokens=req.max_tokens, ignore_eos=req.ignore_eos,
                                 temperature=temperature, cache_salt=cache_salt, timeout=timeout,
                                 return_timing=True)
        async with aclosing(stream) as chunks:
            async for chunk in chunks:
                now = time.perf_counter()
                if chunk.token_ids or chunk.text:
                    if last is None:
                        rec.ttft_s = now - start
                    else:
                        rec.itls_s.append(now - last)
                    if chunk.engine_time is not None:
                        rec.lags_s.append(time.time() - chunk.engine_time)
                        if last is not None and last_engine is not None:
                            rec.itls_added_s.append((now - last) - (chunk.engine_time - last_engine))
                        last_engine = chunk.engine_time
                    last = now
                reply.extend(chunk.token_ids)
                usage = chunk.usage or usage
                finish = chunk.finish_reason or finish
    except PagedgenClientError as e:
        rec.error = e.code.name
        return rec, reply
    except Exception as e:  # noqa: BLE001 - a benchmark counts every kind of failure
        rec.error = type(e).__name__
        return rec, reply
    rec.latency_s = time.perf_counter() - start
    if finish == "abort":
        rec.error = "ABORTED"
        return rec, reply
    rec.ok = True
    if usage is not None:
        rec.prompt_tokens, rec.output_tokens = usage.prompt_tokens, usage.completion_tokens
        rec.cached_prompt_tokens = usage.cached_prompt_tokens
    else:
        rec.prompt_tokens, rec.output_tokens = len(req.prompt_token_ids or ()), len(reply)
    return rec, reply


async def run_level(client, workload, load: Load, bounds: RunBounds, *, temperature: float = 0.0,
                    timeout: float | None = None, cache_salt: str | None = None, seed: int = 0,
                    on_done=None) -> tuple[list[RequestRecord], float]:
    """Send ``workload`` (conversations) at ``load`` until a bound; returns records and duration."""
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    end = None if bounds.duration_s is None else t0 + bounds.duration_s
    sem = asyncio.Semaphore(load.concurrency) if load.concurrency else None
    rng = random.Random(seed)

    def time_is_up() -> bool:
        return end is not None and time.perf_counter() >= end

    async def converse(conv: Conversation) -> None:
        try:
            history: list[int] = []
            for turn in range(len(conv.turns)):
                if turn and time_is_up():
                    return
                req = conv.request(turn, history)
                rec, reply = await send(client, req, t0=t0, temperature=temperature, timeout=timeout,
                                        cache_salt=cache_salt)
                records.append(rec)
                if on_done is not None:
                    on_done(rec)
                if not rec.ok:
                    return
                if conv.resend_history:
                    history = req.prompt_token_ids + reply
        finally:
            if sem is not None:
                sem.release()

    tasks = []
    source = workload if bounds.num_requests is None else islice(workload, bounds.num_requests)
    next_at = t0
    for conv in source:
        if math.isfinite(load.request_rate):
            next_at += rng.expovariate(load.request_rate)
            delay = next_at - time.perf_counter()
            if end is not None:
                delay = min(delay, end - time.perf_counter())
            if delay > 0:
                await asyncio.sleep(delay)
        if sem is not None:
            await sem.acquire()
        if time_is_up():
            if sem is not None:
                sem.release()
            break
        tasks.append(asyncio.create_task(converse(conv)))
        await asyncio.sleep(0)              # let it send before the next arrives
    await asyncio.gather(*tasks)
    return records, time.perf_counter() - t0


def scrape_histogram(url: str, name: str) -> list[tuple[float, float]]:
    """The cumulative buckets ``[(le, count), ...]`` of histogram ``name`` at a
    Prometheus endpoint (empty when it has none)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return sorted((float(s.labels["le"]), s.value) for s in family.samples
                          if s.name == name + "_bucket")
    return []


def histogram_quantile(q: float, before: list, after: list) -> float | None:
    """Quantile ``q`` of the observations made between two scrapes of one
    histogram, interpolated linearly inside its bucket (as PromQL's
    ``histogram_quantile``); None without observations."""
    prev = dict(before)
    counts = [(le, c - prev.get(le, 0.0)) for le, c in after]
    if not counts or counts[-1][1] <= 0:
        return None
    rank = q * counts[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, c in counts:
        if c >= rank:
            if math.isinf(le):
                return lower_le
            span = c - lower_count
            return lower_le + (le - lower_le) * ((rank - lower_count) / span if span else 1.0)
        lower_le, lower_count = le, c
    return lower_le


DELIVERY_METRIC = "pagedgen_stream_delivery_seconds"


def _delivery(before: list, after: list) -> dict:
    """Milliseconds from engine step to message sent, from two scrapes."""
    prev = dict(before)
    total = after[-1][1] - prev.get(after[-1][0], 0.0) if after else 0.0
    return {"messages": int(total), **{f"p{int(q * 100)}_ms": None if (v := histogram_quantile(q, before, after))
                                       is None else v * 1000 for q in (0.5, 0.9, 0.99)}}


def _server_delta(before, after) -> dict:
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    return {"prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "num_preemptions": after.num_preemptions - before.num_preemptions,
            "kv_blocks_total": after.kv_blocks_total}


async def run(args, server: str, workload: list[Conversation] | None = None) -> dict:
    """Every load level against ``server``; ``workload`` (else generated from
    the dataset flags and the server's vocabulary) is sent at each level."""
    from pagedgen_client import AsyncClient, RetryPolicy
    from tqdm import tqdm

    loads = build_loads(args.concurrency, args.request_rate)
    cfg = dataset_config(args)
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = 64
    if num_requests is None and any(ld.concurrency is None and math.isinf(ld.request_rate) for ld in loads):
        raise ValueError("--duration with --request-rate inf needs --concurrency or --num-requests")
    bounds = RunBounds(num_requests, args.duration)
    run_id = uuid.uuid4().hex[:8]
    async with AsyncClient(server, api_key=args.api_key, root_certificates=args.tls_ca,
                           retry=RetryPolicy(max_attempts=1)) as client:
        info = await client.model_info(timeout=30)
        if args.warmup:
            warm = BenchRequest(list(range(1, 17)), 4)
            await send(client, warm, t0=0.0, temperature=args.temperature, timeout=args.timeout,
                       cache_salt=f"bench-{run_id}-warmup")
        levels, all_records = [], []
        turns = cfg.turns if cfg.name == "multi-turn" else 1
        for i, load in enumerate(loads):
            convs = workload if workload is not None else conversations(cfg, info.vocab_size, info.eos_token_ids)
            total = None if num_requests is None else num_requests * turns
            with tqdm(total=total, desc=load.label, unit="req", disable=not args.progress,
                      file=sys.stderr, dynamic_ncols=True) as bar:
                before = await client.stats()
                scraped = await _scrape(args.metrics_url)
                records, duration = await run_level(
                    client, convs, load, bounds, temperature=args.temperature, timeout=args.timeout,
                    cache_salt=f"bench-{run_id}-{i}", seed=args.seed + i, on_done=lambda _r: bar.update(1))
                after = await client.stats()
                server_side = _server_delta(before, after)
                if scraped is not None:
                    server_side["delivery"] = _delivery(scraped, await _scrape(args.metrics_url))
            summary = summarize(records, duration, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
            level = {"label": load.label, "concurrency": load.concurrency,
                     "request_rate": "inf" if math.isinf(load.request_rate) else load.request_rate,
                     **summary, "server": server_side}
            if args.save_requests:
                level["requests"] = records_json(records)
            levels.append(level)
            all_records.append(records)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["model"] = {"name": info.model, "backend": info.backend, "dtype": info.dtype,
                       "num_kv_blocks": info.num_kv_blocks, "block_size": info.block_size}
    return {"benchmark": "serve", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": config, "levels": levels, "_records": all_records}


async def _scrape(url: str | None) -> list | None:
    if url is None:
        return None
    return await asyncio.to_thread(scrape_histogram, url, DELIVERY_METRIC)


class OfflineBaseline:
    """``--compare offline``: the same workload through an engine in this
    process, every request added at once, run before each serve repetition."""

    def __init__(self, args):
        from bench.offline import engine_args, tokenized
        from engine.llm_engine import LLMEngine

        self.cfg = dataset_config(args)
        self.warmup = args.warmup
        self.engine = LLMEngine(engine_args(args))
        tok = self.engine.tokenizer
        self.workload = tokenized(self.engine, take(self.cfg, args.num_requests or 64,
                                                    self.engine.model_config.vocab_size, tok.all_special_ids))

    def run(self) -> tuple[dict, list[RequestRecord]]:
        """One pass from a cold prefix cache (shared-prefix: just the prefix)."""
        from bench.offline import prepare, run_workload

        self.engine.scheduler.kv.reset_prefix_cache()
        prepare(self.engine, self.cfg, self.workload, warmup=self.warmup)
        self.warmup = False
        result = run_workload(self.engine, self.workload)
        records = result.pop("records")
        return {**result, **summarize(records, result["elapsed_s"])}, records

    def close(self) -> None:
        import gc

        self.engine.shutdown()
        self.engine = None
        gc.collect()


def compare_lines(offline: dict, levels: list[dict]) -> list[str]:
    """The service's cost against the engine alone, per level (stored in the level too)."""
    lines = []
    for lv in levels:
        ratio = lv["output_throughput"] / offline["output_throughput"] if offline["output_throughput"] else 0.0
        lv["vs_offline"] = {"output_throughput_ratio": ratio,
                            "median_itl_added_ms": _sub(lv["itl_ms"]["median"], offline["itl_ms"]["median"]),
                            "median_tpot_added_ms": _sub(lv["tpot_ms"]["median"], offline["tpot_ms"]["median"])}
        d = lv["vs_offline"]
        lines.append(f"{lv['label']}: output tok/s serve {lv['output_throughput']:.1f} / offline "
                     f"{offline['output_throughput']:.1f} = {ratio:.3f}; median ITL serve - offline "
                     f"{_fmt_ms(d['median_itl_added_ms'])}, median TPOT {_fmt_ms(d['median_tpot_added_ms'])}")
    return lines


def delivery_lines(levels: list[dict]) -> list[str]:
    out = []
    for lv in levels:
        d = lv.get("server", {}).get("delivery")
        if d and d["messages"]:
            out.append(f"{lv['label']}: engine step to gRPC message sent, {d['messages']} messages: "
                       f"p50 {d['p50_ms']:.2f} ms, p90 {d['p90_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms")
    return out


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1f} ms"


def main(args) -> int:
    from pagedgen_client import PagedgenClientError

    if args.repeat < 1:
        raise ValueError("--repeat must be at least 1")
    if args.repeat > 1 and not args.compare:
        raise ValueError("--repeat goes with --compare offline")
    if args.compare and args.num_requests is None and args.duration is not None:
        raise ValueError("--compare offline needs --num-requests (the offline run has no duration)")
    baseline = launched = None
    server = args.server
    runs: list[tuple[dict | None, list | None, dict]] = []     # (offline, its records, serve report)
    try:
        if args.compare == "offline":
            print("offline engine: loading it in this process...", file=sys.stderr)
            baseline = OfflineBaseline(args)
        if args.launch or args.compare:
            from bench.launch import free_port, launch, serve_flags

            metrics_port = free_port()
            print("starting pagedgen serve...", file=sys.stderr)
            launched = launch(serve_flags(args) + ["--metrics-port", str(metrics_port)] + args.server_arg,
                              timeout=args.launch_timeout)
            server = launched.address
            args.metrics_url = args.metrics_url or f"http://127.0.0.1:{metrics_port}/metrics"
            print(f"pagedgen serve: SERVING {launched.start_to_serving_s:.1f}s after start", file=sys.stderr)
        for rep in range(args.repeat):
            offline = offline_records = None
            if baseline is not None:
                print(f"offline engine: run {rep + 1}/{args.repeat}...", file=sys.stderr)
                offline, offline_records = baseline.run()
            runs.append((offline, offline_records, asyncio.run(run(args, server, baseline and baseline.workload))))
    except PagedgenClientError as e:
        sys.stderr.write(f"pagedgen bench serve: {server}: {e}\n")
        return 1
    finally:
        if launched is not None:
            launched.stop()
        if baseline is not None:
            baseline.close()
    offline, offline_records, report = runs[-1]
    records = report.pop("_records")
    levels = report["levels"]
    labels = [lv["label"] for lv in levels]
    model = report["config"]["model"]
    title = f"pagedgen bench serve: {model['name']} ({model['backend']}), dataset {args.dataset}"
    if launched is not None:
        report["start_to_serving_s"] = launched.start_to_serving_s
    if offline is None:
        print(format_table(title, labels, levels))
        summaries = levels
    else:
        if len(runs) > 1:
            title += f", run {len(runs)} of {len(runs)}"
        print(format_table(title, ["offline", *labels], [offline, *levels]))
        labels, records, summaries = ["offline", *labels], [offline_records, *records], [offline, *levels]
        report["offline"] = offline
        report["repeats"] = []
        for i, (off, _, rep) in enumerate(runs):
            for line in compare_lines(off, rep["levels"]):
                print(f"run {i + 1}: {line}" if len(runs) > 1 else line)
            report["repeats"].append({"offline": off, "levels": rep["levels"]})
        if len(runs) > 1:
            for j, label in enumerate(lv["label"] for lv in levels):
                ratios = sorted(r["levels"][j]["vs_offline"]["output_throughput_ratio"] for r in report["repeats"])
                print(f"{label}: serve/offline output tok/s over {len(runs)} runs: median {statistics.median(ratios):.3f}"
                      f" (min {ratios[0]:.3f}, max {ratios[-1]:.3f})")
    for line in delivery_lines(levels):
        print(line)
    if launched is not None:
        print(f"start to SERVING: {launched.start_to_serving_s:.2f} s")
    if args.output:
        write_json(args.output, report)
    if args.plot:
        plot(args.plot, title, labels, summaries, records)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="benchmark a running server through the client library",
                              description="Stream a workload to a running pagedgen server and report request "
                                          "and token throughput, TTFT, TPOT, ITL and end-to-end latency.")
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port of the server")
    p.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY'")
    p.add_argument("--tls-ca", default=None, help="use TLS, trusting this CA (PEM file)")
    la = p.add_argument_group("a server of its own (--launch) and the offline baseline (--compare offline)")
    la.add_argument("--launch", action="store_true",
                    help="start 'pagedgen serve' with the engine flags below on a free port, time it to SERVING, "
                         "and stop it at the end (--server is ignored)")
    la.add_argument("--compare", choices=("offline",), default=None,
                    help="first run the same workload through the engine in this process (all requests at once), "
                         "then launch a server and report serve/offline throughput and the latency it adds")
    la.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra 'pagedgen serve' argument for a launched server (repeatable, e.g. "
                         "--server-arg=--max-queue=4096)")
    la.add_argument("--launch-timeout", type=float, default=300.0, help="seconds a launched server gets to SERVING")
    la.add_argument("--repeat", type=int, default=1,
                    help="with --compare offline: alternate offline and serve runs this many times and report "
                         "the median ratio (the runs share the two loaded engines)")
    la.add_argument("--metrics-url", default=None,
                    help="Prometheus endpoint of the server (pagedgen serve --metrics-port), to report how long "
                         "messages took from engine step to sent; set for a launched server")
    add_engine_args(la)
    g = p.add_argument_group("load (a comma-separated list sweeps)")
    g.add_argument("--concurrency", default=None, help="requests in flight at most, e.g. 8 or 1,8,32")
    g.add_argument("--request-rate", default=None,
                   help="Poisson arrivals per second, e.g. 4 or 1,2,4; inf (default) sends all at once")
    g.add_argument("--num-requests", type=int, default=None,
                   help="requests (multi-turn: conversations) per level (default 64 unless --duration)")
    g.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds per level")
    g.add_argument("--timeout", type=float, default=None, help="deadline of each request in seconds")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the tiny warm-up request")
    add_dataset_args(p)
    o = p.add_argument_group("report")
    o.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT at most this")
    o.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT at most this")
    o.add_argument("--output", default=None, help="write every figure and the configuration as JSON")
    o.add_argument("--save-requests", action="store_true", help="also put every request's record in the JSON")
    o.add_argument("--plot", default=None, help="write latency distributions and throughput vs. latency (PNG)")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=main)
