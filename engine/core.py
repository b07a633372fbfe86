"""The engine core: the step loop that owns an ``LLMEngine``.

``EngineLoop`` is the same code wherever it runs: on a thread of the
``AsyncEngine``'s process (``engine.core_thread``), or on the main thread of an
engine process (``engine.core_process``). It takes commands
(``engine.commands``: add, abort, stop), expires deadlines, steps, and emits
what each iteration produced as one list of ``(token, item)`` pairs, where the
token names the caller's stream (tokens, not request ids, so that aborting an
old stream never ends a new one that reuses its id) and the item is a delta
``RequestOutput`` or the exception that ends the stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from common.errors import EngineShutdownError
from engine.commands import AbortRequest, AddRequest, Command, Stop
from engine.core_client import Dispatch
from engine.llm_engine import LLMEngine, StepFailedError, failed_error

# Consecutive failed steps after which the engine declares itself dead.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineLoop:
    """The loop body; the core that owns it calls ``run_once`` until ``stopped``
    (or until it raises: the engine is dead), from one thread only."""

    def __init__(self, engine: LLMEngine, emit: Dispatch):
        """``emit(items)``: each iteration's ``(token, item)`` pairs, in one call."""
        self.engine = engine
        self.emit = emit
        self._tokens: dict[str, int] = {}          # request id -> its stream's token
        self._deadlines: dict[str, float] = {}     # request id -> time.time() deadline
        self._out: list[tuple[int, object]] = []
        self._failures = 0
        self.num_adds_taken = 0                    # AddRequest commands handled so far
        self.stopped = False                       # a Stop was handled: the loop must end

    @property
    def has_work(self) -> bool:
        """A request is unfinished: the next iteration steps."""
        return self.engine.has_unfinished_requests()

    # -- commands -------------------------------------------------------------------

    def handle(self, commands: Sequence[Command | Stop]) -> None:
        """Take ``commands`` in order. A ``Stop`` ends every stream with
        ``EngineShutdownError`` (the adds after it too) and sets ``stopped``."""
        for i, cmd in enumerate(commands):
            match cmd:
                case AddRequest():
                    self._add(cmd)
                case AbortRequest(token=token, request_id=rid):
                    if rid in self._tokens and (token is None or self._tokens[rid] == token):
                        self._abort(rid)
                case Stop():
                    self.stopped = True
                    self.fail_all(EngineShutdownError("engine stopped"), commands[i + 1:])
                    return
                case _:
                    raise TypeError(f"not an engine command: {cmd!r}")

    def _add(self, cmd: AddRequest) -> None:
        self.num_adds_taken += 1
        rid = cmd.request_id
        try:
            self.engine.add_request(rid, prompt=cmd.prompt, prompt_token_ids=cmd.prompt_token_ids,
                                    messages=cmd.messages, sampling_params=cmd.sampling_params,
                                    cache_salt=cmd.cache_salt, prompt_text=cmd.prompt_text)
        except Exception as e:  # noqa: BLE001 - handed to the caller as its error
            self._out.append((cmd.token, e))
            return
        self._tokens[rid] = cmd.token
        if cmd.deadline is not None:
            self._deadlines[rid] = cmd.deadline

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort_request(request_id)
        if out is not None:
            self._deliver(out)

    def expire_deadlines(self) -> None:
        if not self._deadlines:
            return
        now = time.time()
        for rid in [r for r, d in self._deadlines.items() if d <= now]:
            self._abort(rid)
            self._deadlines.pop(rid, None)

    # -- the loop body ----------------------------------------------------------------

    def run_once(self, commands: Sequence[Command | Stop]) -> bool:
        """One iteration: take ``commands``, expire deadlines, then step if a
        request is unfinished (else check the backend's health). Emits after
        each part that changed something; returns whether a step ran (never
        after a ``Stop``)."""
        self.handle(commands)
        if self.stopped:
            return False
        self.expire_deadlines()
        self.flush(report=bool(commands))
        if not self.has_work:
            self.engine.check_health()         # a dead tensor-parallel worker kills the engine while idle too
            return False
        self.step()
        self.flush(report=True)
        return True

    def step(self) -> None:
        """One model step; raises once steps have failed too often in a row."""
        try:
            outputs = self.engine.step()
            self._failures = 0
        except StepFailedError as e:
            self._failures += 1
            for rid in e.request_ids:
                self._deliver_error(rid, failed_error(rid, e))
            if self._failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            return
        emitted = time.time()
        for out in outputs:
            out.emitted_time = emitted
            self._deliver(out)

    def flush(self, report: bool = False) -> None:
        """Emit everything produced since the last flush in one call; with
        nothing produced, emit an empty list only if ``report`` (the engine's
        state changed: an engine process sends fresh stats with it)."""
        if self._out or report:
            out, self._out = self._out, []
            self.emit(out)

    def _deliver(self, out) -> None:
        token = self._tokens.get(out.request_id)
        if out.finished:
            self._tokens.pop(out.request_id, None)
            self._deadlines.pop(out.request_id, None)
        if token is not None:
            self._out.append((token, out))

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        self._deadlines.pop(request_id, None)
        token = self._tokens.pop(request_id, None)
        if token is not None:
            self._out.append((token, error))

    def fail_all(self, error: BaseException, pending: Iterable[Command | Stop] = ()) -> None:
        """End every stream with ``error``: those running and the adds in ``pending``."""
        for rid in list(self._tokens):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - best effort while dying
                pass
            self._deliver_error(rid, error)
        for cmd in pending:
            if isinstance(cmd, AddRequest):
                self.num_adds_taken += 1
                self._out.append((cmd.token, error))
        self.flush()
