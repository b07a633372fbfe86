"""The engine core: the step loop that owns an ``LLMEngine``.

``EngineLoop`` is the same code wherever it runs: on the ``AsyncEngine``'s
thread, or on the main thread of an engine process (``engine.core_process``).
It takes commands (add, abort), expires deadlines, steps, and emits what
each iteration produced as one list of ``(token, item)`` pairs, where the
token names the caller's stream (tokens, not request ids, so that aborting an
old stream never ends a new one that reuses its id) and the item is a delta
``RequestOutput`` or the exception that ends the stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from engine.llm_engine import LLMEngine, StepFailedError, failed_error

# Consecutive failed steps after which the engine declares itself dead.
MAX_CONSECUTIVE_STEP_FAILURES = 3

Emit = Callable[[list[tuple[int, object]]], None]


class EngineLoop:
    def __init__(self, engine: LLMEngine, emit: Emit):
        self.engine = engine
        self.emit = emit
        self._tokens: dict[str, int] = {}          # request id -> its stream's token
        self._deadlines: dict[str, float] = {}     # request id -> time.time() deadline
        self._out: list[tuple[int, object]] = []
        self._failures = 0
        self.num_adds_taken = 0                    # add commands handled so far

    @property
    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    # -- commands -------------------------------------------------------------------

    def handle(self, commands: Iterable[tuple]) -> None:
        """``("add", token, request_id, kwargs, deadline)`` or ``("abort", token | None, request_id)``."""
        for cmd in commands:
            if cmd[0] == "add":
                _, token, rid, kwargs, deadline = cmd
                self.num_adds_taken += 1
                try:
                    self.engine.add_request(rid, **kwargs)
                except Exception as e:  # noqa: BLE001 - handed to the caller as its error
                    self._out.append((token, e))
                    continue
                self._tokens[rid] = token
                if deadline is not None:
                    self._deadlines[rid] = deadline
            else:
                _, token, rid = cmd
                if rid in self._tokens and (token is None or self._tokens[rid] == token):
                    self._abort(rid)

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

    def run_once(self, commands: list[tuple]) -> bool:
        """One iteration: take ``commands``, expire deadlines, then step if a
        request is unfinished (else check the backend's health). Emits after
        each part that changed something; returns whether a step ran."""
        self.handle(commands)
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

    def fail_all(self, error: BaseException, pending: Iterable[tuple] = ()) -> None:
        """End every stream with ``error``: those running and the adds in ``pending``."""
        for rid in list(self._tokens):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - best effort while dying
                pass
            self._deliver_error(rid, error)
        for cmd in pending:
            if cmd[0] == "add":
                self.num_adds_taken += 1
                self._out.append((cmd[1], error))
        self.flush()
