"""Sampling in MLX: the cpu sampler's features, checked against its torch functions and end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from backends import sampler as torch_sampler  # noqa: E402
from backends.metal import sampler as mlx_sampler  # noqa: E402
from backends.metal.sampler import MetalSampler  # noqa: E402
from backends.sampling_plan import plan_min_p, plan_penalties, plan_top_k_top_p  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from scheduler.output import ScheduledRequest  # noqa: E402
from tests.factories import make_tiny_hf_model  # noqa: E402

V = 500


def random_logits(rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * scale


def row(rid: str, params: SamplingParams, output: list[int] | None = None, prompt: list[int] | None = None):
    return ScheduledRequest(rid, [1], 0, [0], [0], params, needs_sample=True,
                            prompt_token_ids=prompt or [], output_token_ids=list(output or []))


def test_penalties_equal_the_torch_sampler():
    logits = random_logits(4)
    prompts = [[1, 2, 3], [4, 4, 5], [6], [7, 8, 9, 10]]
    outputs = [[3, 3, 11], [5, 12, 12, 12], [], [499, 0, 0]]
    plan = plan_penalties(prompts, outputs, [1.0, 1.3, 0.8, 1.0], [0.0, 0.5, 0.0, -0.3], [0.2, 0.0, 0.0, 0.7], V)
    expected = torch_sampler.apply_penalties(logits, plan)
    got = mlx_sampler.apply_penalties(mx.array(logits.numpy()), plan)
    np.testing.assert_allclose(np.array(got), expected.numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.array(got), logits.numpy())


@pytest.mark.parametrize("top_k,top_p", [
    ([0, 5, 1, 40], [1.0, 1.0, 1.0, 1.0]),
    ([0, 0, 0, 0], [0.5, 0.9, 0.99, 1.0]),                 # nucleus beyond the 64 first candidates
    ([3, 0, 100, 0], [0.7, 0.2, 0.95, 1.0]),
])
def test_top_k_top_p_and_min_p_masks_equal_the_torch_sampler(top_k, top_p):
    logits = random_logits(4, seed=1, scale=0.3)               # flat: wide nuclei
    logits[2, :10] = 5.0                                       # a tie at the top
    stage = plan_top_k_top_p(top_k, top_p, V)
    expected = torch_sampler.apply_top_k_top_p(logits, stage)
    got = mlx_sampler.apply_top_k_top_p(mx.array(logits.numpy()), stage)
    np.testing.assert_array_equal(np.isfinite(np.array(got)), torch.isfinite(expected).numpy())
    min_p_log = plan_min_p([0.0, 0.1, 0.5, 0.9])
    expected = torch_sampler.apply_min_p(logits, min_p_log)
    got = mlx_sampler.apply_min_p(mx.array(logits.numpy()), min_p_log)
    np.testing.assert_array_equal(np.isfinite(np.array(got)), torch.isfinite(expected).numpy())


def test_inverse_cdf_draws_follow_the_distribution_and_skip_masked_tokens():
    logits = mx.array([[0.0, -mx.inf, np.log(3.0), -mx.inf]])
    picks = mlx_sampler.inverse_cdf_sample(mx.repeat(logits, 4, axis=0), mx.array([0.0, 0.2499, 0.2501, 0.99999994]))
    assert picks.tolist() == [0, 0, 2, 2]
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    many = mx.repeat(mx.array(np.log(probs)[None].astype(np.float32)), 4000, axis=0)
    draws = np.array(mlx_sampler.inverse_cdf_sample(many, mx.random.uniform(shape=(4000,), key=mx.random.key(7))))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, probs, atol=0.03)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(2, V)
    logits[:, 7] = 9.0                                         # EOS is the best token
    logits[:, 9] = 8.0                                         # then a stop id
    logits[:, 3] = 1.0
    sampler = MetalSampler(eos_token_ids=[7])
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[9])
    token_ids, _ = sampler.sample(mx.array(logits.numpy()), [row("a", p, [1]), row("b", p, [1, 2, 3])])
    assert token_ids == [3, 7]
    ignore = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)
    assert sampler.sample(mx.array(logits[:1].numpy()), [row("c", ignore, [1])])[0] == [7]


def _stream(sampler: MetalSampler, logits: mx.array, params: SamplingParams, steps: int, start: int = 0,
            rid: str = "r", others: int = 0) -> list[int]:
    out: list[int] = list(range(start))
    drawn = []
    for _ in range(steps):
        rows = [row(rid, params, out)] + [row(f"o{j}", SamplingParams(temperature=1.0)) for j in range(others)]
        token = sampler.sample(mx.repeat(logits, len(rows), axis=0), rows)[0][0]
        drawn.append(token)
        out.append(token)
    return drawn


def test_seeded_streams_are_reproducible_batch_independent_and_survive_a_drop():
    logits = mx.array(random_logits(1, seed=2, scale=0.5).numpy())   # flat: many likely tokens
    p = SamplingParams(temperature=1.0, seed=42)
    full = _stream(MetalSampler(seed=0), logits, p, 8)
    assert full == _stream(MetalSampler(seed=5), logits, p, 8, others=3)
    assert full != _stream(MetalSampler(seed=0), logits, SamplingParams(temperature=1.0, seed=43), 8)
    sampler = MetalSampler()
    head = _stream(sampler, logits, p, 3)
    sampler.drop(["r"])                                               # preempted: state gone
    assert sampler.num_seeded_generators == 0
    assert head + _stream(sampler, logits, p, 5, start=3) == full
    assert len(set(full)) > 1


def test_top_k_1_is_greedy_and_logprobs_equal_the_torch_sampler():
    logits = random_logits(3, seed=3)
    params = [SamplingParams(temperature=1.0, top_k=1, logprobs=4), SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=0.7, top_k=1, logprobs=2)]
    rows = [row(str(i), p) for i, p in enumerate(params)]
    token_ids, logprobs = MetalSampler().sample(mx.array(logits.numpy()), rows)
    expected = torch_sampler.Sampler().sample(logits, rows)
    assert token_ids == expected.token_ids == logits.argmax(-1).tolist()
    for got, want in zip(logprobs, expected.logprobs):
        assert got.token_id == want.token_id and got.rank == want.rank == 1
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
        np.testing.assert_allclose([lp for _, lp in got.top], [lp for _, lp in want.top], atol=1e-5)


# -- end to end on a tiny model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), arch="llama"))


@pytest.fixture(scope="module")
def metal(tiny_path):
    return LLM(tiny_path, backend="metal", dtype="float32", num_kv_blocks=256)   # parity with cpu float32


@pytest.fixture(scope="module")
def cpu(tiny_path):
    return LLM(tiny_path, backend="cpu", num_kv_blocks=256)


PROMPT = "hello world, this is"


def ids(llm: LLM, params: SamplingParams, prompts=(PROMPT,)) -> list[int]:
    return llm.generate(list(prompts), params)[0].outputs[0].token_ids


def test_seeded_sampling_is_reproducible_and_seeds_differ(metal):
    p = SamplingParams(temperature=1.0, seed=123, max_tokens=24, ignore_eos=True)
    a = ids(metal, p)
    assert a == ids(metal, p, [PROMPT, "other prompt in the batch"])
    assert a != ids(metal, SamplingParams(temperature=1.0, seed=124, max_tokens=24, ignore_eos=True))
    out = metal.generate([PROMPT], SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=12, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3


def test_top_k_1_equals_greedy_end_to_end(metal, cpu):
    greedy = ids(metal, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert ids(metal, SamplingParams(temperature=1.0, top_k=1, max_tokens=20, ignore_eos=True)) == greedy
    assert ids(cpu, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)) == greedy


def test_penalties_change_greedy_outputs_as_the_cpu_backend_does(metal, cpu):
    base = dict(temperature=0, max_tokens=32, ignore_eos=True)
    penalties = [dict(repetition_penalty=1.8), dict(frequency_penalty=1.5), dict(presence_penalty=2.0)]
    params = [SamplingParams(**base)] + [SamplingParams(**base, **p) for p in penalties]
    got = [o.outputs[0].token_ids for o in metal.generate([PROMPT] * len(params), params)]
    assert got == [o.outputs[0].token_ids for o in cpu.generate([PROMPT] * len(params), params)]
    plain = got[0]
    for penalised in got[1:]:
        assert penalised != plain and len(set(penalised)) >= len(set(plain))   # repeats are discouraged


def test_logprobs_match_the_cpu_backend(metal, cpu):
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    got = metal.generate([PROMPT], p)[0].outputs[0]
    want = cpu.generate([PROMPT], p)[0].outputs[0]
    assert got.token_ids == want.token_ids and len(got.logprobs) == 10
    for g, w in zip(got.logprobs, want.logprobs):
        assert g.rank == 1 and len(g.top) == 3 and g.top[0][0] == g.token_id
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4) and g.logprob <= 0
        assert [t for t, _ in g.top] == [t for t, _ in w.top]


def test_min_tokens_delays_eos(metal):
    eos = metal.tokenizer.eos_token_ids[0]
    out = metal.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, min_tokens=12,
                                                  stop_token_ids=[eos]))[0].outputs[0]
    assert len(out.token_ids) == 12 and eos not in out.token_ids
