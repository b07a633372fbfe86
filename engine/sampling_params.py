"""Sampling parameters of one request, validated at construction."""

from __future__ import annotations

import json as _json
import math
from dataclasses import dataclass, field, replace

# Largest number of top logprobs a request may ask for.
MAX_LOGPROBS = 20
# logit_bias values lie in [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT] (OpenAI's range).
LOGIT_BIAS_LIMIT = 100.0
# The constraint kinds of StructuredOutputsParams, in field order.
CONSTRAINT_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on a request's output (modelled on vLLM's): exactly one field is set.

    Checked for shape here; whether the schema / regex / grammar compiles is
    decided by the engine (``engine.structured_output``) at ``add_request``.
    """

    json: str | dict | None = None          # a JSON schema, as a dict or its JSON text (kept as text)
    json_object: bool = False               # any JSON object
    regex: str | None = None                # the output matches this regular expression
    choice: tuple[str, ...] | None = None   # the output is exactly one of these strings
    grammar: str | None = None              # an EBNF (GBNF) grammar, or a Lark grammar

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", _json.dumps(self.json))   # key order kept: it orders the properties
        if self.choice is not None and not isinstance(self.choice, str):
            object.__setattr__(self, "choice", tuple(self.choice))
        set_fields = [k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False)]
        if len(set_fields) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(CONSTRAINT_KINDS)}, "
                             f"got {set_fields or 'none'}")
        if self.json is not None:
            if not isinstance(self.json, str):
                raise ValueError("structured_outputs.json must be a JSON schema (a dict or its JSON text)")
            try:
                schema = _json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from e
            if not isinstance(schema, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON object (a schema)")
        if self.json_object is not True and self.json_object is not False:
            raise ValueError("structured_outputs.json_object must be a boolean")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (isinstance(self.choice, str) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        """Which constraint is set: one of ``CONSTRAINT_KINDS``."""
        return next(k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str | tuple[str, ...] | bool:
        """The set field's value (schema text, regex, choices, grammar; True for json_object)."""
        return getattr(self, self.kind)
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
    logit_bias: dict[int, float] | None = field(default=None, hash=False)  # token id -> added logit, [-100, 100]
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (a schema, regex, ...)
    # Request-level options, here so that every path to the engine (offline, AsyncEngine, engine process)
    # carries them; an n > 1 request's completions share them.
    priority: int = 0                       # lower runs first; needs scheduling_policy "priority" unless 0
    time_limit_ms: int | None = None        # end with finish_reason "time_limit" after this long; None: engine default
    truncate_prompt_tokens: int | None = None   # keep only the last N prompt tokens (after the chat template)
    prompt_logprobs: int | None = None      # logprob of every prompt token after the first, plus the top k
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
        if self.logit_bias is not None:     # OpenAI sends the ids as strings: accept "123" too
            try:
                bias = {int(k): v for k, v in dict(self.logit_bias).items()}
            except (TypeError, ValueError) as e:
                raise ValueError(f"logit_bias keys must be token ids, got {self.logit_bias!r}") from e
            object.__setattr__(self, "logit_bias", bias or None)
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
        for token_id, value in (self.logit_bias or {}).items():
            if token_id < 0:
                raise ValueError(f"logit_bias token ids must be >= 0, got {token_id}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {token_id}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise bad("priority", "must be an integer")
        if self.time_limit_ms is not None and (isinstance(self.time_limit_ms, bool)
                                               or not isinstance(self.time_limit_ms, int) or self.time_limit_ms < 1):
            raise bad("time_limit_ms", "must be a positive integer (milliseconds)")
        if self.truncate_prompt_tokens is not None and (isinstance(self.truncate_prompt_tokens, bool) or not
                                                        isinstance(self.truncate_prompt_tokens, int)
                                                        or self.truncate_prompt_tokens < 1):
            raise bad("truncate_prompt_tokens", "must be a positive integer")
        if self.prompt_logprobs is not None and not (isinstance(self.prompt_logprobs, int)
                                                     and 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise bad("prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", "must be a StructuredOutputsParams")

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
