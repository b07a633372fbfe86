"""Async scheduling (``engine.pipeline``): the metal engine goes ahead and keeps the synchronous engine's tokens.

Every workload runs on two engines over the same tiny random Llama in float32, ``async_scheduling`` on and
off, and must give the same token ids, text, finish and stop reasons and logprobs; the async one must have
gone ahead, and every block must be back in the pool at the end. The cpu backend ignores the flag.
"""

from __future__ import annotations

import pytest

pytest.importorskip("mlx.core")

from backends.metal.backend import MetalPendingStep  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.args import EngineArgs  # noqa: E402
from engine.llm_engine import StepFailedError  # noqa: E402
from engine.sampling_params import StructuredOutputsParams  # noqa: E402
from tests.factories import make_tiny_hf_model  # noqa: E402

pytestmark = pytest.mark.timeout(600)

PROMPTS = [[5, 17, 33, 41, 9], [8, 8, 8, 1], [3, 4], list(range(40, 61)), [100, 7, 7, 200, 31, 2, 90], [77]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), arch="llama"))


def _pair(path, **kwargs) -> dict[bool, LLM]:
    return {flag: LLM(path, backend="metal", dtype="float32", async_scheduling=flag, **kwargs)
            for flag in (False, True)}


@pytest.fixture(scope="module")
def pair(tiny):
    return _pair(tiny, num_kv_blocks=128)


def _summary(outs) -> list:
    return [[(c.index, list(c.token_ids), c.text, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [(lp.token_id, round(lp.logprob, 5), lp.rank, lp.top)
                                              for lp in c.logprobs])
             for c in o.outputs] for o in outs]


def _settled(llm: LLM) -> None:
    """Take the step still in flight (its requests all ended), then check the pool is whole."""
    engine = llm.engine
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.pipeline.inflight is None
    kv = engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks and not engine.scheduler.requests


def _same(pair: dict[bool, LLM], prompts, params, *, min_ahead: int = 1) -> list:
    """Generate on both engines; the same outputs, the async one ahead ``min_ahead`` times at least."""
    before = pair[True].engine.pipeline.num_ahead_steps
    outs = {flag: llm.generate(prompts, params, use_tqdm=False) for flag, llm in pair.items()}
    for llm in pair.values():
        _settled(llm)
    assert _summary(outs[True]) == _summary(outs[False])
    assert pair[True].engine.pipeline.num_ahead_steps - before >= min_ahead
    assert pair[False].engine.pipeline.num_ahead_steps == 0
    return outs[False]


def test_greedy_batch_with_max_tokens_ends(pair):
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (24, 1, 9, 17, 2, 30)]
    outs = _same(pair, PROMPTS, params, min_ahead=20)
    assert [len(o.outputs[0].token_ids) for o in outs] == [24, 1, 9, 17, 2, 30]


def test_seeded_sampling_and_logprobs(pair):
    params = [SamplingParams(temperature=0.9, top_k=20 + i, seed=i, max_tokens=16, ignore_eos=True,
                             logprobs=3 if i % 2 else None) for i in range(3)]
    params += [SamplingParams(temperature=1.0, min_p=0.05, seed=11, max_tokens=12, ignore_eos=True, logprobs=0),
               SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=5),
               SamplingParams(temperature=0.7, seed=5, max_tokens=10, ignore_eos=True,
                              logit_bias={3: 2.0, 9: -100.0})]
    _same(pair, PROMPTS, params, min_ahead=8)


def test_n_greater_than_one(pair):
    params = SamplingParams(n=3, temperature=1.0, seed=21, max_tokens=11, ignore_eos=True, logprobs=1)
    outs = _same(pair, PROMPTS[:3], params, min_ahead=8)
    assert all(len(o.outputs) == 3 for o in outs)


def test_eos_stop_ids_and_min_tokens(pair):
    eos = pair[False].engine.tokenizer.eos_token_ids[0]
    # A bias towards EOS makes it come at a seed-dependent step; min_tokens holds it back for a while.
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=30, logit_bias={eos: 3.5}) for s in range(4)]
    params += [SamplingParams(temperature=1.0, seed=9, max_tokens=30, min_tokens=m, logit_bias={eos: 3.5})
               for m in (3, 6)]
    outs = _same(pair, PROMPTS, params)
    ends = [(o.outputs[0].finish_reason, len(o.outputs[0].token_ids)) for o in outs]
    assert any(r == "stop" and 1 < n < 30 for r, n in ends), ends          # EOS ended some mid-run
    assert all(n > 3 for _, n in ends[4:5]) and all(n > 6 for _, n in ends[5:])
    greedy = pair[False].generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    stops = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                            stop_token_ids=[o.outputs[0].token_ids[k]]) for o, k in zip(greedy, (4, 1, 7, 3, 10, 0))]
    outs = _same(pair, PROMPTS, stops)
    assert sum(o.outputs[0].finish_reason == "stop" and o.outputs[0].stop_reason is not None for o in outs) >= 5


