"""The Triton paged attention with sliding windows and soft-caps, and the grouped MoE GEMMs, against references.

On a GPU natively, else on CPU tensors under the interpreter (``conftest``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from backends.cuda.kernels.moe import expert_layout, fused_moe, fused_moe_ref  # noqa: E402
from backends.cuda.kernels.paged_attention import paged_attention, paged_attention_ref, plan_attention  # noqa: E402
from backends.torch_model.model import ACTIVATIONS  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from tests.backends.cuda.conftest import DEVICE  # noqa: E402

BS = 4
WINDOW = 6


def windowed_batch(seed: int):
    """Decodes at context 3, 6, 7, 40 and a 13-token prefill and a 9-token chunk after 20 cached, block 4."""
    rng = np.random.default_rng(seed)
    requests = [(1, 3), (1, 6), (1, 7), (13, 13), (1, 40), (9, 29)]              # (query_len, context_len)
    blocks = rng.permutation(40).tolist()
    tables = [[blocks.pop() for _ in range(-(-c // BS))] for _, c in requests]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    query_lens = [q for q, _ in requests]
    starts = torch.tensor(np.concatenate(([0], np.cumsum(query_lens))), dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([c for _, c in requests], dtype=torch.int32, device=DEVICE)
    return query_lens, block_tables, lens, starts


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window,softcap", [(WINDOW, None), (None, 2.0), (WINDOW, 2.0)],
                         ids=["window", "softcap", "window+softcap"])
def test_paged_attention_window_and_softcap(window, softcap, num_splits):
    num_kv_heads, num_group, head_dim = 2, 2, 16
    query_lens, tables, lens, starts = windowed_batch(seed=num_splits)
    g = torch.Generator().manual_seed(5)
    shape = (40, BS, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=g).to(DEVICE), torch.randn(shape, generator=g).to(DEVICE)
    q = torch.randn(sum(query_lens), num_group * num_kv_heads, head_dim, generator=g).to(DEVICE)
    decode = [i for i, n in enumerate(query_lens) if n == 1]
    cases = [(query_lens, tables, lens, starts, q, 1)]
    if num_splits > 1:                                   # split-KV runs on decode-only steps
        rows = torch.tensor([int(starts[i]) for i in decode], device=DEVICE)
        cases = [([1] * len(decode), tables[decode], lens[decode],
                  torch.arange(len(decode) + 1, dtype=torch.int32, device=DEVICE), q[rows], num_splits)]
    for qlens, tbl, ctx, st, queries, splits in cases:
        plan = plan_attention(qlens, num_group, DEVICE, num_splits=splits, block_n=16, prefill_block_m=16)
        out = paged_attention(queries, k_cache, v_cache, tbl, ctx, st, 0.3, plan, window=window, softcap=softcap)
        ref = paged_attention_ref(queries, k_cache, v_cache, tbl, ctx, st, 0.3, window=window, softcap=softcap)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def moe_config(norm_topk_prob: bool) -> ModelConfig:
    return ModelConfig(architecture="qwen3_moe", vocab_size=16, hidden_size=48, intermediate_size=0,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=24,
                       max_position_embeddings=64, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40,
                       norm_topk_prob=norm_topk_prob)


@pytest.mark.parametrize("num_tokens", [1, 5, 37])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_fused_moe_matches_the_torch_experts(num_tokens, norm_topk_prob):
    config = moe_config(norm_topk_prob)
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, 48, generator=g)
    weights = (torch.randn(6, 48, generator=g), 0.2 * torch.randn(6, 80, 48, generator=g),
               0.2 * torch.randn(6, 48, 40, generator=g))                        # router, gate_up, down
    act = ACTIVATIONS["silu"]
    out = fused_moe(x.to(DEVICE), *(w.to(DEVICE) for w in weights), config, act)
    torch.testing.assert_close(out.cpu(), fused_moe_ref(x, *weights, config, act), atol=2e-5, rtol=2e-5)


def test_expert_layout_pads_each_expert_to_whole_blocks():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3]], device=DEVICE)                 # pairs: 0:3 1:0 2:3 3:1 4:0 5:3
    row_pair, block_expert, pair_row = expert_layout(ids, num_experts=4, block_m=2)
    assert block_expert.tolist() == [0, 1, 3, 3, 4, 4, 4]                      # 2 + 4 unused blocks of the bound
    assert row_pair.tolist()[:8] == [1, 4, 3, -1, 0, 2, 5, -1]
    assert pair_row.tolist() == [4, 0, 5, 2, 1, 6]
