"""Async scheduling: the host finishes step t while the device runs step t+1.

With ``EngineArgs.async_scheduling`` and a backend that ``supports_ahead``
(metal), one ``LLMEngine.step`` in steady decode is::

    S_t in flight (H_t: its pending handle), its requests all sampling
    S_{t+1} = Scheduler.schedule_ahead(S_t)       the same requests, one token each: the one S_t samples
    H_{t+1} = backend.submit(S_{t+1}, previous=H_t)   input ids = H_t's tokens, on the device
    R_t = H_t.result()                             the step's one host synchronisation
    the engine updates the scheduler with R_t, detokenizes and emits it   (the device runs S_{t+1})

so at most one step is in flight between two ``step`` calls. A step goes
ahead only when every request of S_t samples and every running request is
in it, nothing waits to be admitted (admission is never delayed), and no
request's next sampling depends on the pending token: penalties, a grammar,
or the token that reaches ``min_tokens`` (the EOS ban counts outputs, and an
ahead step's rows lack the pending one); nor a top-p request (the metal
sampler's nucleus search reads a flag on the host: one more synchronisation). Otherwise the step runs
synchronously, exactly as without the flag (``Backend.execute``). Requests
that the pending token surely ends (length) are left out of S_{t+1};
those that R_t ends otherwise (EOS, stop ids, stop strings, aborts, time
limits) end at once, and their rows of R_{t+1} are dropped by
``Scheduler.update_from_output``: the tokens are those of the synchronous
engine. A failed step fails the requests of both steps in flight.

Everything runs on the engine's step thread (MLX streams are per thread).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

from backends.base import PendingStep
from backends.sampling_plan import GREEDY_TEMPERATURE
from common.errors import EngineDeadError
from scheduler.output import SchedulerOutput, StepResult

log = structlog.get_logger(__name__)


@dataclass
class InFlight:
    """A submitted step whose result the engine has not taken yet."""

    sched: SchedulerOutput
    pending: PendingStep
    scheduled_at: float                 # time.time() when it was laid out


class StepPipeline:
    """Runs the engine's steps, going ahead where it may (see the module docstring)."""

    def __init__(self, engine: Any, enabled: bool) -> None:
        """``engine``: the ``LLMEngine`` it steps (its scheduler, backend, structured outputs, ``_fail_step``)."""
        self.engine = engine
        self.enabled = bool(enabled and getattr(engine.backend, "supports_ahead", False))
        self.inflight: InFlight | None = None
        self.num_ahead_steps = 0          # steps laid out and submitted ahead
        self._thread: int | None = None   # the step thread (the one that submitted the step in flight)

    def run(self) -> tuple[SchedulerOutput, StepResult, float] | None:
        """One step: the completed step's ``(schedule, result, scheduled_at)``; None when nothing ran.

        Raises the engine's ``StepFailedError`` (both steps in flight failed)
        or ``EngineDeadError``.
        """
        e = self.engine
        current, self.inflight = self.inflight, None
        if current is None:
            sched = e.scheduler.schedule()
            if sched.is_empty and not (sched.finished_request_ids or sched.preempted_request_ids):
                return None
            scheduled_at = time.time()
            e.structured.fill(sched)      # grammar bitmasks of the constrained rows (drops ended sequences)
            go_ahead = self.may_go_ahead(sched)
            try:
                if not go_ahead:
                    return sched, e.backend.execute(sched), scheduled_at
                current = InFlight(sched, e.backend.submit(sched), scheduled_at)
            except EngineDeadError:
                raise                      # fatal (e.g. a tensor-parallel rank died): the engine stops
            except Exception as err:  # noqa: BLE001 - a device failure fails this step's requests only
                raise e._fail_step([sched], err) from err
        try:
            if self.may_go_ahead(current.sched):
                ahead = e.scheduler.schedule_ahead(current.sched)
                if ahead is not None:
                    e.structured.fill(ahead)
                    self.inflight = InFlight(ahead, None, time.time())       # failed with current if submit raises
                    self.inflight.pending = e.backend.submit(ahead, previous=current.pending)
                    self.num_ahead_steps += 1
                    self._thread = threading.get_ident()
            result = current.pending.result()
        except EngineDeadError:
            raise
        except Exception as err:  # noqa: BLE001 - fails the requests of both steps in flight
            steps = [current.sched] + ([self.inflight.sched] if self.inflight is not None else [])
            self.inflight = None
            raise e._fail_step(steps, err) from err
        return current.sched, result, current.scheduled_at

    def may_go_ahead(self, sched: SchedulerOutput) -> bool:
        """Whether the step after ``sched`` (laid out, not yet updated) may be laid out before its result."""
        e = self.engine
        scheduler = e.scheduler
        if not self.enabled or not sched.scheduled or scheduler.waiting:
            return False
        ids = {sr.request_id for sr in sched.scheduled}
        if any(r.request_id not in ids for r in scheduler.running):
            return False                  # a running request this step left out (token budget) would starve
        for sr in sched.scheduled:
            if not sr.needs_sample or sr.needs_prompt_logprobs:
                return False
            request = scheduler.requests.get(sr.request_id)
            if request is None:
                continue                  # ended since: the ahead step leaves it out
            p = sr.sampling_params
            if p is None:
                continue
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                return False              # penalties count the pending token
            if p.structured_outputs is not None or e.structured.is_constrained(sr.request_id):
                return False              # the grammar's mask needs the pending token
            if p.top_p < 1.0 and not (p.temperature < GREEDY_TEMPERATURE or p.top_k == 1):
                return False              # the nucleus search reads a flag on the host: a second synchronisation
            # The min_tokens ban of the step after counts the pending token, which the ahead rows lack:
            # the two agree unless the pending token is the one that reaches min_tokens.
            if request.num_output_tokens + 1 == p.min_tokens:
                return False
        return True

    def drain(self) -> None:
        """Wait for the step in flight, if any, and drop its result (its requests have ended, or the
        engine is shutting down). On another thread than the step thread the handle is only dropped:
        MLX arrays are evaluated on the thread that built them."""
        current, self.inflight = self.inflight, None
        if current is None or current.pending is None:
            return
        if self._thread is not None and self._thread != threading.get_ident():
            log.info("pipeline_drop_in_flight", num_requests=len(current.sched.scheduled))
            return
        try:
            current.pending.result()
        except Exception as err:  # noqa: BLE001 - nobody waits for this step any more
            log.warning("pipeline_drain_failed", error=repr(err))
