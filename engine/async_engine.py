"""The engine for servers: the step loop off the event loop, asyncio streams out.

Callers on an event loop submit requests and read delta outputs through an
async generator. The step loop (``engine.core.EngineLoop``) runs in an engine
core, which this class drives only through ``engine.core_client.EngineCoreClient``:

- on a thread of this process (``engine.core_thread``; the default here, and
  what tests that reach into the ``LLMEngine`` use), or
- in an engine process of its own (``engine_process=True``, what
  ``pagedgen serve`` runs): its main thread steps the model, so neither the
  GIL nor a busy event loop ever holds a step back, and this process keeps
  only the tokenizer (``engine.core_process``).

Commands (``engine.commands``: add, abort) travel to the loop in order; each
loop iteration's outputs come back as one batch, handed to each caller's
event loop in one call, so a step wakes a loop once, not once per request.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass

import structlog

from common.errors import EngineDeadError, EngineShutdownError, QueueFullError
from engine.args import EngineArgs
from engine.commands import AbortRequest, AddRequest
from engine.core_client import EngineCoreClient
from engine.core_process import EngineProcess
from engine.core_thread import EngineThread
from engine.llm_engine import EngineStats, LLMEngine, encode_prompt
from engine.model_info import ModelInfo
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = structlog.get_logger(__name__)


@dataclass
class _Sink:
    """Where one stream's items land: a queue read on its caller's loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    request_id: str = ""                        # the caller's id of the stream's request


