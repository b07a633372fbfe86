"""AsyncEngine with its step loop in an engine process (and on a thread):
the same outputs as the offline engine, batches for slow readers, aborts that
free blocks, and failures that end streams instead of hanging them."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import threading
import time
from contextlib import aclosing

import pytest

from engine.args import EngineArgs
from common.errors import EngineDeadError, EngineShutdownError, InvalidRequestError, RequestFailedError
from engine.async_engine import AsyncEngine
from engine.core_client import EngineCoreClient
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.factories import make_tiny_hf_model

PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42], list(range(100, 140)), [7] * 20]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama"))


def engine_args(model_dir: str, **overrides) -> EngineArgs:
    defaults = dict(model=model_dir, backend="cpu", num_kv_blocks=64, block_size=16, max_num_seqs=16, seed=0,
                    num_threads=1)
    return EngineArgs(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def process_engine(model_dir):
    engine = AsyncEngine(engine_args(model_dir), engine_process=True)
    yield engine
    engine.shutdown()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


async def tokens_of(engine: AsyncEngine, rid: str, prompt: list[int], max_tokens: int) -> list[int]:
    out = []
    async for delta in engine.generate(rid, prompt_token_ids=prompt, sampling_params=greedy(max_tokens)):
        out += delta.outputs[0].token_ids if delta.outputs else []
    return out


def offline_tokens(model_dir: str, max_tokens: int) -> list[list[int]]:
    engine = LLMEngine(engine_args(model_dir))
    try:
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt_token_ids=p, sampling_params=greedy(max_tokens))
        got: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(t for c in out.outputs for t in c.token_ids)
        return [got[f"r{i}"] for i in range(len(PROMPTS))]
    finally:
        engine.shutdown()


async def wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


def all_blocks_free(engine: AsyncEngine) -> bool:
    s = engine.get_stats()
    return s.kv_blocks_free == s.kv_blocks_total and s.num_running == 0 and s.num_waiting == 0


@pytest.mark.timeout(120)
def test_engine_process_streams_what_the_offline_engine_generates(process_engine, model_dir):
    async def run():
        return await asyncio.gather(*(tokens_of(process_engine, f"p{i}", p, 24) for i, p in enumerate(PROMPTS)))

    assert asyncio.run(run()) == offline_tokens(model_dir, 24)
    assert process_engine.engine is None and process_engine.engine_process_pid != os.getpid()
    assert isinstance(process_engine._core, EngineCoreClient)
    assert process_engine.model_info.num_kv_blocks == 64
    assert process_engine.tokenizer.decode(process_engine.tokenizer.encode("hello world")) == "hello world"


@pytest.mark.timeout(120)
def test_a_slow_reader_gets_every_delta_in_order_in_fewer_batches(process_engine):
    async def run():
        expected = await tokens_of(process_engine, "alone", PROMPTS[2], 40)
        batches = []
        stream = process_engine.generate_batches("slow", prompt_token_ids=PROMPTS[2], sampling_params=greedy(40))
        async with aclosing(stream):
            async for batch in stream:
                batches.append(batch)
                await asyncio.sleep(0.05)           # a slow write
        return expected, batches

    expected, batches = asyncio.run(run())
    assert [t for b in batches for d in b for t in d.outputs[0].token_ids] == expected
    assert len(batches) < 40 and batches[-1][-1].finished
    assert all(d.emitted_time is not None for b in batches for d in b)


@pytest.mark.timeout(120)
def test_closing_a_stream_or_a_passed_deadline_frees_its_blocks(process_engine):
    async def run():
        stream = process_engine.generate("closed", prompt_token_ids=PROMPTS[2], sampling_params=greedy(10_000))
        async with aclosing(stream):
            for _ in range(3):
                await stream.__anext__()
        await wait_for(lambda: all_blocks_free(process_engine))
        last = None
        async for last in process_engine.generate("late", prompt_token_ids=PROMPTS[0], sampling_params=greedy(10_000),
                                                  deadline=time.time() + 0.05):
            pass
        await wait_for(lambda: all_blocks_free(process_engine))
        return last

    last = asyncio.run(run())
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert process_engine.num_unfinished == 0


@pytest.mark.timeout(120)
def test_a_bad_request_fails_its_own_stream_only(process_engine):
    async def run():
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await tokens_of(process_engine, "bad", [10**9], 4)
        return await tokens_of(process_engine, "good", PROMPTS[0], 4)

    assert len(asyncio.run(run())) == 4


def test_request_errors_survive_the_pipe():
    err = pickle.loads(pickle.dumps(RequestFailedError("r1", "model step failed: boom")))
    assert isinstance(err, RequestFailedError) and err.request_id == "r1" and "boom" in str(err)


@pytest.mark.timeout(120)
def test_a_killed_engine_process_fails_its_streams_and_the_engine_is_dead(model_dir):
    engine = AsyncEngine(engine_args(model_dir), engine_process=True)
    try:
        async def run():
            stream = engine.generate("long", prompt_token_ids=PROMPTS[2], sampling_params=greedy(10_000))
            async with aclosing(stream):
                await stream.__anext__()
                os.kill(engine.engine_process_pid, signal.SIGKILL)
                start = time.monotonic()
                with pytest.raises(EngineDeadError, match="exited with code"):
                    async for _ in stream:
                        pass
                return time.monotonic() - start

        assert asyncio.run(run()) < 5.0
        assert engine.is_dead and engine.num_unfinished == 0

        async def again():
            await tokens_of(engine, "after", PROMPTS[0], 4)

        with pytest.raises(EngineDeadError):
            asyncio.run(again())
    finally:
        engine.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("engine_process", [True, False], ids=["process", "thread"])
def test_shutdown_ends_running_streams(model_dir, engine_process):
    engine = AsyncEngine(engine_args(model_dir), engine_process=engine_process)
    assert (engine.engine_process_pid is None) == (not engine_process)

    async def run():
        stream = engine.generate("long", prompt_token_ids=PROMPTS[2], sampling_params=greedy(10_000))
        async with aclosing(stream):
            await stream.__anext__()
            stopper = threading.Thread(target=engine.shutdown)
            stopper.start()
            with pytest.raises(EngineShutdownError):
                async for _ in stream:
                    pass
            await asyncio.to_thread(stopper.join)

    asyncio.run(run())
    assert not engine.is_dead

    async def after():
        await tokens_of(engine, "after", PROMPTS[0], 4)

    with pytest.raises(EngineShutdownError):
        asyncio.run(after())


def test_a_model_that_cannot_load_fails_the_constructor(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        AsyncEngine(EngineArgs(model=str(tmp_path / "missing"), backend="cpu"), engine_process=True)


@pytest.mark.timeout(120)
def test_text_and_chat_prompts_are_tokenized_before_they_reach_the_step_loop(process_engine):
    tok = process_engine.tokenizer

    async def run():
        last = None
        async for last in process_engine.generate("text", prompt="hello world", sampling_params=greedy(3)):
            pass
        sent = process_engine._num_submitted
        with pytest.raises(InvalidRequestError, match="role"):
            async for _ in process_engine.generate("bad-chat", messages=[{"content": "no role"}],
                                                   sampling_params=greedy(3)):
                pass
        return last, process_engine._num_submitted - sent

    last, sent = asyncio.run(run())
    assert last.prompt == "hello world" and last.prompt_token_ids == tok.encode("hello world")
    assert sent == 0                                    # refused before anything went to the engine
