"""Test-only fault injection into a live engine's backend.

Nothing in the server, the CLI or the API can reach this: a test installs it
on the ``AsyncEngine`` object it built. ``StepFaults`` wraps the real
backend's ``execute`` (an instance attribute shadowing the method): armed, the
next steps (those ``fail_if`` picks) raise ``InjectedFault`` before the
backend runs; ``delay_s`` slows every step down. Each failed step records the request ids (parents of the
scheduled sequences) it carried, read on the engine's loop thread.
"""

from __future__ import annotations

import threading
import time


class InjectedFault(RuntimeError):
    """Raised by an armed ``StepFaults`` in place of a model step."""


class StepFaults:
    def __init__(self, async_engine, *, delay_s: float = 0.0, fail_if=None):
        self.engine = async_engine.engine              # the LLMEngine the loop thread steps
        self.backend = self.engine.backend
        self.delay_s = delay_s
        self.fail_if = fail_if                         # sched -> bool, checked while armed
        self.failed_steps: list[set[str]] = []         # request ids of each failed step
        self.num_steps = 0                             # steps that reached the backend
        self._lock = threading.Lock()
        self._num_armed = 0

    def __enter__(self) -> "StepFaults":
        real = type(self.backend).execute.__get__(self.backend)

        def execute(sched):
            with self._lock:
                self.num_steps += 1
                fail = self._num_armed > 0 and (self.fail_if is None or self.fail_if(sched))
                if fail:
                    self._num_armed -= 1
            if self.delay_s:
                time.sleep(self.delay_s)
            if fail:
                parents = {self.engine.output.by_seq[sr.request_id][0].request_id for sr in sched.scheduled
                           if sr.request_id in self.engine.output.by_seq}
                self.failed_steps.append(parents)
                raise InjectedFault(f"injected fault in step of {len(parents)} request(s)")
            return real(sched)

        self.backend.execute = execute
        return self

    def __exit__(self, *exc) -> None:
        del self.backend.execute                       # the class's method again

    def arm(self, num_steps: int = 1) -> None:
        """Make the next ``num_steps`` steps (that ``fail_if`` accepts) raise."""
        with self._lock:
            self._num_armed += num_steps

    @property
    def failed_request_ids(self) -> set[str]:
        return set().union(*self.failed_steps)
