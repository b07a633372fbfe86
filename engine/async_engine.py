"""The engine for servers: the step loop on its own thread, asyncio streams out.

Callers on an event loop submit requests and read delta outputs through an
async generator; the loop thread owns the ``LLMEngine`` and is the only one
that touches it. Commands (add, abort) travel to it through a queue; outputs
travel back through ``loop.call_soon_threadsafe`` into per-request queues,
so a model step never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from engine.args import EngineArgs
from engine.errors import EngineDeadError, EngineShutdownError, QueueFullError
from engine.llm_engine import EngineStats, LLMEngine, StepFailedError, failed_error
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = structlog.get_logger(__name__)

# Consecutive failed steps after which the engine declares itself dead.
MAX_CONSECUTIVE_STEP_FAILURES = 3


@dataclass(frozen=True)
class ModelInfo:
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    num_kv_blocks: int
    backend: str
    dtype: str


class _Sink:
    """Where the loop thread delivers one request's outputs."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:      # the caller's loop is closed: nobody listens any more
            pass


class AsyncEngine:
    def __init__(self, args: EngineArgs, *, engine: LLMEngine | None = None):
        self.args = args
        self.engine = engine or LLMEngine(args)
        self.tokenizer = self.engine.tokenizer
        sched = self.engine.scheduler.config
        self.model_info = ModelInfo(
            model=self.engine.model.name, max_model_len=self.engine.max_model_len,
            vocab_size=self.tokenizer.vocab_size, eos_token_ids=tuple(self.tokenizer.eos_token_ids),
            block_size=sched.block_size, num_kv_blocks=sched.num_kv_blocks,
            backend=self.engine.backend_name, dtype=args.dtype,
        )
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, _Sink] = {}          # owned by the loop thread
        self._deadlines: dict[str, float] = {}      # owned by the loop thread
        self._num_submitted = 0                     # adds sent (written by callers' loop only)
        self._num_taken = 0                         # adds taken (written by the loop thread only)
        self._draining = False
        self._stopping = False
        self.is_dead = False
        self.dead_error: BaseException | None = None
        # Called on the loop thread with every delta output delivered (e.g. service.metrics).
        self.output_observers: list[Callable[[RequestOutput], None]] = []
        self._thread = threading.Thread(target=self._run, name="pagedgen-engine", daemon=True)
        self._thread.start()

    # -- caller side (any event loop) ------------------------------------------

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    @property
    def _num_pending(self) -> int:
        return self._num_submitted - self._num_taken

    @property
    def num_unfinished(self) -> int:
        return len(self._sinks) + self._num_pending

    async def generate(self, request_id: str, *, prompt: str | None = None,
                       prompt_token_ids: list[int] | None = None, messages: list[dict] | None = None,
                       sampling_params: SamplingParams | None = None, cache_salt: str | None = None,
                       deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        """Stream delta outputs of one request; closing the stream aborts it."""
        if self.is_dead:
            raise EngineDeadError(f"engine is not serving: {self.dead_error!r}")
        if self._draining or self._stopping:
            raise EngineShutdownError("server is shutting down; retry on another replica")
        max_queue = self.args.max_queue
        if max_queue is not None and self.engine.scheduler.num_waiting + self._num_pending >= max_queue:
            raise QueueFullError(f"request queue is full ({max_queue} waiting); retry later")
        sink = _Sink(asyncio.get_running_loop())
        kwargs = dict(prompt=prompt, prompt_token_ids=prompt_token_ids, messages=messages,
                      sampling_params=sampling_params, cache_salt=cache_salt)
        self._num_submitted += 1
        self._commands.put(("add", request_id, sink, kwargs, deadline))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._commands.put(("abort", request_id, sink))
                self._wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))
        self._wake.set()

    def begin_drain(self) -> None:
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.num_unfinished and time.monotonic() < end:
            await asyncio.sleep(0.02)
        return not self.num_unfinished

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # -- loop thread -------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stopping:
                self._take_commands()
                self._expire_deadlines()
                if not self.engine.has_unfinished_requests():
                    self.engine.check_health()          # a dead worker kills the engine while idle too
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                    failures = 0
                except StepFailedError as e:
                    failures += 1
                    for rid in e.request_ids:
                        self._deliver_error(rid, failed_error(rid, e))
                    if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                        raise
                    continue
                for out in outputs:
                    self._deliver(out)
        except BaseException as e:  # noqa: BLE001 - the loop must report, never vanish
            self.is_dead, self.dead_error = True, e
            log.error("engine_dead", error=repr(e))
        finally:
            self._fail_all()

    def _pending_commands(self):
        """Every command queued so far, oldest first, without blocking."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort_request(request_id)
        if out is not None:
            self._deliver(out)

    def _take_commands(self) -> None:
        for cmd in self._pending_commands():
            if cmd[0] == "add":
                _, rid, sink, kwargs, deadline = cmd
                self._num_taken += 1
                try:
                    self.engine.add_request(rid, **kwargs)
                except Exception as e:  # noqa: BLE001 - handed to the caller as its error
                    sink.put(e)
                    continue
                self._sinks[rid] = sink
                if deadline is not None:
                    self._deadlines[rid] = deadline
            else:
                _, rid, sink = cmd
                if rid in self._sinks and (sink is None or self._sinks[rid] is sink):
                    self._abort(rid)

    def _expire_deadlines(self) -> None:
        if not self._deadlines:
            return
        now = time.time()
        for rid in [r for r, d in self._deadlines.items() if d <= now]:
            self._abort(rid)
            self._deadlines.pop(rid, None)

    def _deliver(self, out: RequestOutput) -> None:
        for observe in self.output_observers:
            try:
                observe(out)
            except Exception:  # noqa: BLE001 - an observer never stops the loop
                log.warning("output_observer_failed", exc_info=True)
        sink = self._sinks.get(out.request_id)
        if out.finished:
            self._sinks.pop(out.request_id, None)
            self._deadlines.pop(out.request_id, None)
        if sink is not None:
            sink.put(out)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        self._deadlines.pop(request_id, None)
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink.put(error)

    def _fail_all(self) -> None:
        err = (EngineDeadError(f"engine is not serving: {self.dead_error!r}") if self.is_dead
               else EngineShutdownError("engine stopped"))
        for rid in list(self._sinks):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - best effort while dying
                pass
            self._deliver_error(rid, err)
        for cmd in self._pending_commands():
            if cmd[0] == "add":
                self._num_taken += 1
                cmd[2].put(err)
