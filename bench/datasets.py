"""Workloads shared by ``bench offline`` and ``bench serve``.

A workload is a stream of ``Conversation``s. Most hold one request; a
multi-turn conversation holds several, sent one after another, each turn's
prompt being the whole history so far (earlier prompts and replies) plus the
turn's new tokens, as a chat client resends its history.

Datasets:

- ``random``: prompts of random token ids, lengths uniform in a range.
- ``shared-prefix``: one common random prefix, then a distinct random suffix.
- ``multi-turn``: conversations of ``turns`` turns of ``suffix_len`` random
  user tokens each.
- ``jsonl``: a file of one JSON object per line, either
  ``{"prompt": "..."}``, ``{"prompt_token_ids": [...]}`` or
  ``{"messages": [{"role": ..., "content": ...}, ...]}``, with an optional
  ``"max_tokens"`` (else drawn from the output length range).

Synthetic datasets draw from one seeded generator in order, so the first
``n`` requests are the same whatever the count asked for; they never use
special tokens and always ignore EOS (outputs have exactly the drawn length).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("random", "shared-prefix", "multi-turn", "jsonl")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: exactly one of token ids, text or chat messages."""

    prompt_token_ids: list[int] | None
    max_tokens: int
    prompt: str | None = None
    messages: list[dict] | None = None
    ignore_eos: bool = True

    def inputs(self) -> dict:
        """The prompt as keyword arguments of ``generate`` / ``add_request``."""
        if self.prompt_token_ids is not None:
            return {"prompt_token_ids": self.prompt_token_ids}
        if self.messages is not None:
            return {"messages": self.messages}
        return {"prompt": self.prompt}


@dataclass(frozen=True)
class Conversation:
    """Requests sent in turn; with ``resend_history`` each prompt is the
    history (earlier prompts and replies, as token ids) plus the turn's own."""

    turns: list[BenchRequest]
    resend_history: bool = False

    def request(self, turn: int, history: list[int]) -> BenchRequest:
        r = self.turns[turn]
        if not self.resend_history:
            return r
        return BenchRequest(history + r.prompt_token_ids, r.max_tokens, ignore_eos=r.ignore_eos)


@dataclass(frozen=True)
class DatasetConfig:
    """What to generate; the CLI's dataset flags, shared by both benches."""

    name: str = "random"
    input_len: tuple[int, int] = (32, 256)       # random: prompt tokens, inclusive range
    output_len: tuple[int, int] = (32, 128)      # output tokens, inclusive range
    prefix_len: int = 1024                       # shared-prefix: common tokens
    suffix_len: int = 32                         # shared-prefix: own tokens; multi-turn: user tokens per turn
    turns: int = 4                               # multi-turn: turns per conversation
    path: str | None = None                      # jsonl: the file
    ignore_eos: bool = False                     # jsonl: keep generating past EOS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.name!r}")
        if self.name == "jsonl" and not self.path:
            raise ValueError("the jsonl dataset needs --dataset-path FILE")
        if min(self.prefix_len, self.suffix_len) < 0 or self.turns < 1:
            raise ValueError("prefix/suffix lengths must be >= 0 and turns >= 1")
        if self.name == "shared-prefix" and self.prefix_len + self.suffix_len < 1:
            raise ValueError("shared-prefix needs prefix_len + suffix_len >= 1")
        if self.name == "multi-turn" and self.suffix_len < 1:
            raise ValueError("multi-turn needs suffix_len >= 1")


def allowed_token_ids(vocab_size: int, special_ids: Iterable[int]) -> np.ndarray:
    """Token ids a synthetic prompt may use: the vocabulary without special tokens."""
    return np.setdiff1d(np.arange(vocab_size), np.fromiter(special_ids, dtype=np.int64))


def parse_range(text: str) -> tuple[int, int]:
    """'32:256' -> (32, 256); '64' -> (64, 64)."""
    lo, _, hi = text.partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"bad length range {text!r}; use MIN:MAX or N") from None
    if lo_i < 1 or hi_i < lo_i:
        raise ValueError(f"bad length range {text!r}; use MIN:MAX with 1 <= MIN <= MAX")
    return lo_i, hi_i


