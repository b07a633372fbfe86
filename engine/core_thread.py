"""The engine core on a thread of this process (``AsyncEngine(engine_process=False)``).

The default for an ``AsyncEngine`` built in code, and what tests that reach
into the ``LLMEngine`` use: the loop shares this process (and its GIL) with
the caller, so the caller's event loop and the model step take turns.
Commands travel through a queue; a wake event ends an idle wait early.
"""

from __future__ import annotations

import queue
import threading

from common.errors import EngineDeadError, EngineShutdownError
from engine.commands import Command, Stop
from engine.core import EngineLoop
from engine.core_client import Dispatch, OnDeath, OnExit
from engine.llm_engine import EngineStats, LLMEngine
from engine.model_info import ModelInfo

# How long an idle loop waits for a command before checking backend health.
IDLE_WAIT_S = 0.1


class EngineThread:
    """An ``EngineCoreClient`` whose loop runs on a daemon thread here."""

    def __init__(self, engine: LLMEngine, dispatch: Dispatch, on_death: OnDeath, on_exit: OnExit):
        self.engine = engine
        self.loop = EngineLoop(engine, dispatch)
        self.model_info = ModelInfo.of(engine)
        self.tokenizer = engine.tokenizer
        self.stopping = False
        self._on_death = on_death
        self._on_exit = on_exit
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pagedgen-engine", daemon=True)

    @property
    def num_adds_taken(self) -> int:
        """See ``EngineCoreClient.num_adds_taken``."""
        return self.loop.num_adds_taken

    @property
    def pid(self) -> None:
        """None: the loop runs in this process."""
        return None

    def start(self) -> None:
        """Start the loop thread."""
        self._thread.start()

    def send(self, command: Command | Stop) -> None:
        """Queue ``command`` and wake the loop if it idles."""
        self._commands.put(command)
        self._wake.set()

    def get_stats(self) -> EngineStats:
        """The scheduler's counts now (read across threads; each is one attribute read)."""
        return self.engine.get_stats()

    def shutdown(self) -> None:
        """Send ``Stop``, wait for the loop to end it, then release the backend."""
        if not self.stopping:
            self.stopping = True
            self.send(Stop())
        self._thread.join(timeout=30)
        self.engine.shutdown()

    def _pending(self) -> list[Command | Stop]:
        out = []
        while True:
            try:
                out.append(self._commands.get_nowait())
            except queue.Empty:
                return out

    def _run(self) -> None:
        loop = self.loop
        error: BaseException = EngineShutdownError("engine stopped")
        try:
            while not loop.stopped:
                if not loop.run_once(self._pending()) and not loop.stopped:
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - the loop must report, never vanish
            self._on_death(e)
            error = EngineDeadError(f"engine is not serving: {e!r}")
        finally:
            loop.fail_all(error, self._pending())       # commands that arrived after the Stop, or the death
            self._on_exit(error)
