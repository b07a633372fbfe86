"""Coalescing of a request's delta outputs while the client is slow to take them.

When the engine steps faster than gRPC writes (small models, fast GPUs,
many streams), deltas queue up behind each write. ``coalesced`` hands the
servicer everything that arrived since the last message, and
``merge_deltas`` folds it into one output, so a backlog costs one message,
not one per token. With no backlog it changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import suppress

from engine.outputs import CompletionOutput, RequestOutput


async def coalesced(source: AsyncIterator) -> AsyncIterator[list]:
    """Yield lists of the items ``source`` produced since the previous list.

    A pump task reads ``source``; closing or cancelling this generator
    cancels the pump, which closes ``source`` (and so aborts the request).
    Errors of ``source`` are raised here, after the items before them.
    """
    buffer: list = []
    ready = asyncio.Event()
    outcome: list[BaseException | None] = []            # set when the source ends

    async def pump() -> None:
        try:
            async for item in source:
                buffer.append(item)
                ready.set()
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            outcome.append(e)
        finally:
            ready.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            if buffer:
                items = buffer[:]
                buffer.clear()
                yield items
            elif outcome:
                if outcome[0] is not None:
                    raise outcome[0]
                return
            else:
                ready.clear()           # nothing pending: sleep until the pump adds or ends
                await ready.wait()
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def merge_deltas(outputs: list[RequestOutput]) -> RequestOutput:
    """One delta output equal to ``outputs`` (consecutive deltas of one request) in turn."""
    if len(outputs) == 1:
        return outputs[0]
    merged: dict[int, CompletionOutput] = {}
    for out in outputs:
        for c in out.outputs:
            into = merged.get(c.index)
            if into is None:
                merged[c.index] = CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason,
                                                   c.stop_reason, None if c.logprobs is None else list(c.logprobs))
                continue
            into.text += c.text
            into.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                into.logprobs = (into.logprobs or []) + list(c.logprobs)
            into.finish_reason, into.stop_reason = c.finish_reason, c.stop_reason
    last = outputs[-1]
    return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids, list(merged.values()),
                         last.finished, last.num_cached_tokens, last.metrics)
