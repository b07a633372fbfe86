"""The metal backend's ahead step: ``submit`` with the previous step's pending handle as its input tokens.

The ahead step is laid out and submitted before the previous step's result is synchronised (spied on the
handle), a pipelined decode step synchronises with the host once, the ahead step's tokens equal those of a
step fed the real tokens, the cache is still written in place, and the backends that cannot go ahead say so.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from backends.cpu.backend import CPUBackend  # noqa: E402
from backends.input_batch import InputBatch  # noqa: E402
from backends.metal.backend import MetalBackend, MetalPendingStep  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.model_loader import load_model  # noqa: E402
from scheduler.output import PLACEHOLDER_TOKEN_ID, ScheduledRequest, SchedulerOutput  # noqa: E402
from tests.backends.test_metal_step import SyncSpy  # noqa: E402
from tests.factories import make_tiny_hf_model  # noqa: E402

BS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), arch="llama"))


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_model(tiny)


def _step(tokens: dict[str, list[int]], done: dict[str, int], params, ahead: bool = False) -> SchedulerOutput:
    """One step of requests "a" (block 3, 1) and "b" (block 2): their new ``tokens`` after ``done`` cached."""
    tables = {"a": [3, 1], "b": [2]}
    scheduled = [ScheduledRequest(rid, toks, done[rid], tables[rid], None, params, True, [1, 2, 3], [],
                                  block_size=BS) for rid, toks in tokens.items()]
    return SchedulerOutput(scheduled=scheduled, block_size=BS, ahead=ahead)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, logprobs=2),
                                    SamplingParams(temperature=0.9, seed=4, top_k=30)])
def test_an_ahead_step_equals_a_step_fed_the_real_tokens(loaded, params):
    prefill = {"a": [5, 17, 33, 41, 9, 12, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80], "b": [8, 8, 8, 1]}
    done0 = {"a": 0, "b": 0}
    sync, pipelined = (MetalBackend(loaded.config, loaded.weights) for _ in range(2))
    for backend in (sync, pipelined):
        backend.allocate_kv_cache(8, BS)
    first = sync.execute(_step(prefill, done0, params))
    chain = [first]
    done = {"a": 17, "b": 4}
    for _ in range(3):                                     # three decode steps fed the real tokens
        chain.append(sync.execute(_step({r: [chain[-1].sampled_token_ids[r]] for r in prefill}, done, params)))
        done = {r: n + 1 for r, n in done.items()}
    pending = pipelined.submit(_step(prefill, done0, params))
    done, results = {"a": 17, "b": 4}, []
    for _ in range(3):                                     # each submitted before the previous is read
        placeholders = {r: [PLACEHOLDER_TOKEN_ID] for r in prefill}
        nxt = pipelined.submit(_step(placeholders, done, params, ahead=True), previous=pending)
        results.append(pending.result())
        pending, done = nxt, {r: n + 1 for r, n in done.items()}
    results.append(pending.result())
    assert [r.sampled_token_ids for r in results] == [r.sampled_token_ids for r in chain]
    assert [r.logprobs for r in results] == [r.logprobs for r in chain]
    assert pending.result() is results[-1]                 # read once, kept


def test_the_pipelined_loop_submits_ahead_before_it_synchronises(tiny, monkeypatch):
    llm = LLM(tiny, backend="metal", dtype="float32", num_kv_blocks=64)
    engine = llm.engine
    events: list[tuple] = []
    keep: list = []                                        # handles stay alive: their ids stay unique
    real_ahead, real_submit, real_result = (engine.scheduler.schedule_ahead, engine.backend.submit,
                                            MetalPendingStep.result)

    def schedule_ahead(prev):
        out = real_ahead(prev)
        keep.append(prev)
        events.append(("ahead", id(prev)))
        return out

    def submit(sched, previous=None):
        handle = real_submit(sched, previous)
        keep.append(handle)
        events.append(("submit", id(sched), sched.ahead, id(previous) if previous is not None else None,
                       id(handle)))
        return handle

    def result(self):
        events.append(("result", id(self)))
        return real_result(self)

    monkeypatch.setattr(engine.scheduler, "schedule_ahead", schedule_ahead)
    monkeypatch.setattr(engine.backend, "submit", submit)
    monkeypatch.setattr(MetalPendingStep, "result", result)
    for i, p in enumerate(([5, 17, 33, 41, 9], [8, 8, 8, 1])):
        engine.add_request(f"r{i}", prompt_token_ids=p,
                           sampling_params=SamplingParams(temperature=0.8, seed=i, max_tokens=12, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    submits = [e for e in events if e[0] == "submit"]
    ahead = [e for e in submits if e[2]]
    assert len(ahead) >= 10 and engine.pipeline.num_ahead_steps == len(ahead)
    for e in ahead:
        previous = e[3]
        i = events.index(e)
        # the previous handle's result is read after the ahead step was laid out and submitted, never before
        assert ("result", previous) in events[i + 1:] and ("result", previous) not in events[:i], events
        assert events[i - 1][0] == "ahead"


def test_a_pipelined_decode_step_synchronises_once(tiny, monkeypatch):
    llm = LLM(tiny, backend="metal", dtype="float32", num_kv_blocks=64)
    engine = llm.engine
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=1.0, min_p=0.05, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.9, top_k=40, seed=8, max_tokens=10, ignore_eos=True)]
    for i, p in enumerate(params):
        engine.add_request(f"s{i}", prompt_token_ids=[5 + i, 17, 33, 41, 9], sampling_params=p)
    engine.step()                                          # the prefill step, submitted ahead of the first decode
    spy = SyncSpy(monkeypatch)
    pipelined = 0
    while engine.has_unfinished_requests():
        spy.reset()
        before = engine.pipeline.num_ahead_steps
        engine.step()
        if engine.pipeline.num_ahead_steps > before:
            pipelined += 1
            assert spy.syncs == 1, spy.events
            assert spy.events.index("async_eval") < spy.events.index("plan") < spy.events.index("eval")
    assert pipelined >= 7


def test_an_ahead_step_writes_the_cache_in_place(loaded):
    backend = MetalBackend(loaded.config, loaded.weights)
    num_blocks = (8 * 2 ** 20) // (BS * loaded.config.num_key_value_heads * loaded.config.head_dim * 4)
    backend.allocate_kv_cache(num_blocks, BS)                  # 8 MiB per K (and V) per layer
    one_cache = backend.kv_caches[0][0].nbytes
    params = SamplingParams(temperature=0)
    done = {"a": 5, "b": 3}
    backend.submit(_step({"a": [7], "b": [9]}, done, params)).result()       # warm the buffer cache
    for _ in range(12):                        # the copy, when it happens, depends on timing: try a few times
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        first = backend.submit(_step({"a": [7], "b": [9]}, done, params))
        ahead = backend.submit(_step({"a": [PLACEHOLDER_TOKEN_ID], "b": [PLACEHOLDER_TOKEN_ID]}, {"a": 6, "b": 4},
                                     params, ahead=True), previous=first)
        assert set(first.result().sampled_token_ids) == set(ahead.result().sampled_token_ids) == {"a", "b"}
        mx.synchronize()
        assert mx.get_peak_memory() - before < one_cache // 2
        assert abs(mx.get_active_memory() - before) < one_cache // 2


def test_backends_and_batches_that_cannot_go_ahead_say_so(loaded):
    params = SamplingParams(temperature=0)
    ahead = _step({"a": [PLACEHOLDER_TOKEN_ID]}, {"a": 5}, params, ahead=True)
    cpu = CPUBackend(loaded.config, loaded.weights)
    cpu.allocate_kv_cache(8, BS)
    assert not cpu.supports_ahead and MetalBackend.supports_ahead
    with pytest.raises(ValueError, match="cannot take an ahead step"):
        cpu.submit(ahead)
    assert cpu.submit(_step({"a": [7]}, {"a": 5}, params)).result().sampled_token_ids.keys() == {"a"}
    with pytest.raises(ValueError, match="only a backend with supports_ahead"):
        InputBatch(BS).prepare(ahead)
    inputs = InputBatch(BS).prepare(ahead, takes_ahead=True)
    assert inputs.token_ids.tolist() == [PLACEHOLDER_TOKEN_ID] and inputs.positions.tolist() == [5]
    metal = MetalBackend(loaded.config, loaded.weights)
    metal.allocate_kv_cache(8, BS)
    with pytest.raises(ValueError, match="previous step's MetalPendingStep"):
        metal.submit(ahead)
    other = metal.submit(_step({"b": [7]}, {"b": 5}, params))
    with pytest.raises(ValueError, match="one token per request of the previous step"):
        metal.submit(ahead, previous=other)
    assert np.array(other.tokens).shape == (1,)
