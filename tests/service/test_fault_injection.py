"""Faults in a real server over the tiny model: a model step that raises,
repeated failures that kill the engine, and a client that vanishes mid-stream.

Faults come from ``tests/service/faults.StepFaults``, which wraps the live
backend's ``execute``; no code path of the server can reach it.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from engine.core import MAX_CONSECUTIVE_STEP_FAILURES
from pagedgen_client import PagedgenClientError, RetryPolicy
from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from pagedgen_client._proto.pagedgen.v1 import generate_pb2_grpc as pb_grpc
from tests.service.conftest import serving
from tests.service.faults import StepFaults

pytestmark = pytest.mark.timeout(90)

MAX_TOKENS = 24


@pytest.fixture
def server(tiny_model_dir):
    """Two running requests at most, so that some requests wait outside the failing step."""
    with serving(tiny_model_dir, grace=1.0, max_num_seqs=2, num_kv_blocks=64) as server:
        yield server


def _run(client, request_id: str, outcomes: dict, max_tokens: int = MAX_TOKENS) -> None:
    """One greedy request; its outcome lands in ``outcomes[request_id]``."""
    try:
        chunks = list(client.generate("The cat watches", request_id=request_id, max_tokens=max_tokens,
                                      ignore_eos=True, temperature=0))
        outcomes[request_id] = ("ok", sum(len(c.token_ids) for c in chunks), chunks[-1].finish_reason)
    except PagedgenClientError as e:
        outcomes[request_id] = (e.code, e.message)


def _start(client, request_ids, outcomes) -> list[threading.Thread]:
    threads = [threading.Thread(target=_run, args=(client, rid, outcomes)) for rid in request_ids]
    for t in threads:
        t.start()
    return threads


def _wait_for(predicate, timeout: float = 10.0, every: float = 0.005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def _assert_all_blocks_free(client) -> None:
    assert _wait_for(lambda: client.stats().num_running == 0, timeout=5)
    stats = client.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_a_failing_step_fails_exactly_its_requests_and_the_engine_keeps_serving(server):
    outcomes: dict = {}
    with StepFaults(server.engine, delay_s=0.01) as faults, \
            server.client(retry=RetryPolicy(max_attempts=1)) as client:
        ids = [f"fault-{i}" for i in range(6)]
        threads = _start(client, ids, outcomes)
        # Two run, four wait (max_num_seqs=2); fail the next step once the two are decoding.
        assert _wait_for(lambda: (s := client.stats()).num_running == 2 and s.num_waiting == 4)
        faults.arm(1)
        for t in threads:
            t.join(timeout=30)
        failed = faults.failed_request_ids
        assert len(faults.failed_steps) == 1 and 1 <= len(failed) <= 2
        for rid in ids:
            if rid in failed:                       # INTERNAL, naming the request
                code, message = outcomes[rid]
                assert code == grpc.StatusCode.INTERNAL
                assert rid in message and "InjectedFault" in message
            else:                                   # the waiting ones never noticed
                assert outcomes[rid] == ("ok", MAX_TOKENS, "length")
        # The engine keeps serving: new requests succeed, health stays SERVING.
        more = [f"after-{i}" for i in range(4)]
        for t in _start(client, more, outcomes):
            t.join(timeout=30)
        assert all(outcomes[rid] == ("ok", MAX_TOKENS, "length") for rid in more)
        assert client.health() == "SERVING"
        _assert_all_blocks_free(client)


def test_repeated_step_failures_kill_the_engine_and_everything_fails_fast(server):
    outcomes: dict = {}
    with StepFaults(server.engine) as faults, server.client(retry=RetryPolicy(max_attempts=1)) as client:
        faults.arm(1000)
        t0 = time.monotonic()
        for t in _start(client, [f"doomed-{i}" for i in range(8)], outcomes):
            t.join(timeout=20)
        assert len(outcomes) == 8 and time.monotonic() - t0 < 10      # no stream hangs
        assert len(faults.failed_steps) == MAX_CONSECUTIVE_STEP_FAILURES
        assert all(o[0] == grpc.StatusCode.INTERNAL for o in outcomes.values())
        # Those in failed steps name the fault; the rest failed fast when the engine died.
        for rid in faults.failed_request_ids:
            assert "InjectedFault" in outcomes[rid][1] and rid in outcomes[rid][1]
        assert server.engine.is_dead
        assert _wait_for(lambda: client.health() == "NOT_SERVING", timeout=3)
        t0 = time.monotonic()
        with pytest.raises(PagedgenClientError) as info:
            list(client.generate("anyone there?", max_tokens=4))
        assert info.value.code == grpc.StatusCode.INTERNAL and time.monotonic() - t0 < 1.0
        assert "not serving" in str(info.value)


def test_a_client_that_vanishes_mid_stream_frees_its_blocks_within_one_step(server):
    """Closing the channel (no cancel sent by the application) ends the request
    on the server before the engine runs more than the step already under way."""
    with StepFaults(server.engine, delay_s=0.05) as faults, server.client() as observer:
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.GenerateStub(channel)
        call = stub.Generate(pb.GenerateRequest(
            request_id="vanishing", prompt="The cat watches",
            sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True, temperature=0)))
        for _ in range(2):
            next(call)
        assert observer.stats().num_running == 1
        steps_at_close = faults.num_steps
        channel.close()                                 # the connection goes away
        assert _wait_for(lambda: observer.stats().num_running == 0, timeout=5)
        assert faults.num_steps - steps_at_close <= 2   # the step under way, at most one more
        _assert_all_blocks_free(observer)


def test_a_failed_step_still_lets_the_backend_drop_requests_that_ended_before_it(server):
    """The step that fails also carried the ids of requests finished since the
    previous one; the backend must still hear of them (seeded generators)."""
    sampler = server.engine.engine.backend.sampler
    outcomes: dict = {}
    with StepFaults(server.engine, fail_if=lambda sched: bool(sched.finished_request_ids)) as faults, \
            server.client(retry=RetryPolicy(max_attempts=1)) as client:
        faults.arm(1)
        # "long" must still run when "seeded" ends (the fault takes the step after): 400 tokens, where
        # MAX_TOKENS of the tiny model take ~15 ms on a fast machine, less than "seeded"'s start
        long = threading.Thread(target=_run, args=(client, "long", outcomes, 400))
        long.start()
        assert _wait_for(lambda: client.stats().num_running == 1)
        seeded = list(client.generate("A red kite", request_id="seeded", seed=7, temperature=0.8, max_tokens=3,
                                      ignore_eos=True))
        assert seeded[-1].finish_reason == "length"
        long.join(timeout=30)
        assert faults.failed_request_ids == {"long"} and outcomes["long"][0] == grpc.StatusCode.INTERNAL
        assert client.generate_text("The cat", max_tokens=2, temperature=0) is not None    # one more step
        _assert_all_blocks_free(client)
        assert sampler.num_seeded_generators == 0