def _draw(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    return int(rng.integers(lo_hi[0], lo_hi[1] + 1))


def random_requests(cfg: DatasetConfig, allowed: np.ndarray) -> Iterator[BenchRequest]:
    rng = np.random.default_rng(cfg.seed)
    while True:
        n_in, n_out = _draw(rng, cfg.input_len), _draw(rng, cfg.output_len)
        yield BenchRequest(rng.choice(allowed, n_in).tolist(), n_out)


def shared_prefix_requests(cfg: DatasetConfig, allowed: np.ndarray) -> Iterator[BenchRequest]:
    rng = np.random.default_rng(cfg.seed)
    prefix = rng.choice(allowed, cfg.prefix_len).tolist()
    while True:
        yield BenchRequest(prefix + rng.choice(allowed, cfg.suffix_len).tolist(), cfg.output_len[0])


def multi_turn_conversations(cfg: DatasetConfig, allowed: np.ndarray) -> Iterator[Conversation]:
    rng = np.random.default_rng(cfg.seed)
    while True:
        turns = [BenchRequest(rng.choice(allowed, cfg.suffix_len).tolist(), _draw(rng, cfg.output_len))
                 for _ in range(cfg.turns)]
        yield Conversation(turns, resend_history=True)


def read_jsonl(path: str | Path, output_len: tuple[int, int], seed: int = 0,
               ignore_eos: bool = False) -> list[BenchRequest]:
    """The requests of a JSONL file (see the module docstring)."""
    rng = np.random.default_rng(seed)
    out = []
    with open(path) as f:
        for num, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{num}: not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{num}: expected an object")
            kinds = [k for k in ("prompt", "prompt_token_ids", "messages") if k in obj]
            if len(kinds) != 1:
                raise ValueError(f"{path}:{num}: give exactly one of prompt, prompt_token_ids, messages")
            max_tokens = obj.get("max_tokens")
            if max_tokens is None:
                max_tokens = _draw(rng, output_len)
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise ValueError(f"{path}:{num}: max_tokens must be a positive integer")
            messages = obj.get("messages")
            if messages is not None and not (isinstance(messages, list) and all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
                raise ValueError(f"{path}:{num}: messages must be a list of {{role, content}} objects")
            out.append(BenchRequest(obj.get("prompt_token_ids"), max_tokens, prompt=obj.get("prompt"),
                                    messages=messages, ignore_eos=ignore_eos))
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def conversations(cfg: DatasetConfig, vocab_size: int, special_ids: Iterable[int] = ()) -> Iterator[Conversation]:
    """The workload as an endless stream (a JSONL file repeats from its start)."""
    if cfg.name == "jsonl":
        requests = read_jsonl(cfg.path, cfg.output_len, cfg.seed, cfg.ignore_eos)
        return (Conversation([r]) for r in itertools.cycle(requests))
    allowed = allowed_token_ids(vocab_size, special_ids)
    if cfg.name == "multi-turn":
        return multi_turn_conversations(cfg, allowed)
    gen = shared_prefix_requests if cfg.name == "shared-prefix" else random_requests
    return (Conversation([r]) for r in gen(cfg, allowed))


def take(cfg: DatasetConfig, num: int, vocab_size: int, special_ids: Iterable[int] = ()) -> list[Conversation]:
    """The first ``num`` conversations of the workload."""
    return list(itertools.islice(conversations(cfg, vocab_size, special_ids), num))


def add_dataset_args(p, *, jsonl_ignore_eos: bool = True) -> None:
    """The dataset flags of both benches."""
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", choices=DATASETS, default="random")
    g.add_argument("--dataset-path", default=None, help="the JSONL file (--dataset jsonl)")
    g.add_argument("--input-len", default="32:256", help="prompt length range MIN:MAX (random)")
    g.add_argument("--output-len", default="32:128",
                   help="output length range MIN:MAX (shared-prefix uses MIN; jsonl lines may set max_tokens)")
    g.add_argument("--prefix-len", type=int, default=1024, help="shared prefix tokens (shared-prefix)")
    g.add_argument("--suffix-len", type=int, default=32,
                   help="distinct suffix tokens (shared-prefix) / user tokens per turn (multi-turn)")
    g.add_argument("--turns", type=int, default=4, help="turns per conversation (multi-turn)")
    if jsonl_ignore_eos:
        g.add_argument("--ignore-eos", action="store_true",
                       help="jsonl: generate max_tokens even past EOS (synthetic datasets always do)")
    g.add_argument("--seed", type=int, default=0)


def dataset_config(args) -> DatasetConfig:
    return DatasetConfig(name=args.dataset, input_len=parse_range(args.input_len),
                         output_len=parse_range(args.output_len), prefix_len=args.prefix_len,
                         suffix_len=args.suffix_len, turns=args.turns, path=args.dataset_path,
                         ignore_eos=getattr(args, "ignore_eos", False), seed=args.seed)
