"""The engine requests of one API call, read as one stream.

A completion call may carry several prompts; each becomes its own engine
request (``<call id>-<i>``; a call of one prompt runs under the call's id
itself, so that aborting the X-Request-Id aborts it) and all run concurrently. ``EngineRun.start``
submits them and waits for each one's first output, so that a request the
engine refuses (too long, queue full, shutting down) fails with its HTTP
status before any byte of the answer is sent. ``batches`` then yields what
arrived since the previous batch, per prompt, merged (a slow reader costs
one SSE event per backlog, not one per token). Closing the run, or
cancelling the task reading it, aborts every request still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from service.streaming import merge_deltas

_END = object()         # a prompt's stream ended


class EngineRun:
    def __init__(self, engine, request_id: str, inputs: list[dict[str, Any]], params: SamplingParams):
        self.request_id = request_id
        ids = [request_id] if len(inputs) == 1 else [f"{request_id}-{i}" for i in range(len(inputs))]
        self._streams = [engine.generate(rid, sampling_params=params, **inp) for rid, inp in zip(ids, inputs)]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending: list[tuple[int, Any]] = []
        self._tasks: list[asyncio.Task] = []
        self._num_open = len(self._streams)

    async def start(self) -> None:
        """Submit every prompt; return once each produced an output or ended.
        Raises the first error the engine gives (after aborting the others)."""
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self._streams)]
        seen: set[int] = set()
        try:
            while len(seen) < len(self._streams):
                i, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                self._pending.append((i, item))
                seen.add(i)
        except BaseException:
            await self.close()
            raise

    async def batches(self) -> AsyncIterator[dict[int, RequestOutput]]:
        """Prompt index -> one delta output merging everything new for it."""
        try:
            while self._num_open:
                if not self._pending:
                    self._pending.append(await self._queue.get())
                while not self._queue.empty():
                    self._pending.append(self._queue.get_nowait())
                items, self._pending = self._pending, []
                by_prompt: dict[int, list[RequestOutput]] = {}
                for i, item in items:
                    if item is _END:
                        self._num_open -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        by_prompt.setdefault(i, []).append(item)
                if by_prompt:
                    yield {i: merge_deltas(outs) for i, outs in sorted(by_prompt.items())}
        finally:
            await self.close()

    async def _pump(self, i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream):
                async for out in stream:
                    self._queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            self._queue.put_nowait((i, e))
            return
        self._queue.put_nowait((i, _END))

    async def close(self) -> None:
        """Abort whatever still runs (cancelling a pump closes its engine stream)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class UsageCounter:
    """Token counts of a run: the prompt and cached tokens once per prompt,
    the completion tokens of all its ``n`` completions."""

    prompt_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.prompt_tokens[prompt_index] = len(out.prompt_token_ids)
        self.cached_tokens[prompt_index] = out.num_cached_tokens
        self.completion_tokens += out.num_generated_tokens

    def to_dict(self) -> dict[str, Any]:
        prompt = sum(self.prompt_tokens.values())
        return dict(prompt_tokens=prompt, completion_tokens=self.completion_tokens,
                    total_tokens=prompt + self.completion_tokens,
                    prompt_tokens_details=dict(cached_tokens=sum(self.cached_tokens.values())))
