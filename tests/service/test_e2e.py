"""End to end: a real AsyncEngine on a tiny random Llama behind a real server
on a free loopback port, driven through the real client."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from pagedgen_client import AsyncClient, PagedgenClientError, RetryPolicy
from service.server import SERVICE_NAME

pytestmark = pytest.mark.timeout(180)

PROMPTS = [f"{s} {v} the answer" for s in ("The cat", "A small robot", "My neighbour", "The old river")
           for v in ("watches", "builds", "remembers", "carries", "paints", "follows", "explains", "sees")]
LONG = dict(max_tokens=480, ignore_eos=True, temperature=0)      # seconds of work on the tiny model


def _wait_until_idle(client, timeout: float = 2.0):
    """The engine holds no request and no block (cached-but-free blocks count as free)."""
    end = time.monotonic() + timeout
    while True:
        stats = client.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_free == stats.kv_blocks_total:
            return stats
        if time.monotonic() > end:
            raise AssertionError(f"engine still busy {timeout}s later: {stats}")
        time.sleep(0.02)


def test_streamed_deltas_add_up_to_the_text_and_the_token_ids(tiny_client):
    chunks = list(tiny_client.generate(PROMPTS[0], max_tokens=24, ignore_eos=True, temperature=0, logprobs=2))
    text = "".join(c.text for c in chunks)
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == 24 and len(chunks) > 1
    assert text == tiny_client.detokenize(ids)
    assert text == tiny_client.generate_text(PROMPTS[0], max_tokens=24, ignore_eos=True, temperature=0)
    last = chunks[-1]
    assert last.finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert last.usage.completion_tokens == 24
    assert last.usage.prompt_tokens == len(tiny_client.tokenize(PROMPTS[0]))
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in logprobs] == ids
    assert all(lp.rank == 1 and len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in logprobs)  # greedy


def test_return_timing_stamps_each_chunk_with_when_the_engine_produced_it(tiny_client):
    start = time.time()
    timed = list(tiny_client.generate(PROMPTS[0], max_tokens=12, ignore_eos=True, temperature=0, return_timing=True))
    received = time.time()
    stamps = [c.engine_time for c in timed]
    assert all(start < t <= received for t in stamps)
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)    # one step per token, in order
    plain = list(tiny_client.generate(PROMPTS[0], max_tokens=12, ignore_eos=True, temperature=0))
    assert all(c.engine_time is None for c in plain)
    # a plain stream may merge the deltas of steps the client had not read yet; the tokens are the same
    assert [t for c in plain for t in c.token_ids] == [t for c in timed for t in c.token_ids]


def test_greedy_over_grpc_equals_the_offline_llm(tiny_server, tiny_client):
    from engine import LLM, SamplingParams

    llm = LLM(model=tiny_server.model_dir, backend="cpu", num_kv_blocks=256)
    try:
        for prompt in PROMPTS[:3]:
            offline = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
            served = list(tiny_client.generate(prompt, temperature=0, max_tokens=20))
            assert "".join(c.text for c in served) == offline.text
            assert [t for c in served for t in c.token_ids] == list(offline.token_ids)
    finally:
        getattr(llm, "shutdown", lambda: None)()


def test_chat_prompts_use_the_template(tiny_client):
    messages = [{"role": "user", "content": "Hello there"}]
    ids = tiny_client.tokenize(messages=messages)
    assert ids != tiny_client.tokenize("Hello there")
    by_chat = tiny_client.generate_text(messages=messages, temperature=0, max_tokens=8, ignore_eos=True)
    by_ids = tiny_client.generate_text(prompt_token_ids=ids, temperature=0, max_tokens=8, ignore_eos=True)
    assert by_chat == by_ids


def test_32_concurrent_streams_each_equal_their_solo_result(tiny_server, tiny_client):
    kwargs = dict(temperature=0, max_tokens=16, ignore_eos=True)
    solo = [list(tiny_client.generate(p, **kwargs)) for p in PROMPTS]

    async def run_all():
        async with AsyncClient(tiny_server.address) as client:
            async def one(prompt):
                return [c async for c in client.generate(prompt, **kwargs)]
            return await asyncio.gather(*(one(p) for p in PROMPTS))

    together = asyncio.run(run_all())
    assert len(PROMPTS) == 32
    for alone, batched in zip(solo, together):
        assert "".join(c.text for c in batched) == "".join(c.text for c in alone)
        assert [t for c in batched for t in c.token_ids] == [t for c in alone for t in c.token_ids]
        assert batched[-1].usage.completion_tokens == 16
    _wait_until_idle(tiny_client)


@pytest.fixture
def engine_aborts(tiny_server, monkeypatch):
    """Request ids the engine aborted (spied on the sync engine the loop thread drives)."""
    llm_engine = tiny_server.engine.engine
    aborted: list[str] = []
    original = llm_engine.abort_request

    def abort_request(request_id):
        out = original(request_id)
        if out is not None:
            aborted.append(request_id)
        return out

    monkeypatch.setattr(llm_engine, "abort_request", abort_request)
    return aborted


def test_cancelling_a_stream_aborts_it_and_frees_its_blocks(tiny_client, engine_aborts):
    _wait_until_idle(tiny_client)
    stream = tiny_client.generate(PROMPTS[1], request_id="to-cancel", **LONG)
    for _ in range(3):
        next(stream)
    assert tiny_client.stats().num_running == 1
    stream.close()
    _wait_until_idle(tiny_client, timeout=2.0)
    assert engine_aborts == ["to-cancel"]


def test_a_short_deadline_aborts_the_request_and_frees_its_blocks(tiny_client, engine_aborts):
    _wait_until_idle(tiny_client)
    with pytest.raises(PagedgenClientError) as info:
        list(tiny_client.generate(PROMPTS[2], request_id="too-slow", timeout=0.1, **LONG))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_until_idle(tiny_client, timeout=2.0)
    assert engine_aborts == ["too-slow"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt="hi", temperature=-1), "sampling.temperature"),
    (dict(prompt="hi", top_p=0), "sampling.top_p"),
    (dict(prompt="hi", top_k=-3), "sampling.top_k"),
    (dict(prompt="hi", max_tokens=0), "sampling.max_tokens"),
    (dict(prompt="hi", n=0), "sampling.n"),
    (dict(prompt="hi", logprobs=99), "sampling.logprobs"),
    (dict(prompt="hi", min_tokens=9, max_tokens=3), "sampling.min_tokens"),
    (dict(prompt="hi", stop=[""]), "sampling.stop"),
    (dict(prompt="hi", stop_token_ids=[10**6]), "stop_token_ids"),
    (dict(prompt=""), "prompt"),
    (dict(prompt_token_ids=[]), "prompt_token_ids"),
    (dict(prompt_token_ids=[10**6]), "prompt_token_ids"),
    (dict(messages=[]), "chat.messages"),
    (dict(messages=[{"role": "", "content": "x"}]), "chat.messages[0].role"),
    (dict(prompt="word " * 600), "prompt"),                 # longer than max_model_len
    (dict(prompt="hi", request_id="r" * 300), "request_id"),
])
def test_bad_input_gets_invalid_argument_naming_the_field(tiny_client, kwargs, field):
    with pytest.raises(PagedgenClientError) as info:
        list(tiny_client.generate(**kwargs))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.message
    assert tiny_client.generate_text("still serving", max_tokens=2, temperature=0) is not None


def test_bad_tokenize_and_detokenize_inputs(tiny_client):
    with pytest.raises(PagedgenClientError) as info:
        tiny_client.detokenize([1, 10**6])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "token_ids[1]" in info.value.message
    with pytest.raises(PagedgenClientError) as info:
        tiny_client.tokenize(messages=[{"role": "", "content": "x"}])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "chat.messages[0].role" in info.value.message


def test_health_reflection_info_and_stats(tiny_server, tiny_client):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    assert tiny_client.health() == "SERVING" and tiny_client.health(SERVICE_NAME) == "SERVING"
    with grpc.insecure_channel(tiny_server.address) as channel:
        assert SERVICE_NAME in ProtoReflectionDescriptorDatabase(channel).get_services()
    info = tiny_client.model_info()
    engine_info = tiny_server.engine.model_info
    assert (info.model, info.max_model_len, info.vocab_size, info.block_size, info.num_kv_blocks, info.backend) == (
        engine_info.model, engine_info.max_model_len, engine_info.vocab_size, 16, 256, "cpu")
    assert info.eos_token_ids == tuple(engine_info.eos_token_ids)
    ids = tiny_client.tokenize("The cat watches the morning light.")
    assert tiny_client.detokenize(ids) == "The cat watches the morning light."
    before = tiny_client.stats()
    tiny_client.generate_text("The cat watches the morning light. " * 4, max_tokens=2, temperature=0)
    tiny_client.generate_text("The cat watches the morning light. " * 4, max_tokens=2, temperature=0)
    after = _wait_until_idle(tiny_client)
    assert after.kv_blocks_total == 256
    assert after.prefix_cache_queries > before.prefix_cache_queries
    assert after.prefix_cache_hits > before.prefix_cache_hits          # the repeated prompt hit the cache


def test_usage_reports_cached_prompt_tokens(tiny_client):
    prompt = "Every student explains the long winter with care. " * 3
    first = list(tiny_client.generate(prompt, max_tokens=1, temperature=0))[-1].usage
    second = list(tiny_client.generate(prompt, max_tokens=1, temperature=0))[-1].usage
    assert first.prompt_tokens == second.prompt_tokens
    assert second.cached_prompt_tokens >= 16 and second.cached_prompt_tokens > first.cached_prompt_tokens - 1
    salted = list(tiny_client.generate(prompt, max_tokens=1, temperature=0, cache_salt="tenant-b"))[-1].usage
    assert salted.cached_prompt_tokens == 0


def test_n_completions_are_interleaved_by_index(tiny_client):
    chunks = list(tiny_client.generate(PROMPTS[3], n=3, temperature=0.8, seed=1, max_tokens=6, ignore_eos=True))
    assert {c.index for c in chunks} == {0, 1, 2}
    assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1, 2]
    texts = tiny_client.generate_text(PROMPTS[3], n=3, temperature=0.8, seed=1, max_tokens=6, ignore_eos=True)
    assert isinstance(texts, list) and len(texts) == 3


def _drain_quietly(stream) -> None:
    for _ in stream:
        pass


def _wait_for_stats(client, predicate, timeout: float = 5.0):
    end = time.monotonic() + timeout
    while not predicate(stats := client.stats()):
        if time.monotonic() > end:
            raise AssertionError(f"stats never matched: {stats}")
        time.sleep(0.002)
    return stats


def test_queue_full_is_resource_exhausted(tiny_model_dir):
    from tests.service.conftest import serving

    with serving(tiny_model_dir, grace=1.0, max_num_seqs=1, max_queue=1) as server:
        with server.client(retry=RetryPolicy(max_attempts=1)) as client:
            streams = [client.generate(p, **LONG) for p in PROMPTS[:2]]
            consumers = [threading.Thread(target=_drain_quietly, args=(s,)) for s in streams]
            consumers[0].start()
            _wait_for_stats(client, lambda st: st.num_running == 1)
            consumers[1].start()
            _wait_for_stats(client, lambda st: st.num_waiting == 1)     # the queue is now full
            with pytest.raises(PagedgenClientError) as info:
                list(client.generate(PROMPTS[2], **LONG))
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in info.value.message
            for consumer in consumers:
                consumer.join(timeout=30)
            assert client.generate_text(PROMPTS[2], max_tokens=2) is not None    # room again
