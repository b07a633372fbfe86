"""Sampling parameters of one request, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# Largest number of top logprobs a request may ask for.
MAX_LOGPROBS = 20
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next tokens of one request (modelled on vLLM's).

    Every field has the engine's default; invalid values raise ``ValueError``
    naming the field, so a bad request never reaches the scheduler.
    """

    n: int = 1                              # completions per prompt
    temperature: float = 1.0                # 0 means greedy
    top_p: float = 1.0                      # nucleus mass in (0, 1]
    top_k: int = 0                          # 0 (or -1) disables
    min_p: float = 0.0                      # in [0, 1]
    seed: int | None = None                 # per-request generator seed
    presence_penalty: float = 0.0           # in [-2, 2]
    frequency_penalty: float = 0.0          # in [-2, 2]
    repetition_penalty: float = 1.0         # > 0, 1 disables
    max_tokens: int | None = 16             # None: up to the model's context
    min_tokens: int = 0                     # EOS / stop ids masked before this
    stop: tuple[str, ...] = ()              # stop strings
    stop_token_ids: tuple[int, ...] = ()    # extra stop tokens
    ignore_eos: bool = False                # keep going past EOS
    logprobs: int | None = None             # None: no logprobs; k: sampled + top k
    skip_special_tokens: bool = True        # when detokenizing
    include_stop_str_in_output: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Accept lists / single strings for the tuple fields.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        for name in _FLOAT_FIELDS:          # NaN passes every comparison below: reject it first
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be 0 or -1 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be a positive integer")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must hold non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must hold non-negative token ids")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def for_child(self, index: int) -> "SamplingParams":
        """The params of completion ``index`` of an ``n > 1`` request.

        Each child samples one completion; a seeded request gives each child
        its own derived seed so the completions differ yet stay reproducible.
        """
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)
