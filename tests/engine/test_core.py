"""The engine core's contract: typed commands that survive the pipe, the loop
that dispatches on them (streams named by token, deadlines, a stop that ends
everything behind it), and the thread core as an ``EngineCoreClient``. The
process core runs the same loop; tests/engine/test_async_engine.py drives it."""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time

import pytest

from common.errors import EngineShutdownError, InvalidRequestError
from engine.args import EngineArgs
from engine.commands import AbortRequest, AddRequest, Stop
from engine.core import EngineLoop
from engine.core_client import EngineCoreClient
from engine.core_thread import EngineThread
from engine.llm_engine import LLMEngine
from engine.model_info import ModelInfo
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from tests.factories import make_tiny_hf_model

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama"))


@pytest.fixture
def engine(model_dir):
    engine = LLMEngine(EngineArgs(model=model_dir, backend="cpu", num_kv_blocks=64, block_size=16, max_num_seqs=16,
                                  seed=0, num_threads=1))
    yield engine
    engine.shutdown()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def add(token: int, request_id: str, max_tokens: int = 4, **kwargs) -> AddRequest:
    return AddRequest(token, request_id, prompt_token_ids=PROMPT, sampling_params=greedy(max_tokens), **kwargs)


class Emitted:
    """The loop's emit callback: every (token, item) pair, in order."""

    def __init__(self):
        self.items: list[tuple[int, object]] = []

    def __call__(self, items: list[tuple[int, object]]) -> None:
        self.items.extend(items)

    def of(self, token: int) -> list[object]:
        return [item for t, item in self.items if t == token]


def run_to_idle(loop: EngineLoop, commands: list) -> None:
    loop.run_once(commands)
    while loop.has_work:
        loop.run_once([])


def generated(items: list[object]) -> list[int]:
    return [t for out in items for c in out.outputs for t in c.token_ids]


# -- commands -------------------------------------------------------------------------

def test_commands_are_frozen_and_survive_the_pipe():
    commands = [add(3, "r", cache_salt="s", prompt_text="hi", deadline=time.time() + 5),
                AddRequest(4, "chat", messages=[{"role": "user", "content": "hi"}]),
                AbortRequest(3, "r"), AbortRequest(None, "r"), Stop()]
    assert [pickle.loads(pickle.dumps(c)) for c in commands] == commands
    with pytest.raises(dataclasses.FrozenInstanceError):
        commands[0].request_id = "other"


@pytest.mark.parametrize("build", [
    lambda: AddRequest(-1, "r"),
    lambda: AddRequest("1", "r"),
    lambda: AddRequest(True, "r"),
    lambda: AddRequest(1, "r", deadline="soon"),
    lambda: AbortRequest(-2, "r"),
], ids=["negative-token", "str-token", "bool-token", "str-deadline", "negative-abort-token"])
def test_a_malformed_command_is_refused_where_it_is_built(build):
    with pytest.raises(ValueError):
        build()


# -- the loop ---------------------------------------------------------------------------

def test_an_add_streams_deltas_under_its_token_until_it_finishes(engine):
    emitted = Emitted()
    loop = EngineLoop(engine, emitted)
    run_to_idle(loop, [add(7, "a", max_tokens=5, prompt_text="the text")])
    outs = emitted.of(7)
    assert all(isinstance(o, RequestOutput) for o in outs) and [t for t, _ in emitted.items] == [7] * len(outs)
    assert len(generated(outs)) == 5 and outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].prompt == "the text"                   # prompt_text is echoed as the prompt
    assert loop.num_adds_taken == 1


def test_an_abort_for_an_ended_stream_never_ends_a_new_one_with_the_same_id(engine):
    emitted = Emitted()
    loop = EngineLoop(engine, emitted)
    run_to_idle(loop, [add(1, "same")])
    loop.run_once([add(2, "same", max_tokens=10_000), AbortRequest(1, "same")])
    assert loop.has_work and not any(o.finished for o in emitted.of(2))
    loop.run_once([AbortRequest(2, "same")])
    last = emitted.of(2)[-1]
    assert last.finished and last.outputs[0].finish_reason == "abort" and not loop.has_work


