"""The contract between ``AsyncEngine`` and the engine core it drives.

An engine core owns the step loop (``engine.core.EngineLoop``) and the
``LLMEngine`` under it; the ``AsyncEngine`` owns the streams. Two cores
implement this protocol:

- ``engine.core_thread.EngineThread``: the loop on a thread of this process;
- ``engine.core_process.EngineProcess``: the loop on the main thread of an
  engine process of its own; this process keeps only the tokenizer.

A core is built with three callbacks, each called from the core's own thread
(the loop thread, or the process core's reader thread), never from the
caller's event loop:

- ``dispatch(items)``: one loop iteration's ``(token, item)`` pairs, where an
  item is a delta ``RequestOutput`` or the exception that ends that stream;
- ``on_death(error)``: the loop died of ``error`` (the engine is dead);
- ``on_exit(error)``: the core answers no more; every stream it did not end
  must end with ``error`` (``EngineShutdownError`` after ``shutdown``,
  ``EngineDeadError`` after a death).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from engine.commands import Command
    from engine.llm_engine import EngineStats
    from engine.model_info import ModelInfo
    from engine.outputs import RequestOutput
    from engine.tokenizer import Tokenizer

# One loop iteration's results: (stream token, delta output or the error that ends the stream).
Items = list[tuple[int, "RequestOutput | BaseException"]]
Dispatch = Callable[[Items], None]
OnDeath = Callable[[BaseException], None]
OnExit = Callable[[BaseException], None]


@runtime_checkable
class EngineCoreClient(Protocol):
    """What ``AsyncEngine`` may ask of an engine core, and nothing more.

    Once the constructor returns, the model is loaded (or the constructor
    raised why not) and ``model_info`` and ``tokenizer`` are set; no command
    is taken before ``start``.
    """

    model_info: ModelInfo     # the served model, read once the engine was built
    tokenizer: Tokenizer      # a tokenizer in the caller's process (for Tokenize and the HTTP API)
    stopping: bool            # shutdown() was called: new requests must be refused (read by any thread)

    @property
    def num_adds_taken(self) -> int:
        """``AddRequest`` commands the loop has taken so far; with the number
        sent, the caller counts the requests still on their way (for the queue
        limit). Read from any thread; it only grows."""
        ...

    @property
    def pid(self) -> int | None:
        """The engine process's id, or None when the loop runs in this process."""
        ...

    def start(self) -> None:
        """Begin taking commands and dispatching outputs. Called once, by the
        ``AsyncEngine``'s constructor, after the core is built."""
        ...

    def send(self, command: Command) -> None:
        """Queue ``command`` for the loop; never blocks. Called from any thread
        (callers' event loops); commands reach the loop in the order sent.
        The core owns the command from here: an ``AddRequest``'s outputs come
        back through ``dispatch``, an ``AbortRequest`` for a stream already
        ended is ignored."""
        ...

    def get_stats(self) -> EngineStats:
        """The scheduler's counts: live for the thread core, as of the last
        loop iteration that changed something for the process core. Called
        from any thread; never blocks on the loop."""
        ...

    def shutdown(self) -> None:
        """Stop the loop (commands sent before are handled, then every open
        stream ends with ``EngineShutdownError``), wait for it, and release the
        engine and its backend. Called once, from the thread that owns the
        ``AsyncEngine`` (not the loop's); returns once ``on_exit`` was called,
        or after a timeout if the loop is stuck."""
        ...
