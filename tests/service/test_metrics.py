"""``--metrics-port``: Prometheus metrics scraped over HTTP during and after real requests."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.errors import QueueFullError
from pagedgen_client import PagedgenClientError
from service.server import ServerOptions
from tests.service.conftest import ServerThread, serving


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_until(server, done, timeout: float = 10.0) -> dict:
    """Scrape until ``done(samples)``: outcomes are counted when the server's
    handler ends, which can be just after the client saw the last message."""
    end = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if done(samples) or time.monotonic() > end:
            return samples
        time.sleep(0.02)


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after, before, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def metrics_server(tiny_model_dir):
    # Two running at most: the third request waits, visibly.
    with serving(tiny_model_dir, ServerOptions(port=0, metrics_port=0), max_num_seqs=2) as server:
        yield server


def test_counters_and_histograms_move_by_what_was_served(metrics_server):
    before = scrape(metrics_server)
    assert value(before, "pagedgen_kv_cache_capacity_blocks") == 256
    prompts = [[10 + i] * 20 for i in range(3)]
    usages, started = [None] * 3, threading.Semaphore(0)

    def stream(i: int) -> None:
        with metrics_server.client() as client:
            for n, chunk in enumerate(client.generate(prompt_token_ids=prompts[i], max_tokens=400,
                                                      ignore_eos=True, temperature=0)):
                if n == 0:
                    started.release()
                usages[i] = chunk.usage or usages[i]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for _ in range(2):                      # two are generating; the third waits for a seat
        assert started.acquire(timeout=60)
    during = scrape(metrics_server)
    assert value(during, "pagedgen_requests_running") == 2
    assert value(during, "pagedgen_requests_waiting") == 1
    assert value(during, "pagedgen_kv_cache_usage_ratio") > 0
    assert 0 < delta(during, before, "pagedgen_generation_tokens_total") < 1200
    for t in threads:
        t.join(timeout=120)
    after = scrape_until(metrics_server, lambda s: delta(
        s, before, "pagedgen_request_success_total", finish_reason="length") >= 3)

    assert all(u is not None and u.completion_tokens == 400 for u in usages)
    assert delta(after, before, "pagedgen_prompt_tokens_total") == 60
    assert delta(after, before, "pagedgen_generation_tokens_total") == 1200
    assert delta(after, before, "pagedgen_request_success_total", finish_reason="length") == 3
    for hist in ("time_to_first_token", "time_per_output_token", "e2e_request_latency", "request_queue_time"):
        assert delta(after, before, f"pagedgen_{hist}_seconds_count") == 3, hist
        assert delta(after, before, f"pagedgen_{hist}_seconds_bucket", le="+Inf") == 3, hist
    ttft_sum = delta(after, before, "pagedgen_time_to_first_token_seconds_sum")
    e2e_sum = delta(after, before, "pagedgen_e2e_request_latency_seconds_sum")
    queue_sum = delta(after, before, "pagedgen_request_queue_time_seconds_sum")
    tpot_sum = delta(after, before, "pagedgen_time_per_output_token_seconds_sum")
    assert 0 < queue_sum < ttft_sum < e2e_sum
    assert tpot_sum * 399 == pytest.approx(e2e_sum - ttft_sum, rel=1e-6)
    # Every message sent was timed from its engine step; deltas a slow write held back share one.
    assert 3 <= delta(after, before, "pagedgen_stream_delivery_seconds_count") <= 1200
    assert 0 < delta(after, before, "pagedgen_stream_delivery_seconds_sum") < e2e_sum
    assert delta(after, before, "pagedgen_prefix_cache_queried_tokens_total") == 60
    assert value(after, "pagedgen_requests_running") == value(after, "pagedgen_requests_waiting") == 0
    assert value(after, "pagedgen_kv_cache_usage_ratio") == 0


def test_prefix_cache_hits_and_failures_by_code(metrics_server):
    before = scrape(metrics_server)
    with metrics_server.client() as client:
        prompt = list(range(40, 80))                           # 2 full blocks and 8 tokens
        cached = []
        for _ in range(2):
            chunks = list(client.generate(prompt_token_ids=prompt, max_tokens=2, temperature=0))
            cached.append(chunks[-1].usage.cached_prompt_tokens)
        assert cached == [0, 32]
        with pytest.raises(PagedgenClientError) as e:
            list(client.generate(prompt_token_ids=prompt, max_tokens=4, temperature=-1))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        stream = client.generate(prompt_token_ids=prompt, max_tokens=400, ignore_eos=True)
        next(stream)
        stream.close()                                         # the client walks away
    after = scrape_until(metrics_server, lambda s: delta(s, before, "pagedgen_request_failure_total", code="CANCELLED")
                         and delta(s, before, "pagedgen_request_failure_total", code="INVALID_ARGUMENT")
                         and delta(s, before, "pagedgen_request_success_total", finish_reason="length") >= 2)
    assert delta(after, before, "pagedgen_prefix_cache_hit_tokens_total") == 2 * 32   # the 2nd and the cancelled
    assert delta(after, before, "pagedgen_prefix_cache_queried_tokens_total") == 3 * 40
    assert delta(after, before, "pagedgen_request_success_total", finish_reason="length") == 2
    assert delta(after, before, "pagedgen_request_failure_total", code="INVALID_ARGUMENT") == 1
    assert delta(after, before, "pagedgen_request_failure_total", code="CANCELLED") == 1
    # Cancelled requests leave the latency histograms alone.
    assert delta(after, before, "pagedgen_e2e_request_latency_seconds_count") == 2


def test_each_server_has_its_own_registry(fake_engine):
    """Two servers in one process: separate metrics, no clash; only the one asked for serves them."""
    a = ServerThread(fake_engine, ServerOptions(port=0, metrics_port=0))
    b = ServerThread(fake_engine, ServerOptions(port=0, metrics_port=0))
    plain = ServerThread(fake_engine, ServerOptions(port=0))
    try:
        assert plain.server.metrics is None and plain.server.metrics_port is None
        assert a.server.metrics_port != b.server.metrics_port
        with a.client() as client:
            assert "".join(c.text for c in client.generate("abc", max_tokens=3)) == "cba"
            fake_engine.fail_with = QueueFullError("full")
            with pytest.raises(PagedgenClientError):
                list(client.generate("abc"))
        sa = scrape_until(a, lambda s: value(s, "pagedgen_request_failure_total", code="RESOURCE_EXHAUSTED"))
        sb = scrape(b)
        assert value(sa, "pagedgen_request_success_total", finish_reason="length") == 1
        assert value(sa, "pagedgen_request_failure_total", code="RESOURCE_EXHAUSTED") == 1
        assert value(sb, "pagedgen_request_success_total", finish_reason="length") == 0
        assert value(sa, "pagedgen_kv_cache_capacity_blocks") == value(sb, "pagedgen_kv_cache_capacity_blocks") == 64
        assert all(name.startswith("pagedgen_") for name, _ in sa)
    finally:
        for s in (a, b, plain):
            s.stop(grace=0.5)
    with pytest.raises(OSError):                           # the endpoint is gone with its server
        scrape(a)


def test_metrics_port_flag():
    from cli.main import build_parser

    args = build_parser().parse_args(["serve", "--metrics-port", "9400"])
    assert args.metrics_port == 9400
    assert build_parser().parse_args(["serve"]).metrics_port is None
    with pytest.raises(ValueError, match="metrics_port"):
        ServerOptions(metrics_port=70000)
