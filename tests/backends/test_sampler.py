"""The batched sampler: greedy, filters, penalties, min_tokens, seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from backends.sampler import Sampler, apply_penalties, apply_top_k_top_p
from backends.sampling_plan import plan_penalties, plan_top_k_top_p
from engine.sampling_params import SamplingParams

V = 64
EOS = 3


@dataclass
class Row:
    request_id: str
    sampling_params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)


def rows(*params: SamplingParams, prefix: str = "r") -> list[Row]:
    return [Row(f"{prefix}{i}", p) for i, p in enumerate(params)]


def random_logits(n: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale   # [n, V]


def sample_many(params: SamplingParams, logits_row: torch.Tensor, n: int = 400) -> torch.Tensor:
    """``n`` draws for one distribution, as one batch of ``n`` unseeded rows."""
    sampler = Sampler(seed=1)
    out = sampler.sample(logits_row.expand(n, V).clone(), rows(*[params] * n))
    return torch.tensor(out.token_ids)


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = random_logits(5)
    logits[2, 10] = logits[2, 40] = logits[2].max() + 1.0
    out = Sampler().sample(logits, rows(*[SamplingParams(temperature=0.0)] * 5))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[2] == 10
    assert out.logprobs == [None] * 5


def test_top_k_one_equals_greedy_at_temperature_one():
    logits = random_logits(8, seed=1)
    greedy = Sampler().sample(logits, rows(*[SamplingParams(temperature=0.0)] * 8)).token_ids
    top1 = Sampler(seed=5).sample(logits, rows(*[SamplingParams(temperature=1.0, top_k=1)] * 8)).token_ids
    assert top1 == greedy


def test_seeded_request_is_reproducible_across_batch_compositions():
    logits = random_logits(6, seed=2, scale=1.0)
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def run(batch_rows, row_of_seeded, steps=5, sampler_seed=0):
        sampler = Sampler(seed=sampler_seed)
        tokens = []
        for _ in range(steps):
            out = sampler.sample(logits[: len(batch_rows)], batch_rows)
            tokens.append(out.token_ids[row_of_seeded])
        return tokens

    alone = run([Row("s", seeded)], 0)
    crowd = [Row("a", SamplingParams(temperature=0.8)), Row("b", SamplingParams(temperature=0.0)),
             Row("s", seeded), Row("c", SamplingParams(temperature=1.0, seed=7))]
    batch = [logits[0], logits[1], logits[0], logits[2]]            # same row logits for "s"
    sampler = Sampler(seed=99)
    together = [sampler.sample(torch.stack(batch), crowd).token_ids[2] for _ in range(5)]
    assert together == alone
    assert len(set(alone)) > 1                                       # the generator advances
    assert run([Row("s", seeded)], 0, sampler_seed=42) == alone      # independent of the backend seed


def test_dropping_a_request_restarts_its_generator():
    logits = random_logits(1, seed=3, scale=0.5)
    sampler = Sampler()
    row = Row("s", SamplingParams(seed=5))
    first = [sampler.sample(logits, [row]).token_ids[0] for _ in range(4)]
    sampler.drop(["s"])
    assert sampler.num_seeded_generators == 0
    assert [sampler.sample(logits, [row]).token_ids[0] for _ in range(4)] == first


def test_preempted_seeded_request_continues_its_stream():
    logits = random_logits(1, seed=9, scale=0.3)

    def generate(preempt_at=None):
        sampler, row = Sampler(), Row("s", SamplingParams(seed=21))
        for step in range(8):
            if step == preempt_at:
                sampler.drop(["s"])                                  # the backend drops preempted ids
            row.output_token_ids.append(sampler.sample(logits, [row]).token_ids[0])
        return row.output_token_ids

    assert generate(preempt_at=5) == generate()


def test_unseeded_rows_follow_the_sampler_seed():
    logits = random_logits(4, seed=4, scale=0.5)
    params = rows(*[SamplingParams(temperature=1.0)] * 4)
    assert Sampler(seed=3).sample(logits, params).token_ids == Sampler(seed=3).sample(logits, params).token_ids


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    out = apply_penalties(logits, plan_penalties(prompt_ids=[[0, 1]], output_ids=[[3, 3, 4]], repetition=[2.0],
                                                 presence=[0.5], frequency=[0.25], vocab_size=5))
    # repetition over {0, 1, 3, 4}: 2/2, -1*2, 0.5 untouched, 3/2, -2*2
    # then output counts {3: 2, 4: 1}: 3 -> -(0.25*2 + 0.5), 4 -> -(0.25 + 0.5)
    expected = torch.tensor([[1.0, -2.0, 0.5, 1.5 - 1.0, -4.0 - 0.75]])
    torch.testing.assert_close(out, expected)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]]))      # input untouched


def test_penalties_leave_rows_without_one_untouched():
    logits = random_logits(3)
    plan = plan_penalties([[1], [2], [3]], [[4], [5], [6]], repetition=[1.0, 1.5, 1.0], presence=[0.0, 0.0, 0.0],
                          frequency=[0.0, 0.0, 0.4], vocab_size=V)
    out = apply_penalties(logits, plan)
    assert torch.equal(out[0], logits[0])
    assert not torch.equal(out[1], logits[1]) and not torch.equal(out[2], logits[2])
    assert torch.equal(out[1, 6:], logits[1, 6:])                    # only seen tokens move


def test_penalties_apply_before_greedy():
    logits = torch.zeros(1, V)
    logits[0, 7] = 1.0
    logits[0, 8] = 0.9
    row = Row("r", SamplingParams(temperature=0.0, repetition_penalty=1.5), prompt_token_ids=[7])
    assert Sampler().sample(logits, [row]).token_ids == [8]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(3, V)
    logits[:, EOS] = 10.0
    logits[:, 9] = 9.0
    logits[:, 11] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(9,))
    batch = [Row("a", params, output_token_ids=[1]),                     # 1 < 2: masked
             Row("b", params, output_token_ids=[1, 2]),                  # reached min_tokens
             Row("c", SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True), output_token_ids=[])]
    out = Sampler(eos_token_ids=[EOS]).sample(logits, batch)
    assert out.token_ids == [11, EOS, EOS]


@pytest.mark.parametrize("params,allowed_size", [
    (SamplingParams(temperature=1.0, top_k=5), 5),
    (SamplingParams(temperature=1.0, top_p=0.5), None),
    (SamplingParams(temperature=1.0, min_p=0.2), None),
    (SamplingParams(temperature=0.7, top_k=10, top_p=0.6, min_p=0.05), None),
])
def test_filters_never_sample_outside_the_allowed_set(params, allowed_size):
    logits = random_logits(1, seed=6, scale=1.5)[0]                  # [V]
    probs = torch.softmax(logits / params.temperature, -1)
    order = probs.argsort(descending=True)
    allowed = torch.ones(V, dtype=torch.bool)
    if params.min_p:
        allowed &= probs >= params.min_p * probs.max()
    if params.top_k:
        allowed &= torch.zeros(V, dtype=torch.bool).index_fill(0, order[: params.top_k], True)
    if params.top_p < 1.0:
        kept = torch.where(allowed, probs, 0.0)
        kept = kept / kept.sum()
        mass = kept[order].cumsum(0)
        nucleus = order[: int((mass < params.top_p).sum()) + 1]
        allowed &= torch.zeros(V, dtype=torch.bool).index_fill(0, nucleus, True)
    if allowed_size is not None:
        assert int(allowed.sum()) == allowed_size
    drawn = sample_many(params, logits)
    assert allowed[drawn].all()
    assert len(drawn.unique()) >= min(3, int(allowed.sum()))         # it does sample, not argmax


def test_top_p_falls_back_to_full_sort_for_flat_distributions():
    logits = torch.zeros(2, 3000)                                      # nucleus of 0.9 -> 2700 tokens
    out = apply_top_k_top_p(logits, plan_top_k_top_p([0, 0], [0.9, 1.0], 3000))
    assert int(torch.isfinite(out[0]).sum()) == 3000                   # ties with the last kept stay
    logits = torch.linspace(0, 1, 3000)[None, :].repeat(2, 1)
    out = apply_top_k_top_p(logits, plan_top_k_top_p([0, 50], [0.9, 0.5], 3000))
    probs = torch.softmax(logits[0], -1).flip(0)
    assert int(torch.isfinite(out[0]).sum()) == int((probs.cumsum(0) < 0.9).sum()) + 1
    assert 0 < int(torch.isfinite(out[1]).sum()) <= 50


def test_temperature_sharpens_the_distribution():
    logits = random_logits(1, seed=7, scale=1.0)[0]
    hot = sample_many(SamplingParams(temperature=2.0), logits)
    cold = sample_many(SamplingParams(temperature=0.2), logits)
    best = int(logits.argmax())
    assert (cold == best).float().mean() > (hot == best).float().mean()


def test_logprobs_rank_and_top_from_raw_logits():
    logits = random_logits(3, seed=8)
    batch = [Row("a", SamplingParams(temperature=1.0, logprobs=3, repetition_penalty=1.3), prompt_token_ids=[1, 2]),
             Row("b", SamplingParams(temperature=0.0)),
             Row("c", SamplingParams(temperature=0.0, logprobs=0))]
    out = Sampler(seed=2).sample(logits, batch)
    raw = torch.log_softmax(logits, -1)
    for i in (0, 2):
        lp = out.logprobs[i]
        token = out.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(raw[i, token]), abs=1e-6)
        assert lp.rank == int((raw[i] > raw[i, token]).sum()) + 1
    assert out.logprobs[1] is None
    assert out.logprobs[2].rank == 1 and out.logprobs[2].top == []
    top = out.logprobs[0].top
    assert [t for t, _ in top] == raw[0].topk(3).indices.tolist()
    assert [lp for _, lp in top] == pytest.approx(raw[0].topk(3).values.tolist(), abs=1e-6)


def test_rejects_mismatched_rows():
    with pytest.raises(ValueError):
        Sampler().sample(torch.zeros(2, V), rows(SamplingParams()))
