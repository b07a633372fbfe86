"""Sliding windows through the whole engine: the same tokens however the scheduler cuts the work.

For each windowed family (Gemma 2: alternating, Gemma 3: 2 of 3 layers and
per-layer RoPE, Mistral: every layer; window 8 tokens) the transformers
greedy tokens of four prompts longer than the window must come out alone,
batched with other requests, with chunked prefill cutting each prompt into
5-token chunks (boundaries inside the window), after preemption, and after a
prefix-cache hit on 24 tokens (blocks of 4: the hit ends inside the window of
the first new token). On cpu and metal (MLX's CPU build).
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.models import WINDOW, WINDOWED, family_dir, hf_reference, random_prompts

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
BACKENDS = ["cpu", pytest.param("metal", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("mlx") is None, reason="needs mlx"))]
BLOCK = 4

_base = random_prompts(3, seed=11, low=28, high=44)
SHARED = _base[0][:24]                                   # 24 shared tokens: 6 full blocks, 3 windows
PROMPTS = tuple(map(tuple, _base + [SHARED + random_prompts(1, seed=12, low=9, high=12)[0]]))
OTHERS = random_prompts(3, seed=13, low=3, high=7)       # short requests batched alongside


def reference(family: str) -> list[list[int]]:
    return [list(t) for t in hf_reference(family, PROMPTS, NEW_TOKENS)]


def greedy(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([list(p) for p in prompts], GREEDY)]


def engine(family: str, backend: str, **kwargs) -> LLM:
    options = {"num_kv_blocks": 256, "block_size": BLOCK, **kwargs}
    return LLM(str(family_dir(family)), backend=backend, dtype="float32", **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", WINDOWED)
def test_alone_and_batched_with_others(family, backend):
    llm = engine(family, backend, enable_prefix_caching=False)
    expected = reference(family)
    assert [greedy(llm, [p])[0] for p in PROMPTS[:2]] == expected[:2]
    batched = greedy(llm, [*OTHERS[:2], *PROMPTS, OTHERS[2]])
    assert batched[2:6] == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", WINDOWED)
def test_chunked_prefill_splitting_inside_the_window(family, backend):
    chunk = WINDOW - 3
    llm = engine(family, backend, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    assert greedy(llm, PROMPTS) == reference(family)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", WINDOWED)
def test_after_preemption(family, backend):
    llm = engine(family, backend, num_kv_blocks=40, enable_prefix_caching=False)   # 160 slots for ~280 tokens
    assert greedy(llm, PROMPTS) == reference(family)
    stats = llm.get_stats()
    assert stats.num_preemptions > 0 and stats.kv_blocks_free == 40


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", WINDOWED)
def test_with_a_prefix_cache_hit(family, backend):
    llm = engine(family, backend)
    first, *_ = greedy(llm, [PROMPTS[0]])
    out = llm.generate([list(PROMPTS[3])], GREEDY)[0]
    assert out.num_cached_tokens == len(SHARED) > WINDOW
    assert [first, out.outputs[0].token_ids] == [reference(family)[0], reference(family)[3]]
