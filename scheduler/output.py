"""The contract between the scheduler and a device backend: plain data only.

One step of the engine runs one ``SchedulerOutput`` through the backend and
gets one ``StepResult`` back. No tensors cross this line; backends turn the
int lists into device tensors themselves.

Token layout of a step (flattened, no padding between requests)::

    request:     | r0: 5 prompt tokens (chunk) | r1: 1 decode | r2: 1 decode |
    token_ids:   [ t t t t t                    , t             , t           ]
    positions:   [ 0 1 2 3 4                    , 37            , 12          ]

Slot of token at position p of a request: ``block_table[p // B] * B + p % B``
with ``B = block_size``; ``slot_mapping`` lists it for every new token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    request_id: str
    token_ids: list[int]            # tokens whose K/V this step computes
    num_computed_tokens: int        # tokens already in the KV cache; positions start here
    block_table: list[int]          # physical block ids, in logical order, covering all tokens
    slot_mapping: list[int]         # cache slot of each of token_ids
    sampling_params: Any            # engine.SamplingParams (the scheduler reads only its stop fields)
    needs_sample: bool              # chunk reaches the end of the known tokens: sample one token
    prompt_token_ids: list[int] = field(default_factory=list)   # for repetition penalty
    output_token_ids: list[int] = field(default_factory=list)   # generated so far (penalties, min_tokens)
    num_prompt_logprobs: int | None = None  # top-k of prompt logprobs for this chunk's prompt positions; None: none
    grammar_bitmask: Any = None     # [ceil(V/32)] int32 numpy, bit t set: token t allowed (set by the engine); None: free

    @property
    def needs_prompt_logprobs(self) -> bool:
        """The backend returns logprobs of the prompt tokens this chunk predicts (``StepResult.prompt_logprobs``)."""
        return self.num_prompt_logprobs is not None

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def positions(self) -> range:
        return range(self.num_computed_tokens, self.num_computed_tokens + len(self.token_ids))

    @property
    def context_len(self) -> int:
        """Tokens in the cache once this step has written its new ones."""
        return self.num_computed_tokens + len(self.token_ids)


@dataclass
class SchedulerOutput:
    """Everything a backend needs to run one step."""

    scheduled: list[ScheduledRequest]           # in the order their tokens are laid out
    block_size: int                             # tokens per KV block
    finished_request_ids: set[str] = field(default_factory=set)   # ended since last step: drop state
    preempted_request_ids: set[str] = field(default_factory=set)  # preempted since last step

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class Logprobs:
    """Logprob of the sampled token and the top-k alternatives at one position."""

    token_id: int
    logprob: float
    rank: int                                   # 1 = most likely
    top: list[tuple[int, float]] = field(default_factory=list)   # (token id, logprob), best first


@dataclass
class StepResult:
    """What a backend returns for one step: a token per request that sampled.

    ``prompt_logprobs[request_id]`` (only for requests with
    ``needs_prompt_logprobs``) holds one entry per prompt token that this
    step's chunk predicts: its rows at positions ``p`` with ``p + 1`` inside
    the prompt give the logprob of prompt token ``p + 1``, so the list starts
    at prompt position ``num_computed_tokens + 1``.
    """

    sampled_token_ids: dict[str, int] = field(default_factory=dict)     # request id -> token
    logprobs: dict[str, Logprobs] = field(default_factory=dict)         # only where asked
    prompt_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)   # request id -> this chunk's
