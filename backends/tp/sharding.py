"""How a model splits over ``world_size`` tensor-parallel ranks, and the slicing.

Megatron-style, with the all-reduces placed by ``backends.torch_model.LlamaModel``::

    embed_tokens   [V, hidden]       rows (vocabulary) split, padded to world_size * V_r
    q/k/v_proj     [heads*D, hidden] column-parallel: rank r keeps its heads (query AND kv)
    o_proj         [hidden, H*D]     row-parallel: the input columns of its query heads -> all-reduce
    gate/up_proj   [I, hidden]       column-parallel: rows r*I/N .. (r+1)*I/N
    down_proj      [hidden, I]       row-parallel: the matching input columns -> all-reduce
    norms          [hidden], [D]     replicated (q/k norms and Gemma's sandwich norms too)
    lm_head        [V, hidden]       rows split like the embedding; shard logits gathered to the driver

A rank's shard is described by ``shard_config``: the same ``ModelConfig`` with
``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size`` and
``vocab_size`` divided by the world size. The shard's canonical shapes
(``model.weights.canonical.expected_shapes``) are exactly the shapes of the
slices ``shard_weights`` cuts, so the ordinary weight loader and CPU backend
run a shard unchanged. Slices are numpy views: a rank never materialises the
whole model in torch.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from model.config import ModelConfig


def valid_tp_sizes(config: ModelConfig) -> list[int]:
    """Every world size that splits the query heads, KV heads and MLP evenly (1 alone for MoE models)."""
    if config.traits.moe:
        return [1]
    counts = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    return [n for n in range(1, config.num_key_value_heads + 1) if all(c % n == 0 for c in counts)]


def check_tp_size(config: ModelConfig, world_size: int) -> None:
    """Raise ValueError unless ``world_size`` divides the heads and the MLP of ``config``."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {world_size!r}")
    if world_size > 1 and config.traits.moe:
        raise ValueError(
            f"tensor_parallel_size={world_size}: {config.traits.display} is a mixture of experts, which "
            f"tensor parallelism does not split yet; use tensor_parallel_size=1")
    if world_size not in valid_tp_sizes(config):
        raise ValueError(
            f"tensor_parallel_size={world_size} cannot split this model: it has "
            f"{config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads and an "
            f"MLP of {config.intermediate_size}, each of which must divide evenly across the ranks; "
            f"valid sizes for this model: {', '.join(map(str, valid_tp_sizes(config)))}")


def vocab_per_rank(vocab_size: int, world_size: int) -> int:
    """Rows of the embedding / LM head each rank holds (the vocabulary padded up)."""
    return -(-vocab_size // world_size)


def shard_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The config of one rank's shard (the same for every rank)."""
    check_tp_size(config, world_size)
    return replace(
        config,
        num_attention_heads=config.num_attention_heads // world_size,
        num_key_value_heads=config.num_key_value_heads // world_size,
        intermediate_size=config.intermediate_size // world_size,
        vocab_size=vocab_per_rank(config.vocab_size, world_size),
    )


def shard_weights(config: ModelConfig, weights: dict[str, np.ndarray], rank: int,
                  world_size: int) -> dict[str, np.ndarray]:
    """Rank ``rank``'s slices of the canonical ``weights`` of ``config``.

    Views where possible; only the last vocabulary shard is copied when it
    needs zero padding rows (a vocabulary not divisible by ``world_size``).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    check_tp_size(config, world_size)
    d = config.head_dim
    q_per, kv_per = config.num_attention_heads // world_size, config.num_key_value_heads // world_size
    i_per = config.intermediate_size // world_size
    q = slice(rank * q_per * d, (rank + 1) * q_per * d)          # this rank's query-head rows
    kv = slice(rank * kv_per * d, (rank + 1) * kv_per * d)       # its KV-head rows
    inter = slice(rank * i_per, (rank + 1) * i_per)               # its MLP rows
    out: dict[str, np.ndarray] = {}
    for name, array in weights.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = _vocab_rows(array, rank, world_size)
        elif name.endswith("norm.weight"):
            out[name] = array
        elif ".q_proj." in name:
            out[name] = array[q]
        elif ".k_proj." in name or ".v_proj." in name:
            out[name] = array[kv]
        elif ".o_proj." in name:
            out[name] = array[:, q]
        elif ".gate_proj." in name or ".up_proj." in name:
            out[name] = array[inter]
        elif ".down_proj." in name:
            out[name] = array[:, inter]
        else:
            raise ValueError(f"do not know how to shard weight {name!r}")
    return out


def _vocab_rows(array: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rows ``rank * V_r .. (rank + 1) * V_r`` of ``[V, hidden]``, zero rows past V."""
    per = vocab_per_rank(array.shape[0], world_size)
    rows = array[rank * per: (rank + 1) * per]                                 # [<= V_r, hidden]
    if rows.shape[0] == per:
        return rows
    padded = np.zeros((per, array.shape[1]), dtype=array.dtype)               # [V_r, hidden]
    padded[: rows.shape[0]] = rows
    return padded
