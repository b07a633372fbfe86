"""The engine core in a process of its own (``AsyncEngine(engine_process=True)``).

The child process (started with ``spawn``) builds the ``LLMEngine`` and runs
``EngineLoop`` on its main thread, so the model steps with the GIL to
itself: the server's event loop, gRPC and protobuf run in the parent and
never stall a step, and a step never delays a message. The parent keeps the
tokenizer the child sends once it is ready (for Tokenize, Detokenize and the
HTTP API).

Wire, over one ``multiprocessing`` pipe (pickled frozen dataclasses):

- parent -> child: the commands of ``engine.commands`` (``AddRequest``,
  ``AbortRequest``, then ``Stop`` once); a sender thread writes them, so a
  large prompt never blocks the event loop on a full pipe;
- child -> parent: ``Ready`` or ``LoadFailed`` once; then a ``Tick`` after
  every loop iteration that did something (its items: ``(token, output or
  error)``); ``Dead`` if the loop dies.

A reader thread in the parent dispatches the items to the streams. If the
child exits without saying why (killed, out of memory), the pipe closes and
the engine is dead: every stream fails with ``EngineDeadError`` and health
goes NOT_SERVING. The child ignores SIGINT (a terminal's Ctrl-C reaches the
whole process group; the parent drains and then stops it), and exits when
the parent's end of the pipe closes.
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from common.errors import EngineDeadError, EngineShutdownError
from engine.args import EngineArgs
from engine.commands import Command, Stop
from engine.core import EngineLoop
from engine.core_client import Dispatch, Items, OnDeath, OnExit
from engine.llm_engine import EngineStats, LLMEngine
from engine.model_info import ModelInfo
from engine.tokenizer import Tokenizer

log = structlog.get_logger(__name__)

# How long an idle child waits for a command before checking backend health.
IDLE_POLL_S = 0.1


# -- child -> parent messages ---------------------------------------------------------
# Typed like the commands, though only this module speaks them: a message is
# read by field name, so a field added on one side cannot shift the others.

@dataclass(frozen=True)
class Ready:
    """The engine is built; sent once, before any ``Tick``."""

    model_info: ModelInfo
    tokenizer: Tokenizer          # the parent's copy, for Tokenize, Detokenize and the HTTP API
    stats: EngineStats


@dataclass(frozen=True)
class LoadFailed:
    """Building the engine raised ``error``; the child exits after sending it."""

    error: BaseException          # raised again by the parent's constructor


@dataclass(frozen=True)
class Tick:
    """What one loop iteration produced, and the engine's state after it."""

    items: Items                  # (stream token, delta output or the error that ends it)
    stats: EngineStats
    num_adds_taken: int           # AddRequest commands the loop has taken so far


@dataclass(frozen=True)
class Dead:
    """The loop died of ``error``; its streams were failed in a ``Tick`` before."""

    error: BaseException


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(error).__name__}: {error}")


def _portable_items(items: Items) -> Items:
    return [(t, _portable(x) if isinstance(x, BaseException) else x) for t, x in items]


def run_engine_core(args: EngineArgs, conn, initializer: Callable | None, initializer_args: tuple) -> None:
    """The child's main: build the engine, then loop until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initializer_args)
    try:
        engine = LLMEngine(args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(LoadFailed(_portable(e)))
        return

    def tick(items: Items) -> None:
        conn.send(Tick(_portable_items(items), engine.get_stats(), loop.num_adds_taken))

    loop = EngineLoop(engine, tick)
    try:
        conn.send(Ready(ModelInfo.of(engine), engine.tokenizer, engine.get_stats()))
        _serve(loop, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass                                   # the parent is gone: nobody to serve
    except BaseException as e:  # noqa: BLE001 - the loop must report, never vanish
        log.error("engine_dead", error=repr(e))
        try:
            loop.fail_all(EngineDeadError(f"engine is not serving: {e!r}"))
            conn.send(Dead(_portable(e)))
        except Exception:  # noqa: BLE001 - the parent notices the closed pipe instead
            pass
    finally:
        engine.shutdown()
        conn.close()


def _serve(loop: EngineLoop, conn) -> None:
    """Take what the pipe holds, run one iteration, repeat until a ``Stop``."""
    while not loop.stopped:
        commands: list[Command | Stop] = []
        timeout = 0.0 if loop.has_work else IDLE_POLL_S
        while conn.poll(timeout):
            commands.append(conn.recv())
            if isinstance(commands[-1], Stop):
                break                          # nothing follows a Stop
            timeout = 0.0
        loop.run_once(commands)


class EngineProcess:
    """An ``EngineCoreClient`` whose loop runs in a child process: this is the
    parent's side, which starts the child, sends commands and dispatches
    what comes back."""

    def __init__(self, args: EngineArgs, dispatch: Dispatch, on_death: OnDeath, on_exit: OnExit,
                 initializer: Callable | None = None, initializer_args: tuple = ()):
        """``on_death(error)``: the loop died; ``on_exit(error)``: the child is
        gone, fail every stream it did not end."""
        self._dispatch = dispatch
        self._on_death = on_death
        self._on_exit = on_exit
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        # Not a daemon: a daemonic process may not start the tensor-parallel workers.
        self.process = ctx.Process(target=run_engine_core, name="pagedgen-engine-core",
                                   args=(args, child_conn, initializer, initializer_args))
        self.process.start()
        child_conn.close()
        try:
            msg = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the engine process exited with code {self.process.exitcode} while loading "
                               f"the model (see its log above)") from None
        if isinstance(msg, LoadFailed):
            self.process.join(30)
            raise msg.error
        self.model_info, self.tokenizer, self._stats = msg.model_info, msg.tokenizer, msg.stats
        self.num_adds_taken = 0
        self.stopping = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="pagedgen-engine-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="pagedgen-engine-reader", daemon=True)

    @property
    def pid(self) -> int:
        """The engine process's id."""
        return self.process.pid

    def start(self) -> None:
        """Start the sender and reader threads."""
        self._sender.start()
        self._reader.start()

    def send(self, command: Command | Stop) -> None:
        """Queue ``command`` for the sender thread."""
        self._outbox.put(command)

    def get_stats(self) -> EngineStats:
        """The stats of the child's last ``Tick``."""
        return self._stats

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the child (its streams end with EngineShutdownError) and wait for it."""
        if not self.stopping:
            self.stopping = True
            self._outbox.put(Stop())
        self._sender.join(timeout)
        self._reader.join(timeout)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()

    def _send_loop(self) -> None:
        while True:
            cmd = self._outbox.get()
            try:
                self._conn.send(cmd)
            except (OSError, ValueError):     # the child is gone; the reader reports it
                return
            if isinstance(cmd, Stop):
                return

    def _read_loop(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                msg = self._conn.recv()
                if isinstance(msg, Tick):
                    self._stats, self.num_adds_taken = msg.stats, msg.num_adds_taken
                    if msg.items:
                        self._dispatch(msg.items)
                elif isinstance(msg, Dead):
                    error = msg.error
        except (EOFError, OSError):
            pass
        self.process.join(5)
        if error is None and not self.stopping:
            error = RuntimeError(f"the engine process exited with code {self.process.exitcode}")
        if error is not None:
            self._on_death(error)
        self._on_exit(EngineDeadError(f"engine is not serving: {error!r}") if error is not None
                      else EngineShutdownError("engine stopped"))
