"""The framework-free sampling plan: what each stage does to which rows, decided once per step."""

from __future__ import annotations

import subprocess
import sys
import numpy as np
import pytest

from backends.sampling_plan import (TOP_P_CANDIDATES, DrawPlan, SamplingPlan, TokenMask, plan_min_p,
                                    plan_penalties, plan_top_k_top_p)
from engine.sampling_params import SamplingParams
from scheduler.output import ScheduledRequest

V = 100
EOS = 2


def row(request_id: str, params: SamplingParams, prompt_token_ids=(), output_token_ids=()) -> ScheduledRequest:
    """A decode row of one request that samples this step."""
    return ScheduledRequest(request_id, [1], 0, [0], [0], params, needs_sample=True,
                            prompt_token_ids=list(prompt_token_ids), output_token_ids=list(output_token_ids))


def plan(*rows: ScheduledRequest, eos=(EOS,), vocab_size: int = V) -> SamplingPlan:
    return SamplingPlan.from_rows(rows, eos, vocab_size)


def test_all_greedy_step_is_one_argmax_and_draws_nothing():
    p = plan(row("a", SamplingParams(temperature=0.0)), row("b", SamplingParams(temperature=1e-6)),
             row("c", SamplingParams(temperature=0.9, top_k=1, seed=3)))
    assert p.greedy_rows == (0, 1, 2) and p.draws is None
    assert p.is_all_greedy and p.is_plain_argmax
    assert p.penalties is None and p.banned is None and p.logprob_rows == ()


def test_penalties_logprobs_or_masks_leave_the_plain_argmax():
    greedy = dict(temperature=0.0)
    assert not plan(row("a", SamplingParams(**greedy, logprobs=0))).is_plain_argmax
    assert not plan(row("a", SamplingParams(**greedy, presence_penalty=0.5))).is_plain_argmax
    masked = plan(row("a", SamplingParams(**greedy, min_tokens=1)))
    assert masked.is_all_greedy and not masked.is_plain_argmax


def test_rows_split_into_greedy_and_drawing_with_logprob_counts():
    p = plan(row("a", SamplingParams(temperature=0.7, logprobs=5)), row("b", SamplingParams(temperature=0.0)),
             row("c", SamplingParams(temperature=1.2, logprobs=0)), row("d", SamplingParams(top_k=1, logprobs=2)))
    assert p.greedy_rows == (1, 3)
    assert p.draws.rows == (0, 2)
    np.testing.assert_array_equal(p.draws.temperature, np.array([0.7, 1.2], dtype=np.float32))
    assert p.logprob_rows == (0, 2, 3) and p.num_top_logprobs == (5, 0, 2)
    assert not p.is_all_greedy


def test_penalty_rows_values_and_sparse_counts():
    p = plan(row("a", SamplingParams(repetition_penalty=1.5), prompt_token_ids=[5, 5, 7], output_token_ids=[9, 7]),
             row("b", SamplingParams()),                                          # no penalty: not planned
             row("c", SamplingParams(frequency_penalty=0.5, presence_penalty=-1.0),
                 prompt_token_ids=[1], output_token_ids=[4, 4, 4, 6, V + 3]))       # an id past the vocab
    pen = p.penalties
    assert pen.rows == (0, 2)
    np.testing.assert_array_equal(pen.repetition, [1.5, 1.0])
    np.testing.assert_array_equal(pen.frequency, [0.0, 0.5])
    np.testing.assert_array_equal(pen.presence, [0.0, -1.0])
    assert pen.needs_repetition and pen.needs_output_penalties
    # repetition: each token of prompt + output once, for row "a" only (position 0 of rows)
    assert list(zip(pen.seen_rows.tolist(), pen.seen_token_ids.tolist())) == [(0, 5), (0, 7), (0, 9)]
    # frequency / presence: output counts of row "c" (position 1), ids inside the vocabulary
    assert list(zip(pen.count_rows.tolist(), pen.count_token_ids.tolist(), pen.counts.tolist())) == \
        [(1, 4, 3.0), (1, 6, 1.0)]


