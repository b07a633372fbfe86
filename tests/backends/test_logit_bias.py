"""The token-mask stage (logit_bias, grammar bitmasks, min_tokens): planned once, the same on every sampler.

The cuda backend samples with the torch ``Sampler`` on its device (no Triton
kernel in the sampler), so the torch sampler here is the one cuda runs; the
MLX sampler (``mlx[cpu]`` on Linux) must pick the same tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.sampler import Sampler, apply_token_mask
from backends.sampling_plan import SamplingPlan, TokenMask, bitmask_to_additive
from engine.sampling_params import SamplingParams
from scheduler.output import ScheduledRequest

mx = pytest.importorskip("mlx.core")

from backends.metal.sampler import MetalSampler  # noqa: E402
from backends.metal.sampler import apply_token_mask as mlx_apply_token_mask  # noqa: E402

V = 300
EOS = 2


def pack(allowed: list[set[int]], vocab: int = V) -> np.ndarray:
    """The ``[G, ceil(V/32)]`` int32 bitmask of each row's allowed token set."""
    bits = np.zeros((len(allowed), vocab + (-vocab) % 32), dtype=np.uint8)
    for i, tokens in enumerate(allowed):
        bits[i, sorted(tokens)] = 1
    return np.packbits(bits, axis=1, bitorder="little").view(np.int32)


def row(rid: str, params: SamplingParams, bitmask: np.ndarray | None = None, output: list[int] | None = None):
    return ScheduledRequest(rid, [1], 0, [0], [0], params, needs_sample=True, prompt_token_ids=[5, 6],
                            output_token_ids=list(output or []), grammar_bitmask=bitmask)


def logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3.0      # [N, V]


def test_bitmask_to_additive_unpacks_bits_and_bans_past_the_width():
    allowed = [{0, 31, 32, 299}, set(range(100, 140))]
    additive = bitmask_to_additive(pack(allowed), V)                                   # [2, V]
    for i, tokens in enumerate(allowed):
        assert set(np.flatnonzero(additive[i] == 0)) == tokens
        assert np.isneginf(additive[i][[t for t in range(V) if t not in tokens]]).all()
    wider = bitmask_to_additive(pack(allowed), V + 50)                                 # logits wider than the mask
    assert np.isneginf(wider[:, 320:]).all() and set(np.flatnonzero(wider[0] == 0)) == allowed[0]


