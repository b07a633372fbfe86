"""The gRPC service over the metal backend, end to end: a real server (in-process and as
``pagedgen serve --backend metal``) on a loopback port, driven through the real client."""

from __future__ import annotations

import pytest

pytest.importorskip("mlx.core")

from engine import LLM, SamplingParams  # noqa: E402
from tests.factories import make_tiny_hf_model  # noqa: E402
from tests.service.conftest import serving  # noqa: E402
from tests.service.test_serve_process import ServeProcess  # noqa: E402

pytestmark = pytest.mark.timeout(180)

PROMPTS = ["The cat watches the answer", "A small robot builds", "My neighbour remembers the long winter"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama"))


@pytest.fixture(scope="module")
def metal_server(tiny_dir):
    with serving(tiny_dir, backend="metal", dtype="float32") as server:    # float32: parity with cpu
        yield server


def test_greedy_over_grpc_on_metal_equals_the_cpu_backend(tiny_dir, metal_server):
    cpu = LLM(tiny_dir, backend="cpu", num_kv_blocks=256)
    expected = cpu.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    with metal_server.client() as client:
        assert client.model_info().backend == "metal"
        for prompt, want in zip(PROMPTS, expected):
            chunks = list(client.generate(prompt, temperature=0, max_tokens=20, ignore_eos=True, logprobs=1))
            assert [t for c in chunks for t in c.token_ids] == list(want.outputs[0].token_ids)
            assert "".join(c.text for c in chunks) == want.outputs[0].text
            assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 20
            assert all(lp.rank == 1 and lp.top[0][0] == lp.token_id for c in chunks for lp in c.logprobs)


def test_stats_over_grpc_report_mlx_memory(metal_server):
    import mlx.core as mx

    with metal_server.client() as client:
        stats = client.stats()
    assert 0 < stats.device_memory_active_bytes <= stats.device_memory_peak_bytes <= mx.get_peak_memory()


def test_seeded_sampling_over_grpc_is_reproducible(metal_server):
    with metal_server.client() as client:
        runs = [client.generate_text(PROMPTS[0], temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
                for _ in range(2)]
        other = client.generate_text(PROMPTS[0], temperature=1.0, seed=8, max_tokens=16, ignore_eos=True)
    assert runs[0] == runs[1] and runs[0] != other


def test_pagedgen_serve_with_backend_metal(tiny_dir):
    from pagedgen_client import Client, RetryPolicy

    server = ServeProcess("--model", tiny_dir, "--backend", "metal", "--num-kv-blocks", "64")
    try:
        ready = server.wait_event("server_ready", timeout=120)
        with Client(ready["address"], retry=RetryPolicy(max_attempts=1)) as client:
            assert client.model_info().backend == "metal"
            chunks = list(client.generate(PROMPTS[1], temperature=0, max_tokens=12, ignore_eos=True))
        assert sum(len(c.token_ids) for c in chunks) == 12
    finally:
        server.kill()
