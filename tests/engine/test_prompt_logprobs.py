"""Prompt logprobs (scoring) equal Hugging Face's log_softmax, whatever the cache or the chunking."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.factories import make_tiny_hf_model

TOL = 1e-4
SCORE = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), arch="llama")


@pytest.fixture(scope="module")
def hf(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()                  # [P, V]
    return torch.log_softmax(logits, dim=-1)                                           # [P, V]


def assert_matches_hf(out, hf_model) -> None:
    ids = out.prompt_token_ids
    lps = out.prompt_logprobs
    assert lps is not None and len(lps) == len(ids) and lps[0] is None
    ref = hf_prompt_logprobs(hf_model, ids)
    for pos in range(1, len(ids)):
        lp = lps[pos]
        row = ref[pos - 1]
        assert lp.token_id == ids[pos]
        assert abs(lp.logprob - row[ids[pos]].item()) < TOL, pos
        assert lp.rank == int((row > row[ids[pos]]).sum()) + 1
        top_ids = row.topk(3).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids
        for t, v in lp.top:
            assert abs(v - row[t].item()) < TOL


PROMPT = [11 + (7 * i) % 250 for i in range(45)]         # 45 tokens: several blocks of 16 and a partial one


def test_prompt_logprobs_equal_hf(tiny_path, hf):
    llm = LLM(str(tiny_path), num_kv_blocks=64)
    (out,) = llm.generate([PROMPT], SCORE)
    assert_matches_hf(out, hf)


def test_prefix_cache_hit_and_chunked_prefill_give_the_same_prompt_logprobs(tiny_path, hf):
    llm = LLM(str(tiny_path), num_kv_blocks=64, max_num_batched_tokens=16)      # 45 tokens in three chunks
    (first,) = llm.generate([PROMPT], SCORE)
    assert_matches_hf(first, hf)
    plain = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1))[0]
    assert plain.num_cached_tokens == 32                                           # the cache holds the prompt
    (again,) = llm.generate([PROMPT], SCORE)
    assert again.num_cached_tokens == 0                                            # recomputed, not served
    assert [(lp.token_id, lp.logprob, lp.rank, lp.top) for lp in again.prompt_logprobs[1:]] == \
        [(lp.token_id, lp.logprob, lp.rank, lp.top) for lp in first.prompt_logprobs[1:]]


def test_batched_with_other_requests_and_n_gt_1(tiny_path, hf):
    llm = LLM(str(tiny_path), num_kv_blocks=128)
    params = [SamplingParams(temperature=0.0, max_tokens=4),
              SamplingParams(temperature=0.5, max_tokens=3, n=2, seed=1, prompt_logprobs=3),
              SCORE]
    prompts = [PROMPT[:20], PROMPT[5:30], PROMPT]
    outs = llm.generate(prompts, params)
    assert outs[0].prompt_logprobs is None
    assert_matches_hf(outs[1], hf)
    assert_matches_hf(outs[2], hf)
    assert len(outs[1].outputs) == 2


def test_prompt_logprobs_out_of_range_is_refused():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_metal_backend_matches_cpu(tiny_path):
    pytest.importorskip("mlx.core")
    cpu = LLM(str(tiny_path), num_kv_blocks=64, max_num_batched_tokens=16).generate([PROMPT], SCORE)[0]
    metal = LLM(str(tiny_path), num_kv_blocks=64, max_num_batched_tokens=16, backend="metal", dtype="float32").generate(
        [PROMPT], SCORE)[0]
    for a, b in zip(cpu.prompt_logprobs[1:], metal.prompt_logprobs[1:]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < TOL and a.rank == b.rank
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
