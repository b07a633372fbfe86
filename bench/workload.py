"""Synthetic workloads shared by the offline and serving benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def allowed_token_ids(vocab_size: int, special_ids: frozenset[int]) -> np.ndarray:
    """Token ids a synthetic prompt may use: the vocabulary without special tokens."""
    return np.setdiff1d(np.arange(vocab_size), np.fromiter(special_ids, dtype=np.int64))


def random_workload(num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    vocab_size: int, seed: int = 0, special_ids: frozenset[int] = frozenset()) -> list[BenchRequest]:
    """Requests of random tokens, lengths uniform in the given inclusive ranges."""
    rng = np.random.default_rng(seed)
    allowed = allowed_token_ids(vocab_size, special_ids)
    out = []
    for _ in range(num_requests):
        n_in = int(rng.integers(input_len[0], input_len[1] + 1))
        n_out = int(rng.integers(output_len[0], output_len[1] + 1))
        out.append(BenchRequest(rng.choice(allowed, n_in).tolist(), n_out))
    return out


def shared_prefix_workload(num_requests: int, prefix_len: int, suffix_len: int, output_len: int,
                           vocab_size: int, seed: int = 0, special_ids: frozenset[int] = frozenset()) -> list[BenchRequest]:
    """A common random prefix followed by a distinct random suffix per request."""
    rng = np.random.default_rng(seed)
    allowed = allowed_token_ids(vocab_size, special_ids)
    prefix = rng.choice(allowed, prefix_len).tolist()
    return [BenchRequest(prefix + rng.choice(allowed, suffix_len).tolist(), output_len) for _ in range(num_requests)]


def parse_range(text: str) -> tuple[int, int]:
    """'32:256' -> (32, 256); '64' -> (64, 64)."""
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if lo_i < 1 or hi_i < lo_i:
        raise ValueError(f"bad length range {text!r}; use MIN:MAX with 1 <= MIN <= MAX")
    return lo_i, hi_i
