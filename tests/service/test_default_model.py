"""The embedded default model (SmolLM2-135M-Instruct) through the service: slow."""

from __future__ import annotations

import pytest

from tests.service.conftest import ServerThread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def default_server():
    from engine.args import EngineArgs
    from engine.async_engine import AsyncEngine

    engine = AsyncEngine(EngineArgs(model=None, kv_cache_memory=256 << 20))
    server = ServerThread(engine)
    yield server
    server.stop(grace=5.0)
    engine.shutdown()


def test_greedy_over_grpc_equals_the_offline_llm_on_the_default_model(default_server):
    from engine import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):"]
    llm = LLM(model=None, kv_cache_memory=256 << 20)
    try:
        offline = [o.outputs[0] for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))]
    finally:
        getattr(llm, "shutdown", lambda: None)()
    with default_server.client() as client:
        for prompt, expected in zip(prompts, offline):
            chunks = list(client.generate(prompt, temperature=0, max_tokens=24))
            assert "".join(c.text for c in chunks) == expected.text
            assert [t for c in chunks for t in c.token_ids] == list(expected.token_ids)


def test_chat_on_the_default_model(default_server):
    with default_server.client() as client:
        text = client.generate_text(messages=[{"role": "user", "content": "What is 2+2? Answer briefly."}],
                                    temperature=0, max_tokens=32)
        assert text.strip()
        info = client.model_info()
        assert info.model.startswith("SmolLM2") and info.vocab_size >= 49152
        assert client.health() == "SERVING"
