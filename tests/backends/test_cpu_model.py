"""The torch model on the cpu backend against transformers' full forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backends.cpu.backend import CONTIGUOUS_MIN_ROWS, LINEAR_ROW_BLOCK, CPUBackend, cpu_linear
from backends.torch_model.rope import compute_inv_freq
from model.config import ModelConfig
from engine.sampling_params import SamplingParams
from scheduler.output import SchedulerOutput

from tests.backends import PagedSequence, hf_logits, random_tokens, step, tiny_model

BS = 16
ATOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def make_backend(model_config, weights, num_blocks=48, **options) -> CPUBackend:
    backend = CPUBackend(model_config, weights, **options)
    backend.allocate_kv_cache(num_blocks, BS)
    return backend


def shuffled_blocks(n: int, seed: int, num_blocks: int = 48) -> list[int]:
    return np.random.default_rng(seed).permutation(num_blocks)[:n].tolist()


def run_chunks(backend, seq: PagedSequence, chunk_lens: list[int]) -> torch.Tensor:
    """Logits of every position, computed chunk by chunk through the paged cache."""
    rows = [backend.compute_logits(step([seq.chunk(n)], BS), all_tokens=True) for n in chunk_lens]
    return torch.cat(rows)                                                       # [L, V]


@pytest.mark.parametrize("chunk_lens", [[40], [13, 17, 10], [20, 1, 1, 1, 1, 1, 1, 14]],
                         ids=["prefill", "chunked", "prefill+decode"])
def test_logits_match_hf(llama, chunk_lens):
    hf, config, weights = llama
    tokens = random_tokens(40, config.vocab_size, seed=1)
    backend = make_backend(config, weights)
    seq = PagedSequence("a", tokens, shuffled_blocks(3, seed=2), BS)
    torch.testing.assert_close(run_chunks(backend, seq, chunk_lens), hf_logits(hf, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["qwen2", "tied", "llama3_rope"])
def test_variants_match_hf(variant):
    if variant == "qwen2":
        hf, config, weights = tiny_model("qwen2", seed=3)
        assert config.attention_bias and "model.layers.0.self_attn.q_proj.bias" in weights
    elif variant == "tied":
        hf, config, weights = tiny_model("llama", seed=4, tie_word_embeddings=True)
        assert "lm_head.weight" not in weights
    else:
        hf, config, weights = tiny_model("llama", seed=5, rope_scaling=dict(LLAMA3_ROPE))
        plain = ModelConfig(**{**config.to_dict(), "rope_scaling": None})
        assert not torch.equal(compute_inv_freq(config), compute_inv_freq(plain))
    tokens = random_tokens(100, config.vocab_size, seed=6)                      # past 64 original positions
    backend = make_backend(config, weights)
    seq = PagedSequence("a", tokens, shuffled_blocks(7, seed=7), BS)
    torch.testing.assert_close(run_chunks(backend, seq, [70, 1, 29]), hf_logits(hf, tokens), atol=ATOL, rtol=0)


def test_llama3_inv_freq_equals_hf():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf, config, _ = tiny_model("llama", rope_scaling=dict(LLAMA3_ROPE))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**hf.config.to_dict()))
    assert torch.equal(compute_inv_freq(config), expected)


def test_mixed_batch_equals_each_request_alone(llama):
    hf, config, weights = llama
    blocks = shuffled_blocks(48, seed=8)
    # (context length at the decode step) for decodes; one chunked prefill 10 + 12 tokens
    decode_lens = [1, 15, 16, 17, 40]
    lens = decode_lens + [22]
    tables, start = [], 0
    for n in lens:
        k = -(-n // BS)
        tables.append(blocks[start:start + k])
        start += k
    prompts = [random_tokens(n, config.vocab_size, seed=10 + i) for i, n in enumerate(lens)]
    backend = make_backend(config, weights)
    seqs = [PagedSequence(f"r{i}", p, t, BS) for i, (p, t) in enumerate(zip(prompts, tables))]
    # earlier steps: everything but the last token of the decodes, the first chunk of the prefill
    warmup = [s.chunk(n - 1) for s, n in zip(seqs[:-1], decode_lens) if n > 1] + [seqs[-1].chunk(10)]
    backend.compute_logits(step(warmup, BS))
    mixed = [seqs[-1].chunk(12)] + [s.chunk(1) for s in seqs[:-1]]
    assert all(r.slot_mapping[-1] % BS != BS - 1 for r in mixed[1:3])            # last blocks partly filled
    logits = backend.compute_logits(step(mixed, BS))                           # [6, V]

    for row, request in enumerate(mixed):
        i = int(request.request_id[1:])
        alone = make_backend(config, weights, num_blocks=4)
        seq = PagedSequence("x", prompts[i], list(range(len(tables[i])))[::-1], BS)
        expected = alone.compute_logits(step([seq.chunk(len(prompts[i]))], BS))[0]
        torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[row], hf_logits(hf, prompts[i])[-1], atol=ATOL, rtol=0)


def test_greedy_generation_matches_hf(llama):
    hf, config, weights = llama
    backend = make_backend(config, weights)
    prompts = [random_tokens(n, config.vocab_size, seed=20 + n) for n in (9, 23)]
    seqs = [PagedSequence(f"g{i}", p, shuffled_blocks(3, seed=30 + i, num_blocks=24) if i == 0
                          else shuffled_blocks(27, seed=31)[24:], BS) for i, p in enumerate(prompts)]
    scheduled = [s.chunk(len(p)) for s, p in zip(seqs, prompts)]
    generated = [[] for _ in prompts]
    for _ in range(6):
        result = backend.execute(step(scheduled, BS))
        scheduled = []
        for i, s in enumerate(seqs):
            token = result.sampled_token_ids[s.request_id]
            generated[i].append(token)
            s.token_ids.append(token)
            scheduled.append(s.chunk(1))
    for prompt, tokens in zip(prompts, generated):
        expected = list(prompt)
        for _ in range(6):
            expected.append(int(hf_logits(hf, expected)[-1].argmax()))
        assert tokens == expected[len(prompt):]


def test_bfloat16_is_close_to_float32(llama):
    _, config, weights = llama
    tokens = random_tokens(30, config.vocab_size, seed=40)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        backend = make_backend(config, weights, dtype=dtype)
        assert backend.kv_caches[0][0].dtype == getattr(torch, dtype)
        logits[dtype] = run_chunks(backend, PagedSequence("a", tokens, [5, 1], BS), [20, 1, 9])
    assert logits["bfloat16"].dtype == torch.float32
    assert (logits["bfloat16"] - logits["float32"]).abs().max() < 0.1 * logits["float32"].abs().max()


def test_execute_logprobs_and_dropping_seeded_state(llama):
    _, config, weights = llama
    backend = make_backend(config, weights, seed=3)
    params = SamplingParams(temperature=1.0, seed=11, logprobs=2)
    seq = PagedSequence("s", random_tokens(5, config.vocab_size, seed=41), [0], BS, params)
    result = backend.execute(step([seq.chunk(5)], BS))
    lp = result.logprobs["s"]
    assert lp.token_id == result.sampled_token_ids["s"] and len(lp.top) == 2 and lp.rank >= 1
    assert backend.sampler.num_seeded_generators == 1
    backend.execute(SchedulerOutput(scheduled=[], block_size=BS, finished_request_ids={"s"}))
    assert backend.sampler.num_seeded_generators == 0


def test_chunk_without_sampling_returns_nothing(llama):
    _, config, weights = llama
    backend = make_backend(config, weights)
    seq = PagedSequence("a", random_tokens(20, config.vocab_size, seed=42), [3, 4], BS)
    assert backend.execute(step([seq.chunk(12, needs_sample=False)], BS)).sampled_token_ids == {}


def test_backend_sizes_and_validation(llama):
    _, config, weights = llama
    with pytest.raises(ValueError, match="dtype"):
        CPUBackend(config, weights, dtype="float16")
    with pytest.raises(ValueError, match="num_threads"):
        CPUBackend(config, weights, num_threads=0)
    missing = {k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match="up_proj"):
        CPUBackend(config, missing)
    with pytest.raises(ValueError, match="shape"):
        CPUBackend(config, {**weights, "model.norm.weight": np.ones(3, np.float32)})
    backend = CPUBackend(config, weights)
    # 2 (K, V) x 2 layers x 16 tokens x 2 kv heads x 16 dims x 4 bytes
    assert backend.kv_block_bytes(BS) == 2 * 2 * 16 * 2 * 16 * 4
    assert backend.num_blocks_for_memory(10 * backend.kv_block_bytes(BS) + 1, BS) == 10
    assert CPUBackend(config, weights, dtype="bfloat16").kv_block_bytes(BS) == backend.kv_block_bytes(BS) // 2
    with pytest.raises(RuntimeError):
        backend.execute(step([PagedSequence("a", [1, 2], [0], BS).chunk(2)], BS))


@pytest.mark.parametrize("rows", [0, 1, 3, 17, 300])
@pytest.mark.parametrize("out_features,with_bias", [(24, False), (24, True), (5000, True), (9000, False)])
def test_cpu_linear_equals_f_linear(rows, out_features, with_bias):
    g = torch.Generator().manual_seed(rows + out_features)
    x = torch.randn(rows, 32, generator=g)
    w = torch.randn(out_features, 32, generator=g)
    bias = torch.randn(out_features, generator=g) if with_bias else None
    out = cpu_linear(x, w, bias)
    assert out.shape == (rows, out_features)
    torch.testing.assert_close(out, F.linear(x, w, bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [17, 64, 300])
def test_cpu_linear_threshold_moves_the_orientation_not_the_result(rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 32, generator=g), torch.randn(9000, 32, generator=g)       # 9000: row blocks too
    low, default = cpu_linear(x, w, contiguous_min_rows=9), cpu_linear(x, w)
    assert low.is_contiguous()                                       # F.linear from 9 rows on
    assert default.is_contiguous() == (rows >= CONTIGUOUS_MIN_ROWS or w.shape[0] > 2 * LINEAR_ROW_BLOCK)
    torch.testing.assert_close(low, default, atol=1e-5, rtol=1e-5)


def test_choose_contiguous_min_rows_picks_a_candidate_or_the_default():
    from backends.cpu.linear import CONTIGUOUS_CANDIDATE_ROWS, choose_contiguous_min_rows

    weights = [torch.randn(960, 576), torch.randn(576, 1536)]
    rows, rates = choose_contiguous_min_rows(weights, passes=1)
    assert rows in CONTIGUOUS_CANDIDATE_ROWS + (CONTIGUOUS_MIN_ROWS,)
    tried = CONTIGUOUS_CANDIDATE_ROWS[: CONTIGUOUS_CANDIDATE_ROWS.index(rows) + 1] \
        if rows in CONTIGUOUS_CANDIDATE_ROWS else CONTIGUOUS_CANDIDATE_ROWS
    assert set(rates) == {f"{way}_{r}_gflops" for r in tried for way in ("linear", "view")}
    assert all(v > 0 for v in rates.values())


def test_the_start_up_gemm_measurements_skip_a_model_that_sits_in_cache(monkeypatch):
    from backends.cpu import backend as cpu_backend
    from backends.cpu.linear import CONTIGUOUS_CANDIDATE_ROWS
    from tests.backends import tiny_model

    _, config, weights = tiny_model("llama", seed=4)
    assert CPUBackend(config, weights).model.linear is cpu_linear            # under TUNE_MIN_BYTES: as built
    monkeypatch.setattr(cpu_backend, "TUNE_MIN_BYTES", 0)
    tuned = CPUBackend(config, weights).model.linear                         # measured: cpu_linear, a threshold
    assert tuned.func is cpu_linear
    assert tuned.keywords["contiguous_min_rows"] in CONTIGUOUS_CANDIDATE_ROWS + (CONTIGUOUS_MIN_ROWS,)


def test_cpu_linear_bfloat16_upcast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g).bfloat16()
    w = torch.randn(40, 32, generator=g).bfloat16()
    out = cpu_linear(x, w, None, upcast_min_rows=4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), atol=0.1, rtol=0.02)
