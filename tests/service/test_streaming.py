"""Coalescing of deltas that pile up behind slow writes."""

from __future__ import annotations

import asyncio

import pytest

from engine.outputs import CompletionOutput, RequestOutput
from scheduler.output import Logprobs
from service.streaming import coalesced, merge_deltas


def _delta(text, ids, index=0, finish=None, stop=None, lps=None, finished=False, cached=0):
    return RequestOutput("r", None, [1, 2], [CompletionOutput(index, text, ids, finish, stop, lps)], finished,
                         num_cached_tokens=cached)


def test_merge_deltas_concatenates_each_completion_in_order():
    lp = [Logprobs(5, -1.0, 1)]
    merged = merge_deltas([_delta("a", [5], lps=lp), _delta("x", [9], index=1),
                           _delta("b", [6], lps=lp, cached=2),
                           _delta("c", [7], finish="stop", stop=7, lps=lp, finished=True, cached=2)])
    first, second = merged.outputs
    assert (first.index, first.text, first.token_ids, first.finish_reason, first.stop_reason) == \
        (0, "abc", [5, 6, 7], "stop", 7)
    assert len(first.logprobs) == 3 and second.text == "x" and second.finish_reason is None
    assert merged.finished and merged.num_cached_tokens == 2


def test_merge_deltas_leaves_its_inputs_alone():
    deltas = [_delta("a", [1]), _delta("b", [2])]
    merge_deltas(deltas)
    assert [d.outputs[0].text for d in deltas] == ["a", "b"] and deltas[0].outputs[0].token_ids == [1]


async def _numbers(n, log, fail=None):
    try:
        for i in range(n):
            await asyncio.sleep(0)
            yield i
        if fail:
            raise fail
    finally:
        log.append("closed")


@pytest.mark.timeout(10)
def test_a_slow_consumer_gets_batches_with_every_item_in_order():
    async def run():
        log, batches = [], []
        async for batch in coalesced(_numbers(200, log)):
            batches.append(batch)
            await asyncio.sleep(0.001)               # a slow write
        return log, batches

    log, batches = asyncio.run(run())
    assert [i for b in batches for i in b] == list(range(200))
    assert len(batches) < 100 and log == ["closed"]


@pytest.mark.timeout(10)
def test_errors_come_after_the_items_before_them():
    async def run():
        seen = []
        with pytest.raises(RuntimeError, match="boom"):
            async for batch in coalesced(_numbers(5, [], fail=RuntimeError("boom"))):
                seen += batch
        return seen

    assert asyncio.run(run()) == [0, 1, 2, 3, 4]


@pytest.mark.timeout(10)
def test_closing_the_consumer_closes_the_source():
    async def run():
        log = []
        stream = coalesced(_numbers(10**6, log))
        await stream.__anext__()
        await stream.aclose()
        return log

    assert asyncio.run(run()) == ["closed"]


@pytest.mark.timeout(10)
def test_cancelling_the_consumer_closes_the_source():
    async def run():
        log, started = [], asyncio.Event()

        async def consume():
            async for _ in coalesced(_numbers(10**6, log)):
                started.set()
                await asyncio.sleep(0.01)

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return log

    assert asyncio.run(run()) == ["closed"]