def test_plan_collects_bias_bitmask_and_min_tokens_in_one_mask():
    rows = [row("a", SamplingParams(logit_bias={7: 5.0, 3: -2.0, V + 10: 1.0})),           # id past V: dropped
            row("b", SamplingParams(min_tokens=3), bitmask=pack([{EOS, 9}])[0]),
            row("c", SamplingParams())]
    mask = SamplingPlan.from_rows(rows, [EOS], V).banned
    assert list(zip(mask.bias_rows.tolist(), mask.bias_token_ids.tolist(), mask.bias_values.tolist())) == \
        [(0, 3, -2.0), (0, 7, 5.0)]
    assert mask.bitmask_rows == (1,) and mask.bitmask.shape == (1, (V + 31) // 32)
    assert list(zip(mask.rows.tolist(), mask.token_ids.tolist())) == [(1, EOS)]
    assert SamplingPlan.from_rows([row("c", SamplingParams())], [EOS], V).banned is None
    with pytest.raises(ValueError):
        TokenMask(rows=np.zeros(0, np.int64), token_ids=np.zeros(0, np.int64))


def test_mask_order_bias_then_bitmask_then_bans_equal_on_torch_and_mlx():
    raw = logits(3)
    mask = TokenMask(rows=np.array([1]), token_ids=np.array([10]),
                     bias_rows=np.array([0, 0, 2]), bias_token_ids=np.array([4, 5, 6]),
                     bias_values=np.array([100.0, -100.0, 2.5], np.float32),
                     bitmask_rows=(1, 2), bitmask=pack([{10, 11, 12}, {6, 7}]))
    out = apply_token_mask(raw, mask).numpy()
    assert out[0, 4] == pytest.approx(raw[0, 4].item() + 100) and out[0, 5] == pytest.approx(raw[0, 5].item() - 100)
    assert np.array_equal(np.flatnonzero(np.isfinite(out[1])), [11, 12])               # 10 allowed but banned
    assert np.array_equal(np.flatnonzero(np.isfinite(out[2])), [6, 7])
    assert out[2, 6] == pytest.approx(raw[2, 6].item() + 2.5)
    mlx_out = np.array(mlx_apply_token_mask(mx.array(raw.numpy()), mask))
    np.testing.assert_array_equal(mlx_out, out)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_samplers_pick_only_allowed_tokens_and_agree(temperature):
    """Every constrained row samples inside its bitmask, a +100 bias forces its token, on torch and MLX alike."""
    allowed = [set(range(40, 60)), {3, 250}, {7}]
    bitmasks = pack(allowed)
    torch_sampler, mlx_sampler = Sampler([EOS], seed=0), MetalSampler([EOS], seed=0)
    for step in range(12):
        raw = logits(5, seed=step)
        rows = [row(f"g{i}", SamplingParams(temperature=temperature, seed=100 + i), bitmasks[i], output=[0] * step)
                for i in range(3)]
        rows.append(row("force", SamplingParams(temperature=temperature, seed=7, logit_bias={123: 100.0})))
        rows.append(row("ban", SamplingParams(temperature=0.0, logit_bias={int(raw[4].argmax()): -100.0})))
        torch_ids, _ = torch_sampler.sample_rows(raw, rows)
        mlx_ids, _ = mlx_sampler.sample(mx.array(raw.numpy()), rows)
        for i in range(3):
            assert torch_ids[i] in allowed[i] and mlx_ids[i] in allowed[i]
        assert torch_ids[3] == mlx_ids[3] == 123
        assert torch_ids[4] == mlx_ids[4] != int(raw[4].argmax())
        if temperature == 0.0:
            assert torch_ids == mlx_ids                     # greedy: the same tokens on every backend


def test_structured_output_and_logit_bias_end_to_end_equal_on_cpu_and_metal(tmp_path):
    """Greedy, through the whole engine: the cpu and metal backends give the same constrained tokens."""
    import re

    from engine import LLM
    from engine.sampling_params import StructuredOutputsParams
    from tests.factories import make_tiny_hf_model

    path = str(make_tiny_hf_model(tmp_path, arch="llama"))
    base = dict(temperature=0, max_tokens=24, ignore_eos=True)
    params = [SamplingParams(**base, structured_outputs=StructuredOutputsParams(regex=r"[a-z]{3,8}( [a-z]{2,6}){2}")),
              SamplingParams(**base, structured_outputs=StructuredOutputsParams(choice=["left", "right", "up"])),
              SamplingParams(**base, structured_outputs=StructuredOutputsParams(json={"type": "object", "properties": {
                  "k": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["k"]})),
              SamplingParams(**base, logit_bias={40: 100.0}),
              SamplingParams(**base, logit_bias={t: -100.0 for t in range(0, 400, 3)})]        # the tiny vocab: 400
    prompts = ["hello world, this is"] * len(params)
    got = {}
    for backend in ("cpu", "metal"):
        llm = LLM(path, backend=backend, dtype="float32", num_kv_blocks=128)
        got[backend] = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert [c.token_ids for c in got["cpu"]] == [c.token_ids for c in got["metal"]]
    cpu = got["cpu"]
    assert re.fullmatch(r"[a-z]{3,8}( [a-z]{2,6}){2}", cpu[0].text) and cpu[1].text in ("left", "right", "up")
    assert set(__import__("json").loads(cpu[2].text)) == {"k"} and cpu[3].token_ids == [40] * 24
    assert all(t % 3 for t in cpu[4].token_ids)
