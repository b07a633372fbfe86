"""The cuda backend (Triton kernels; on CPU under the interpreter) serves every family token-for-token like transformers.

One prompt longer than the window per family, 32 greedy tokens through the
whole engine (scheduler, paged cache, the cuda model's pieces, the Triton
attention with the layer's window / scale / soft-cap, LongRoPE cos/sin, the
grouped MoE kernel), float32, no CUDA graphs on CPU. Gemma 3 (sliding and
full layers, per-layer RoPE bases) also runs batched under a cache small
enough to preempt, and then with a prefix-cache hit (chunks that start inside
the window are covered kernel-side, ``test_window_kernels``; through the
engine on cpu and metal, ``tests/models/test_window_scenarios``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from backends.cuda.backend import CUDABackend  # noqa: E402
from engine.args import EngineArgs  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model_loader import load_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from tests.backends.cuda.conftest import DEVICE  # noqa: E402
from tests.models import FAMILIES, WINDOW, family_dir, hf_reference, random_prompts  # noqa: E402

NEW_TOKENS = 32
PROMPT = tuple(random_prompts(1, seed=21, low=14, high=20)[0])


def cuda_engine(family: str, **args) -> LLMEngine:
    """An engine over the cuda backend on ``DEVICE`` (float32, eager: the interpreter has no graphs)."""
    loaded = load_model(family_dir(family))
    backend = CUDABackend(loaded.config, loaded.weights, dtype="float32", device=DEVICE,
                          cuda_graph_mode="none" if DEVICE == "cpu" else "full", max_num_batched_tokens=64,
                          max_num_seqs=4)
    backend.allow_tf32 = False
    options = {"num_kv_blocks": 64, "max_num_batched_tokens": 64, "max_num_seqs": 4, **args}
    return LLMEngine(EngineArgs(model=str(family_dir(family)), **options), loaded=loaded, backend=backend)


def greedy(engine: LLMEngine, prompts) -> list[list[int]]:
    """Greedy tokens of ``prompts`` submitted together; in prompt order."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ids = [f"r{next(_ids)}" for _ in prompts]
    tokens = {rid: [] for rid in ids}
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt_token_ids=list(prompt), sampling_params=params)
    finished = set()
    while len(finished) < len(ids):
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
            if out.finished:
                finished.add(out.request_id)
    return [tokens[rid] for rid in ids]


_ids = iter(range(10**9))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(family):
    assert greedy(cuda_engine(family), [PROMPT]) == [list(hf_reference(family, (PROMPT,), NEW_TOKENS)[0])]


def test_windowed_batch_preempted_then_prefix_hit():
    prompts = [tuple(p) for p in random_prompts(2, seed=22, low=26, high=30)]
    follow_up = prompts[0][:24] + tuple(random_prompts(1, seed=23, low=6, high=8)[0])   # 24 shared tokens
    expected = hf_reference("gemma3", (*prompts, follow_up), NEW_TOKENS)
    engine = cuda_engine("gemma3", block_size=4, num_kv_blocks=24)              # 96 slots for ~120 tokens
    assert greedy(engine, prompts) == [list(t) for t in expected[:2]]
    assert engine.get_stats().num_preemptions > 0
    assert greedy(engine, [follow_up]) == [list(expected[2])]
    assert engine.get_stats().prefix_cache_hits >= 24 > WINDOW