def _put_all(pairs: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in pairs:
        q.put_nowait(item)


class AsyncEngine:
    def __init__(self, args: EngineArgs, *, engine: LLMEngine | None = None, engine_process: bool = False,
                 process_initializer: Callable | None = None, initializer_args: tuple = ()):
        """``process_initializer(*initializer_args)`` runs first in an engine
        process (e.g. to set up logging); it must be importable by name."""
        self.args = args
        self._sinks: dict[int, _Sink] = {}          # stream token -> sink; written by callers, popped by dispatch
        self._tokens = itertools.count(1)
        self._num_submitted = 0                     # adds sent (written by callers' loop only)
        self._draining = False
        self._exit_error: BaseException | None = None     # set once the core answers no more
        self.is_dead = False
        self.dead_error: BaseException | None = None
        # Called with every delta output delivered (e.g. service.metrics), on the
        # thread that dispatches outputs (the loop thread, or the process reader).
        self.output_observers: list[Callable[[RequestOutput], None]] = []
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedgen-tokenizer")
        self._core: EngineCoreClient
        if engine_process:
            if engine is not None:
                raise ValueError("an engine process builds its own LLMEngine; do not pass one")
            self.engine: LLMEngine | None = None
            self._core = EngineProcess(args, self._dispatch, self._on_death, self._on_exit,
                                       process_initializer, initializer_args)
        else:
            self.engine = engine or LLMEngine(args)
            self._core = EngineThread(self.engine, self._dispatch, self._on_death, self._on_exit)
        self.tokenizer = self._core.tokenizer
        self.model_info: ModelInfo = self._core.model_info
        self._core.start()

    # -- caller side (any event loop) ------------------------------------------

    def get_stats(self) -> EngineStats:
        return self._core.get_stats()

    @property
    def engine_process_pid(self) -> int | None:
        return self._core.pid

    @property
    def _num_pending(self) -> int:
        return self._num_submitted - self._core.num_adds_taken

    @property
    def num_unfinished(self) -> int:
        return len(self._sinks)

    async def generate(self, request_id: str, **kwargs) -> AsyncIterator[RequestOutput]:
        """Stream delta outputs of one request; closing the stream aborts it.
        Takes the keyword arguments of ``generate_batches``."""
        async with aclosing(self.generate_batches(request_id, **kwargs)) as batches:
            async for batch in batches:
                for out in batch:
                    yield out

    async def generate_batches(self, request_id: str, *, prompt: str | None = None,
                               prompt_token_ids: list[int] | None = None, messages: list[dict] | None = None,
                               sampling_params: SamplingParams | None = None, cache_salt: str | None = None,
                               deadline: float | None = None) -> AsyncIterator[list[RequestOutput]]:
        """Stream one request's delta outputs in lists: each list holds every
        delta that arrived since the previous one (one, unless the reader
        fell behind), so a slow writer sends a backlog as one message.
        Closing the stream aborts the request; an error ends it after the
        deltas before it."""
        if self.is_dead:
            raise EngineDeadError(f"engine is not serving: {self.dead_error!r}")
        if self._draining or self._core.stopping:
            raise EngineShutdownError("server is shutting down; retry on another replica")
        max_queue = self.args.max_queue
        if max_queue is not None and self._core.get_stats().num_waiting + self._num_pending >= max_queue:
            raise QueueFullError(f"request queue is full ({max_queue} waiting); retry later")
        prompt_text = None
        if prompt_token_ids is None and (prompt is None) != (messages is None):
            # Tokenized here, not in the step loop: a long prompt never stalls the other streams.
            prompt_token_ids = await self.run_tokenizer(encode_prompt, self.tokenizer, prompt, messages)
            prompt_text, prompt, messages = prompt, None, None
        token = next(self._tokens)
        add = AddRequest(token, request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, messages=messages,
                         sampling_params=sampling_params, cache_salt=cache_salt, prompt_text=prompt_text,
                         deadline=deadline)
        sink = self._sinks[token] = _Sink(asyncio.get_running_loop(), asyncio.Queue(), request_id)
        self._num_submitted += 1
        self._core.send(add)
        if self._exit_error is not None:     # the loop ended while this was on its way: nobody will answer
            self._dispatch([(token, self._exit_error)])
        finished = False
        try:
            while not finished:
                batch = [await sink.queue.get()]
                while not sink.queue.empty():
                    batch.append(sink.queue.get_nowait())
                error = batch[-1] if isinstance(batch[-1], BaseException) else None
                if error is not None:
                    batch.pop()
                finished = error is not None or batch[-1].finished
                if batch:
                    yield batch
                if error is not None:
                    raise error
        finally:
            if not finished:
                self._core.send(AbortRequest(token, request_id))

    async def run_tokenizer(self, fn: Callable, *args):
        """``fn(*args)`` on the engine's tokenizer thread: off the event loop,
        and one call at a time (a fast tokenizer is not safe to encode with
        from several threads at once)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, functools.partial(fn, *args))

    def abort(self, request_id: str) -> None:
        self._core.send(AbortRequest(None, request_id))

    def abort_in_flight(self, request_ids) -> list[str]:
        """Abort each of ``request_ids`` that has an open stream (once each);
        returns those, in order. Their streams end with finish reason "abort"."""
        open_ids = {s.request_id for s in list(self._sinks.values())}
        aborted = [rid for rid in dict.fromkeys(request_ids) if rid in open_ids]
        for rid in aborted:
            self.abort(rid)
        return aborted

    def begin_drain(self) -> None:
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.num_unfinished and time.monotonic() < end:
            await asyncio.sleep(0.02)
        return not self.num_unfinished

    def shutdown(self) -> None:
        self._core.shutdown()
        self._tokenizer_thread.shutdown(wait=False)

    # -- dispatch (the loop thread, or the engine process's reader thread) ---------

    def _dispatch(self, items: list[tuple[int, object]]) -> None:
        """Hand one iteration's items to their streams: one call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for token, item in items:
            if isinstance(item, RequestOutput):
                for observe in self.output_observers:
                    try:
                        observe(item)
                    except Exception:  # noqa: BLE001 - an observer never stops the loop
                        log.warning("output_observer_failed", exc_info=True)
                done = item.finished
            else:
                done = True
            sink = self._sinks.pop(token, None) if done else self._sinks.get(token)
            if sink is not None:
                by_loop.setdefault(sink.loop, []).append((sink.queue, item))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, pairs)
            except RuntimeError:      # the caller's loop is closed: nobody listens any more
                pass

    def _on_death(self, error: BaseException) -> None:
        self.dead_error, self.is_dead = error, True
        log.error("engine_dead", error=repr(error))

    def _on_exit(self, error: BaseException) -> None:
        """The core answers no more: end every stream it did not end. A stream
        registered after this sweep sees ``_exit_error`` and ends itself."""
        self._exit_error = error
        self._dispatch([(token, error) for token in list(self._sinks)])

