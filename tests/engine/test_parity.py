"""Greedy output equals Hugging Face transformers token for token (fp32)."""

from __future__ import annotations

import pytest
import torch

from bench.hf_baseline import build_hf_model
from engine import LLM, SamplingParams
from engine.model_loader import load_model
from tests.factories import make_tiny_hf_model

NEW_TOKENS = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "List three uses of paged memory in operating systems:",
    "Translate to French: The cat sleeps on the sofa.",
    "1, 1, 2, 3, 5, 8,",
    "Les grandes villes d'Europe sont",
    "Q: Why is the sky blue?\nA:",
]
CHATS = [
    [{"role": "user", "content": "What is continuous batching?"}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "Name a prime number larger than 10."}],
]


def hf_greedy(model, prompt_ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """HF greedy decoding that, like ignore_eos, neither stops at nor masks EOS."""
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def default_llm():
    return LLM(max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def default_hf():
    loaded = load_model(None)
    return build_hf_model(loaded.config, loaded.weights)


@pytest.mark.slow
def test_default_model_matches_hf_on_plain_and_chat_prompts(default_llm, default_hf):
    outs = default_llm.generate(PROMPTS, GREEDY) + default_llm.chat(CHATS, GREEDY)
    assert len(outs) == len(PROMPTS) + len(CHATS)
    for out in outs:
        expected = hf_greedy(default_hf, out.prompt_token_ids)
        assert out.outputs[0].token_ids == expected, f"diverged on {out.prompt!r}"


@pytest.mark.parametrize("arch,kwargs", [
    ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),                       # GQA
    ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),                       # qkv bias
    ("llama", dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4)),
    ("mistral", dict(num_attention_heads=4, num_key_value_heads=1)),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
])
def test_tiny_models_match_hf(tmp_path, arch, kwargs):
    from transformers import AutoModelForCausalLM

    path = make_tiny_hf_model(tmp_path, arch=arch, **kwargs)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), num_kv_blocks=64)
    prompts = ["hello world, this is a test", "日本語 and émoji 🎉", "a b c d e f g h i j k l m n o p q r s"]
    for out in llm.generate(prompts, GREEDY):
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), arch="llama")


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 300, (int(torch.randint(3, 90, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_batch_of_32_equals_each_alone(tiny_path):
    llm = LLM(str(tiny_path), num_kv_blocks=512)
    prompts = _prompts(32)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts[:6]]
    assert batched[:6] == alone


def test_chunked_prefill_and_preemption_do_not_change_outputs(tiny_path):
    prompts = _prompts(12, seed=1)
    reference = [o.outputs[0].token_ids for o in LLM(str(tiny_path), num_kv_blocks=512).generate(prompts, GREEDY)]
    chunked = LLM(str(tiny_path), num_kv_blocks=512, max_num_batched_tokens=16)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, GREEDY)] == reference
    tight = LLM(str(tiny_path), num_kv_blocks=24, block_size=8)   # 192 slots for 12 requests: preemption
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, GREEDY)] == reference
    assert tight.get_stats().num_preemptions > 0
    assert tight.get_stats().kv_blocks_free == 24


def test_prefix_caching_on_and_off_give_identical_outputs(tiny_path):
    base = list(range(20, 52))                       # 32 tokens: ends exactly on a block boundary
    prompts = [base, base + [77], base[:-1], base + [5, 6, 7]]
    off = LLM(str(tiny_path), num_kv_blocks=256, enable_prefix_caching=False)
    on = LLM(str(tiny_path), num_kv_blocks=256)
    expected = [o.outputs[0].token_ids for o in off.generate(prompts, GREEDY)]
    on.generate([base + [1, 2]], GREEDY)             # warm the cache
    outs = on.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert outs[1].num_cached_tokens == 32 and outs[0].num_cached_tokens == 16
    assert on.get_stats().prefix_cache_hits > 0