def test_an_abort_without_a_token_ends_whichever_stream_runs_the_id(engine):
    emitted = Emitted()
    loop = EngineLoop(engine, emitted)
    loop.run_once([add(5, "r", max_tokens=10_000)])
    loop.run_once([AbortRequest(None, "r")])
    assert emitted.of(5)[-1].outputs[0].finish_reason == "abort" and not loop.has_work


def test_a_passed_deadline_aborts_the_request(engine):
    emitted = Emitted()
    loop = EngineLoop(engine, emitted)
    run_to_idle(loop, [add(1, "late", max_tokens=10_000, deadline=time.time() - 1)])
    assert emitted.of(1)[-1].outputs[0].finish_reason == "abort"


def test_a_bad_add_fails_its_own_stream_and_counts_as_taken(engine):
    emitted = Emitted()
    loop = EngineLoop(engine, emitted)
    run_to_idle(loop, [AddRequest(1, "bad", prompt_token_ids=[10**9]), add(2, "good")])
    [error] = emitted.of(1)
    assert isinstance(error, InvalidRequestError) and "outside the vocabulary" in str(error)
    assert emitted.of(2)[-1].finished and loop.num_adds_taken == 2


def test_a_stop_ends_every_stream_and_the_adds_behind_it(engine):
    emitted = Emitted()
    loop = EngineLoop(engine, emitted)
    loop.run_once([add(1, "running", max_tokens=10_000)])
    stepped = loop.run_once([add(2, "before"), Stop(), add(3, "after")])
    assert not stepped and loop.stopped and loop.num_adds_taken == 3
    for token in (1, 2, 3):
        assert isinstance(emitted.of(token)[-1], EngineShutdownError)
    assert not engine.has_unfinished_requests()


def test_the_loop_refuses_what_is_not_a_command(engine):
    loop = EngineLoop(engine, Emitted())
    with pytest.raises(TypeError, match="not an engine command"):
        loop.handle([("add", 1, "old-style", {"prompt_token_ids": PROMPT}, None)])


# -- the thread core ----------------------------------------------------------------------

class Callbacks:
    """The three callbacks a core is built with, recorded."""

    def __init__(self):
        self.emitted = Emitted()
        self.deaths: list[BaseException] = []
        self.exits: list[BaseException] = []
        self.finished = threading.Event()

    def dispatch(self, items) -> None:
        self.emitted(items)
        if any(isinstance(x, BaseException) or x.finished for _, x in items):
            self.finished.set()


def test_the_thread_core_is_an_engine_core_client(engine):
    calls = Callbacks()
    core = EngineThread(engine, calls.dispatch, calls.deaths.append, calls.exits.append)
    assert isinstance(core, EngineCoreClient)
    assert core.pid is None and core.model_info == ModelInfo.of(engine) and core.tokenizer is engine.tokenizer
    core.start()
    core.send(add(1, "a", max_tokens=6))
    assert calls.finished.wait(30)
    assert len(generated(calls.emitted.of(1))) == 6 and core.num_adds_taken == 1
    core.shutdown()
    assert core.stopping and calls.deaths == []
    assert len(calls.exits) == 1 and isinstance(calls.exits[0], EngineShutdownError)


def test_the_thread_core_ends_what_was_sent_before_its_shutdown(engine):
    calls = Callbacks()
    core = EngineThread(engine, calls.dispatch, calls.deaths.append, calls.exits.append)
    core.start()
    core.send(add(1, "long", max_tokens=10_000))
    core.shutdown()
    assert isinstance(calls.emitted.of(1)[-1], EngineShutdownError)
    assert core.num_adds_taken == 1 and calls.deaths == [] and len(calls.exits) == 1
