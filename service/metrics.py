"""Prometheus metrics of one server (``pagedgen serve --metrics-port N``).

Each ``ServerMetrics`` owns its own ``CollectorRegistry``, so several servers
can live in one process (tests). Three sources feed it:

- at scrape time, the engine's ``get_stats()`` (``EngineCollector``): requests
  running and waiting, KV cache usage, prefix-cache queries and hits,
  preemptions;
- on the engine's loop thread, every delta output (``observe_output``, an
  ``AsyncEngine.output_observers`` entry): prompt and generation tokens, and
  for each request that finished (not aborted) its TTFT, TPOT, end-to-end
  latency and queue time, from the engine's own timestamps
  (``RequestMetrics``);
- in the gRPC servicer (``observe_generate``): each request's outcome, by
  finish reason when it succeeded, by status code when it failed; and for
  every message, how long its delta took from the engine's step to being
  sent (``observe_delivery``): the latency the service adds to each token.

Tokens and latencies come from the engine, so they cover every front end
that shares it (the OpenAI HTTP API too); outcomes are counted where a status
code is chosen, so the HTTP API calls ``observe_outcome`` itself
(``service.openai.observe``), under the gRPC code its HTTP status stands for.

=================================================  =========  ======================================
name                                               type       what
=================================================  =========  ======================================
pagedgen_requests_running                          gauge      requests in the running batch
pagedgen_requests_waiting                          gauge      requests queued (new or preempted)
pagedgen_kv_cache_usage_ratio                      gauge      KV blocks held by requests / all blocks
pagedgen_kv_cache_capacity_blocks                  gauge      KV blocks in the pool
pagedgen_prefix_cache_queried_tokens_total         counter    prompt tokens looked up in the prefix cache
pagedgen_prefix_cache_hit_tokens_total             counter    prompt tokens found there
pagedgen_preemptions_total                         counter    requests preempted for KV blocks
pagedgen_prompt_tokens_total                       counter    prompt tokens of finished requests
pagedgen_generation_tokens_total                   counter    tokens generated (streamed as they come)
pagedgen_time_to_first_token_seconds               histogram  arrival to first token
pagedgen_time_per_output_token_seconds             histogram  (finish - first token) / (tokens - 1)
pagedgen_e2e_request_latency_seconds               histogram  arrival to finish
pagedgen_request_queue_time_seconds                histogram  arrival to first scheduled
pagedgen_stream_delivery_seconds                   histogram  engine step done to the delta's gRPC message sent
pagedgen_request_success_total{finish_reason}      counter    requests served (gRPC and HTTP): stop, length, abort
pagedgen_request_failure_total{code}               counter    requests failed, by gRPC status code (HTTP: its equivalent)
=================================================  =========  ======================================
"""

from __future__ import annotations

import asyncio
import functools
from contextlib import aclosing

import grpc
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb

