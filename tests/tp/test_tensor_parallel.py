"""Tensor parallelism on CPU: 2 ranks over gloo (the driver plus one worker process).

Greedy parity with one rank on tiny models whose heads split in two (GQA
llama with untied embeddings, qwen2 with q/k/v biases and tied embeddings, a
vocabulary that does not divide by two), the clear error for the default
model's 9 / 3 heads, and a killed worker turning the service NOT_SERVING
with a clear status instead of a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import replace

import grpc
import numpy as np
import pytest

from backends.tp.sharding import check_tp_size, shard_config, shard_weights, valid_tp_sizes
from engine import LLM, SamplingParams
from model.config import ModelConfig
from model.weights.canonical import expected_shapes
from model.weights.safetensors_io import read_safetensors, write_safetensors
from tests.factories import make_tiny_hf_model

PROMPTS = [
    "The cat watches the morning light and",
    "Line 12: 444 items cost",
    "A small robot builds a paper boat, then the quiet engineer explains the answer to every student",
    "def add(a, b):",
    "héllo wörld",
]
# Greedy, with top-3 logprobs: the logprobs see the whole gathered vocabulary (padding included, were it leaked).
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
# Small steps: the long prompt is prefilled in chunks alongside the others' decodes.
ENGINE = dict(backend="cpu", num_kv_blocks=96, block_size=8, max_num_batched_tokens=16, max_num_seqs=4)


def _pad_vocab(src, dst, extra: int = 1):
    """Copy the HF model at ``src`` with ``extra`` more vocabulary rows (zero LM-head rows)."""
    shutil.copytree(src, dst)
    weights = read_safetensors(dst / "model.safetensors")
    rng = np.random.default_rng(0)
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = np.concatenate(
        [embed, rng.normal(0, 0.02, (extra, embed.shape[1])).astype(np.float32)])
    weights["lm_head.weight"] = np.concatenate(
        [weights["lm_head.weight"], np.zeros((extra, embed.shape[1]), np.float32)])
    write_safetensors(dst / "model.safetensors", weights)
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] += extra
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-models")
    llama = make_tiny_hf_model(root, "llama", num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
    qwen2 = make_tiny_hf_model(root, "qwen2", num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=True, seed=1)
    return {"llama-gqa-untied-odd-vocab": _pad_vocab(llama, root / "llama-odd-vocab"), "qwen2-bias-tied": qwen2}


def _generate(model_dir, tensor_parallel_size: int):
    llm = LLM(str(model_dir), tensor_parallel_size=tensor_parallel_size, **ENGINE)
    try:
        outs = llm.generate(PROMPTS, GREEDY)
        workers = list(getattr(llm.engine.backend, "workers", []))
        return outs, workers, llm.engine.model_config
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("name", ["llama-gqa-untied-odd-vocab", "qwen2-bias-tied"])
def test_two_ranks_generate_what_one_rank_generates(model_dirs, name):
    one, _, config = _generate(model_dirs[name], 1)
    two, workers, _ = _generate(model_dirs[name], 2)
    assert len(workers) == 1
    assert [w.poll() for w in workers] == [0]                     # shut down cleanly, no orphan
    assert len(one[2].prompt_token_ids) > ENGINE["max_num_batched_tokens"]   # prefilled in chunks
    if name == "llama-gqa-untied-odd-vocab":                      # the last rank's vocabulary shard is padded
        assert config.vocab_size % 2 == 1 and not config.tie_word_embeddings
    for a, b in zip(one, two):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].text == a.outputs[0].text
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert [t for t, _ in lb.top] == [t for t, _ in la.top]
            assert lb.logprob == pytest.approx(la.logprob, abs=1e-4)


def test_the_default_models_heads_do_not_split_in_two():
    with pytest.raises(ValueError) as info:
        LLM(None, backend="cpu", tensor_parallel_size=2, num_kv_blocks=8)
    message = str(info.value)
    assert "tensor_parallel_size=2" in message
    assert "9 query heads" in message and "3 KV heads" in message
    assert "valid sizes for this model: 1, 3" in message


def test_shards_put_together_are_the_model():
    config = ModelConfig("llama", vocab_size=11, hidden_size=8, intermediate_size=6, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=2, max_position_embeddings=32,
                         attention_bias=True)
    rng = np.random.default_rng(0)
    weights = {n: rng.normal(size=s).astype(np.float32) for n, s in expected_shapes(config).items()}
    shards = [shard_weights(config, weights, r, 2) for r in range(2)]
    shapes = expected_shapes(shard_config(config, 2))
    for shard in shards:
        assert {n: a.shape for n, a in shard.items()} == shapes
    p = "model.layers.0."
    for name, axis in [(p + "self_attn.q_proj.weight", 0), (p + "self_attn.k_proj.bias", 0),
                       (p + "self_attn.o_proj.weight", 1), (p + "mlp.up_proj.weight", 0),
                       (p + "mlp.down_proj.weight", 1)]:
        np.testing.assert_array_equal(np.concatenate([s[name] for s in shards], axis=axis), weights[name])
    embed = np.concatenate([s["model.embed_tokens.weight"] for s in shards])          # [12, 8]: one pad row
    np.testing.assert_array_equal(embed[:11], weights["model.embed_tokens.weight"])
    assert not embed[11:].any()
    np.testing.assert_array_equal(shards[1][p + "input_layernorm.weight"], weights[p + "input_layernorm.weight"])
    # SmolLM2-135M: 9 query heads, 3 KV heads, MLP 1536.
    smol = replace(config, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    assert valid_tp_sizes(smol) == [1, 3]
    with pytest.raises(ValueError, match="valid sizes for this model: 1, 3"):
        check_tp_size(smol, 2)


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_killed_worker_turns_the_service_not_serving_within_seconds(model_dirs):
    from pagedgen_client import PagedgenClientError, RetryPolicy
    from tests.service.conftest import serving

    with serving(str(model_dirs["qwen2-bias-tied"]), grace=0.5, tensor_parallel_size=2) as server:
        engine = server.engine
        (worker,) = engine.engine.backend.workers
        with server.client(retry=RetryPolicy(max_attempts=1)) as client:
            assert client.health() == "SERVING"
            stream = client.generate("The cat watches", max_tokens=100_000, ignore_eos=True, temperature=0,
                                     timeout=60)
            next(stream)                                          # decoding on both ranks now
            os.kill(worker.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(PagedgenClientError) as info:
                for _ in stream:
                    pass
            assert time.monotonic() - t0 < 5
            assert info.value.code == grpc.StatusCode.INTERNAL
            assert "worker rank 1" in str(info.value) and "SIGKILL" in str(info.value)
            assert engine.is_dead
            assert _wait_for(lambda: client.health() == "NOT_SERVING", timeout=3)
            t0 = time.monotonic()
            with pytest.raises(PagedgenClientError) as info:
                list(client.generate("anyone there?", max_tokens=4))
            assert info.value.code == grpc.StatusCode.INTERNAL and time.monotonic() - t0 < 1.0
            assert "not serving" in str(info.value)
    assert worker.poll() == -signal.SIGKILL


def test_a_worker_dying_while_idle_turns_the_service_not_serving(model_dirs):
    from tests.service.conftest import serving

    with serving(str(model_dirs["qwen2-bias-tied"]), grace=0.5, tensor_parallel_size=2) as server:
        engine = server.engine
        (worker,) = engine.engine.backend.workers
        with server.client() as client:
            assert client.health() == "SERVING"
            os.kill(worker.pid, signal.SIGKILL)                   # no request in flight
            assert _wait_for(lambda: client.health() == "NOT_SERVING", timeout=3)
            assert engine.is_dead and "worker rank 1" in repr(engine.dead_error)
