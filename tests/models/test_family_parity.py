"""Greedy output of every family equals transformers token for token (float32), on cpu and metal.

Each family's tiny model (``tests.models``) generates 32 tokens for three
prompts longer than the sliding window, batched; each must equal
transformers' greedy decoding of that prompt alone. Phi-3's prompts either
stay within LongRoPE's original context or start beyond it (see
``test_phi3_switching_to_long_factors_mid_decode_follows_the_cached_forward``
for a request that crosses it). GGUF files written by the ``gguf`` package
(Qwen3, Gemma 2, Qwen3-MoE) load back to the same tokens. The metal backend
runs MLX's CPU build here.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.models import FAMILIES, PHI3_ORIGINAL_MAX, family_dir, hf_model, hf_reference, random_prompts
from tests.models.gguf_writer import write_gguf

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
BACKENDS = ["cpu", pytest.param("metal", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("mlx") is None, reason="needs mlx"))]


def prompts_for(family: str) -> tuple[tuple[int, ...], ...]:
    """Three prompts (12-47 tokens, all longer than the window); Phi-3's do not cross 64 tokens mid-decode."""
    if family == "phi3":
        short = random_prompts(2, seed=5, low=12, high=PHI3_ORIGINAL_MAX - NEW_TOKENS)
        long = random_prompts(1, seed=6, low=PHI3_ORIGINAL_MAX + 1, high=PHI3_ORIGINAL_MAX + 20)
        return tuple(map(tuple, short + long))
    return tuple(map(tuple, random_prompts(3, seed=1)))


def greedy(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([list(p) for p in prompts], GREEDY)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(family, backend):
    prompts = prompts_for(family)
    llm = LLM(str(family_dir(family)), backend=backend, dtype="float32", num_kv_blocks=64)
    assert llm.engine.model_config.architecture == family
    assert greedy(llm, prompts) == [list(t) for t in hf_reference(family, prompts, NEW_TOKENS)]


def hf_cached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' model decoding with its KV cache, one token per forward (no generate() re-encoding)."""
    import torch
    from transformers import DynamicCache

    cache, tokens, ids = DynamicCache(config=model.config), [], torch.tensor([prompt])
    with torch.inference_mode():
        for step in range(n):
            positions = torch.arange(len(prompt) + step - ids.shape[1], len(prompt) + step)[None]
            logits = model(ids, cache=cache, use_cache=True, position_ids=positions).logits
            tokens.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_phi3_switching_to_long_factors_mid_decode_follows_the_cached_forward(backend):
    """A request that grows past ``original_max_position_embeddings`` switches to the long factors then.

    pagedgen picks the factor set per request by its context length, as
    transformers' rotary picks it per forward pass; keys already cached keep
    the short factors. (``generate()`` additionally re-encodes the whole
    sequence once at the switch, Phi3ForCausalLM.prepare_inputs_for_generation;
    pagedgen does not, as that would rewrite blocks the prefix cache shares.)
    """
    prompt = random_prompts(1, seed=7, low=PHI3_ORIGINAL_MAX - 10, high=PHI3_ORIGINAL_MAX - 5)[0]
    llm = LLM(str(family_dir("phi3")), backend=backend, dtype="float32", num_kv_blocks=64)
    assert greedy(llm, [prompt]) == [hf_cached_greedy(hf_model(family_dir("phi3")), prompt, NEW_TOKENS)]


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "qwen3_moe"])
def test_gguf_written_by_the_gguf_package_loads_to_the_same_tokens(family, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDGEN_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(family_dir(family), tmp_path / f"tiny-{family}.gguf")
    prompts = prompts_for(family)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64)
    assert llm.engine.model_config.architecture == family
    assert greedy(llm, prompts) == [list(t) for t in hf_reference(family, prompts, NEW_TOKENS)]