def test_no_penalty_plans_none():
    assert plan_penalties([[1, 2]], [[3]], [1.0], [0.0], [0.0], V) is None


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    short = SamplingParams(min_tokens=3, stop_token_ids=(8, V + 1))             # V + 1: outside the logits
    p = plan(row("a", short, output_token_ids=[1]),
             row("b", short, output_token_ids=[1, 1, 1]),                       # reached: nothing banned
             row("c", SamplingParams(min_tokens=2, ignore_eos=True, stop_token_ids=(4,))),
             eos=(EOS, 50))
    assert list(zip(p.banned.rows.tolist(), p.banned.token_ids.tolist())) == [(0, EOS), (0, 8), (0, 50), (2, 4)]
    assert plan(row("a", short, output_token_ids=[1, 2, 3])).banned is None


def test_stages_a_step_does_not_need_are_none():
    d = plan(row("a", SamplingParams(temperature=1.0)), row("b", SamplingParams(temperature=0.5))).draws
    assert d.min_p_log is None and d.top_k_top_p is None
    d = plan(row("a", SamplingParams(min_p=0.25)), row("b", SamplingParams())).draws
    assert d.min_p_log.dtype == np.float32 and d.min_p_log.tolist() == [np.float32(np.log(0.25)), -np.inf]
    assert d.top_k_top_p is None


@pytest.mark.parametrize("top_k,top_p,num_candidates,needs_full_total", [
    ([5, 0, 40], [1.0, 1.0, 1.0], V, False),                     # top_k only, one row unlimited: whole vocab
    ([5, 3, 40], [1.0, 1.0, 1.0], 40, False),                    # top_k only: the largest k
    ([5, 30], [0.9, 1.0], 30, True),                             # every row has a top_k: the largest k
    ([0, 3], [0.9, 0.5], TOP_P_CANDIDATES, True),                # an unbounded nucleus: the first window
    ([0, 80], [0.9, 1.0], 80, True),                             # a top_k past the window widens it
    ([0, 500], [0.9, 1.0], V, True),                             # capped at the vocabulary
])
def test_top_k_top_p_candidate_search(top_k, top_p, num_candidates, needs_full_total):
    stage = plan_top_k_top_p(top_k, top_p, V)
    assert stage.num_candidates == num_candidates and stage.needs_full_total == needs_full_total
    assert stage.k.tolist() == [t if 0 < t < V else V for t in top_k]
    assert stage.p.tolist() == [pytest.approx(q) if q < 1 else np.inf for q in top_p]
    assert stage.next_num_candidates(4) == 64 and stage.next_num_candidates(64) == V


def test_unused_filters_plan_none():
    assert plan_top_k_top_p([0, 0], [1.0, 1.0], V) is None
    assert plan_min_p([0.0, 0.0]) is None


def test_seeded_rows_carry_their_seed_and_draws_so_far():
    p = plan(row("g", SamplingParams(temperature=0.0, seed=1)),                # greedy: no draw at all
             row("u", SamplingParams(temperature=1.0)),
             row("s", SamplingParams(temperature=1.0, seed=77), output_token_ids=[3, 4, 5]),
             row("v", SamplingParams(temperature=0.5)))
    d = p.draws
    assert d.rows == (1, 2, 3) and d.unseeded == (0, 2)
    assert [(s.position, s.request_id, s.seed, s.num_drawn) for s in d.seeded] == [(1, "s", 77, 3)]


def test_inconsistent_plans_are_rejected():
    empty = np.zeros(0, dtype=np.int64)
    with pytest.raises(ValueError):
        TokenMask(rows=empty, token_ids=empty)
    with pytest.raises(ValueError):
        DrawPlan(rows=(0, 1), temperature=np.ones(2, dtype=np.float32), min_p_log=None, top_k_top_p=None,
                 unseeded=(0,), seeded=())                                       # position 1 draws from nowhere
    with pytest.raises(ValueError):
        SamplingPlan(num_rows=2, vocab_size=V, logprob_rows=(), num_top_logprobs=(), penalties=None,
                     banned=None, greedy_rows=(0,), draws=None)                  # row 1 neither greedy nor drawn


def test_the_plan_and_its_runner_import_no_array_framework():
    code = ("import sys, backends.sampling_plan, backends.plan_sampler; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