def test_stop_strings_end_one_step_late_with_the_same_text(pair):
    greedy = pair[False].generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    stops = []
    for o, k in zip(greedy, (6, 3, 12, 9, 15, 20)):
        text = o.outputs[0].text
        stops.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                    stop=[text[k:k + 3]] if len(text) > k + 3 else None))
    outs = _same(pair, PROMPTS, stops)
    assert sum(o.outputs[0].finish_reason == "stop" for o in outs) >= 3


def _abort_run(llm: LLM, abort_at: int) -> list:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:4]):
        engine.add_request(f"abort-{i}", prompt_token_ids=p, sampling_params=params)
    got: dict[str, list] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).append(
                [(c.index, list(c.token_ids), c.finish_reason) for c in out.outputs])
        steps += 1
        if steps == abort_at:
            out = engine.abort_request("abort-1")
            got["abort-1"].append([(c.index, list(c.token_ids), c.finish_reason) for c in out.outputs])
    return [got[k] for k in sorted(got)]


def test_an_abort_mid_run(pair):
    before = pair[True].engine.pipeline.num_ahead_steps
    runs = {flag: _abort_run(llm, abort_at=6) for flag, llm in pair.items()}
    assert runs[True] == runs[False]
    assert runs[True][1][-1][0][2] == "abort" and pair[True].engine.pipeline.num_ahead_steps - before >= 10
    for llm in pair.values():
        _settled(llm)


def test_a_small_kv_cache_forces_preemption(tiny):
    small = _pair(tiny, num_kv_blocks=10)                 # 160 tokens for 6 requests of up to 60
    params = SamplingParams(temperature=0, max_tokens=36, ignore_eos=True)
    _same(small, [p * 4 for p in PROMPTS], params)
    assert all(llm.engine.scheduler.num_preemptions > 0 for llm in small.values())


def test_ineligible_requests_step_synchronously_among_eligible_ones(pair):
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0.8, seed=1, max_tokens=5, ignore_eos=True, presence_penalty=0.5,
                             frequency_penalty=0.3),
              SamplingParams(temperature=1.0, seed=2, max_tokens=8, structured_outputs=StructuredOutputsParams(
                  choice=["yes", "no", "maybe not"])),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.8, seed=3, max_tokens=7, ignore_eos=True)]
    _same(pair, PROMPTS, params, min_ahead=5)            # ahead once the penalised, constrained, top-p ones end


def test_prefix_cached_prompts(tiny):
    cached = _pair(tiny, num_kv_blocks=64, block_size=4)
    shared = list(range(60, 75))                          # 15 tokens: 3 full blocks of 4
    prompts = [shared + [i, i + 1] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
    _same(cached, prompts, params)
    _same(cached, prompts + [shared], params)            # every prompt from the cache now
    assert all(llm.engine.scheduler.kv.prefix_cache_hits >= 4 * 12 for llm in cached.values())


def test_a_failed_step_fails_both_steps_in_flight_and_frees_their_blocks(pair, monkeypatch):
    llm = pair[True]
    engine = llm.engine
    for i, p in enumerate(PROMPTS[:3]):
        engine.add_request(f"fail-{i}", prompt_token_ids=p,
                           sampling_params=SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.pipeline.inflight is not None and engine.pipeline.inflight.sched.ahead
    real = MetalPendingStep.result

    def broken(self):
        raise RuntimeError("device lost")
    monkeypatch.setattr(MetalPendingStep, "result", broken)
    with pytest.raises(StepFailedError) as info:
        engine.step()                                      # goes ahead, then the step in flight fails
    assert info.value.request_ids == ["fail-0", "fail-1", "fail-2"]
    assert engine.pipeline.inflight is None and not engine.has_unfinished_requests()
    monkeypatch.setattr(MetalPendingStep, "result", real)
    _settled(llm)
    _same(pair, PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))   # serving again


def test_shutdown_drains_the_step_in_flight(tiny):
    llm = LLM(tiny, backend="metal", dtype="float32", num_kv_blocks=32)
    engine = llm.engine
    engine.add_request("x", prompt_token_ids=PROMPTS[0], sampling_params=SamplingParams(max_tokens=10))
    engine.step()
    assert engine.pipeline.inflight is not None
    engine.abort_request("x")
    assert engine.has_unfinished_requests()                # the step in flight still counts
    engine.shutdown()
    assert engine.pipeline.inflight is None


def test_the_cpu_backend_ignores_the_flag(tiny):
    outs = {}
    for flag in (False, True):
        llm = LLM(tiny, backend="cpu", num_kv_blocks=64, async_scheduling=flag)
        assert not llm.engine.pipeline.enabled
        outs[flag] = _summary(llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)))
        assert llm.engine.pipeline.num_ahead_steps == 0 and llm.engine.pipeline.inflight is None
    assert outs[True] == outs[False]


def test_the_flag_is_on_by_default_and_switched_off_on_the_command_line():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args([])).async_scheduling is True
    off = EngineArgs.from_cli_args(parser.parse_args(["--no-async-scheduling"]))
    assert off.async_scheduling is False and off.to_cli_flags() == ["--no-async-scheduling"]
    assert EngineArgs.from_cli_args(parser.parse_args(off.to_cli_flags())) == off