log = structlog.get_logger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
DELIVERY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class EngineCollector:
    """Reads the engine's scheduler and KV counters at scrape time."""

    def __init__(self):
        self.engine = None

    def collect(self):
        engine = self.engine
        if engine is None:
            return
        s = engine.get_stats()
        yield GaugeMetricFamily("pagedgen_requests_running", "Requests in the running batch.", value=s.num_running)
        yield GaugeMetricFamily("pagedgen_requests_waiting", "Requests waiting to be scheduled (new or preempted).",
                                value=s.num_waiting)
        used = s.kv_blocks_total - s.kv_blocks_free
        yield GaugeMetricFamily("pagedgen_kv_cache_usage_ratio", "Fraction of KV cache blocks held by requests.",
                                value=used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        yield GaugeMetricFamily("pagedgen_kv_cache_capacity_blocks", "KV cache blocks in the pool.",
                                value=s.kv_blocks_total)
        yield CounterMetricFamily("pagedgen_prefix_cache_queried_tokens",
                                  "Prompt tokens looked up in the prefix cache.", value=s.prefix_cache_queries)
        yield CounterMetricFamily("pagedgen_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
                                  value=s.prefix_cache_hits)
        yield CounterMetricFamily("pagedgen_preemptions", "Requests preempted to free KV cache blocks.",
                                  value=s.num_preemptions)
        yield GaugeMetricFamily("pagedgen_device_memory_active_bytes",
                                "Bytes the backend's device allocator holds (0: not reported).",
                                value=s.device_memory_active_bytes)
        yield GaugeMetricFamily("pagedgen_device_memory_peak_bytes",
                                "The most bytes the backend's device allocator held at once since start.",
                                value=s.device_memory_peak_bytes)


class ServerMetrics:
    """The metrics of one server and, once started, their HTTP endpoint."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.engine_collector = EngineCollector()
        r.register(self.engine_collector)
        self.prompt_tokens = Counter("pagedgen_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("pagedgen_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("pagedgen_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pagedgen_time_per_output_token_seconds",
                              "Per request: (finish - first token) / (output tokens - 1).",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("pagedgen_e2e_request_latency_seconds", "Time from arrival to finish.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("pagedgen_request_queue_time_seconds",
                                    "Time from arrival to being first scheduled.", buckets=_LATENCY_BUCKETS, registry=r)
        self.delivery = Histogram("pagedgen_stream_delivery_seconds",
                                  "Time from the engine step that produced a delta to its gRPC message being sent.",
                                  buckets=DELIVERY_BUCKETS, registry=r)
        self.success = Counter("pagedgen_request_success", "Requests served, by the finish reason of completion 0.",
                               ["finish_reason"], registry=r)
        self.failure = Counter("pagedgen_request_failure", "Requests failed, by gRPC status code.", ["code"],
                               registry=r)
        self._http = None
        self._engine = None

    # -- wiring -------------------------------------------------------------------

    def start_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port); returns the bound port."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot bind metrics endpoint {host}:{port}: {e}") from None
        self._http = server
        return server.server_port

    def attach(self, engine) -> None:
        """Read ``engine``'s stats and observe its outputs from now on."""
        self.detach()
        self._engine = self.engine_collector.engine = engine
        observers = getattr(engine, "output_observers", None)
        if observers is not None:
            observers.append(self.observe_output)

    def detach(self) -> None:
        observers = getattr(self._engine, "output_observers", None)
        if observers is not None and self.observe_output in observers:
            observers.remove(self.observe_output)

    def close(self) -> None:
        self.detach()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- observations ------------------------------------------------------------

    def observe_output(self, out) -> None:
        """One delta ``RequestOutput`` (engine loop thread)."""
        n = out.num_generated_tokens
        if n:
            self.generation_tokens.inc(n)
        if not out.finished:
            return
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        m = out.metrics
        if m is None or any(c.finish_reason == "abort" for c in out.outputs):
            return
        if m.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        if m.finished_time is not None:
            self.e2e.observe(max(0.0, m.finished_time - m.arrival_time))
        if m.first_token_time is None:
            return
        self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
        per_seq = getattr(m, "num_generation_tokens", 0) / max(1, len(out.outputs))
        if m.finished_time is not None and per_seq > 1:
            self.tpot.observe(max(0.0, m.finished_time - m.first_token_time) / (per_seq - 1))

    def observe_delivery(self, seconds: float) -> None:
        """One message sent ``seconds`` after its engine step (event loop)."""
        self.delivery.observe(max(0.0, seconds))

    def observe_outcome(self, code: str, finish_reasons: dict[int, str]) -> None:
        if code == "OK":
            self.success.labels(finish_reason=finish_reasons.get(0, "unknown")).inc()
        else:
            self.failure.labels(code=code).inc()


def _finish_reason_name(value: int) -> str:
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _code_name(code) -> str:
    if code is None:
        return "UNKNOWN"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


def observe_generate(method):
    """Counts the outcome of each call of a streaming servicer method, whose
    instance may hold ``metrics`` (a ``ServerMetrics``, or None). Put it above
    ``errors.map_errors``: a failure arrives here as the status it was given."""

    @functools.wraps(method)
    async def stream(self, request, context):
        metrics = getattr(self, "metrics", None)
        reasons: dict[int, str] = {}
        code = "OK"
        try:
            async with aclosing(method(self, request, context)) as items:
                async for msg in items:
                    if msg.finish_reason:
                        reasons[msg.index] = _finish_reason_name(msg.finish_reason)
                    yield msg
        except grpc.aio.AbortError:
            code = _code_name(context.code())
            raise
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()        # gRPC cancels the handler when the deadline passes
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except BaseException:
            code = "UNKNOWN"
            raise
        finally:
            if metrics is not None:
                try:
                    metrics.observe_outcome(code, reasons)
                except Exception:  # noqa: BLE001 - metrics never fail a request
                    log.warning("metrics_observe_failed", exc_info=True)
    return stream
