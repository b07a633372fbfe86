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

Persistent batch: ``block_table`` is the scheduler's own live list of the
request's block ids, passed by reference and never copied per step. While
the request holds its blocks the list only grows (appends at its end); once
they are freed (finished, preempted) the list is dropped and a re-admitted
request gets a new list object. So a backend that keeps its own copy of each
request's table (``backends/input_batch.py``) updates it only where the list
grew or a new list object arrived, and drops it on ``finished_request_ids``
/ ``preempted_request_ids``. Backends must not mutate ``block_table``. The
scheduler leaves ``slot_mapping`` to be derived: reading it computes the list
from the formula above on first use (backends that have not adopted the
persistent batch still get it); hand-made steps may pass it explicitly.

Ahead steps (``SchedulerOutput.ahead``, ``Scheduler.schedule_ahead``): with
async scheduling the scheduler lays out step t+1 while step t still runs on
the device. Every request of such a step has one new token, the one step t
samples for it, unknown to the host: its ``token_ids`` hold
``PLACEHOLDER_TOKEN_ID`` and its position is the one after step t's. Only a
backend with ``supports_ahead`` gets such a step, together with step t's
pending handle (``backends.base.Backend.submit``), and takes the input
tokens from it on the device. ``output_token_ids`` then lack step t's token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The token id an ahead step's rows carry in place of the token the previous step samples (see above).
PLACEHOLDER_TOKEN_ID = -1


class ScheduledRequest:
    """One request's share of a step (see the module docstring for ``block_table``)."""

    __slots__ = ("request_id", "token_ids", "num_computed_tokens", "block_table", "_slot_mapping",
                 "sampling_params", "needs_sample", "prompt_token_ids", "output_token_ids",
                 "num_prompt_logprobs", "grammar_bitmask", "_block_size")

    def __init__(
        self,
        request_id: str,
        token_ids: list[int],               # tokens whose K/V this step computes
        num_computed_tokens: int,           # tokens already in the KV cache; positions start here
        block_table: list[int],             # physical block ids in logical order, covering all tokens (live list)
        slot_mapping: list[int] | None,     # cache slot of each of token_ids; None: derived on first read
        sampling_params: Any,               # engine.SamplingParams (the scheduler reads only its stop fields)
        needs_sample: bool,                 # chunk reaches the end of the known tokens: sample one token
        prompt_token_ids: list[int] | None = None,   # for repetition penalty
        output_token_ids: list[int] | None = None,   # generated so far (penalties, min_tokens)
        num_prompt_logprobs: int | None = None,      # top-k of prompt logprobs for this chunk's prompt positions
        grammar_bitmask: Any = None,        # [ceil(V/32)] int32 numpy, bit t set: token t allowed; None: free
        block_size: int | None = None,      # tokens per block: derives slot_mapping when it is None
    ) -> None:
        self.request_id = request_id
        self.token_ids = token_ids
        self.num_computed_tokens = num_computed_tokens
        self.block_table = block_table
        self._slot_mapping = slot_mapping
        self.sampling_params = sampling_params
        self.needs_sample = needs_sample
        self.prompt_token_ids = [] if prompt_token_ids is None else prompt_token_ids
        self.output_token_ids = [] if output_token_ids is None else output_token_ids
        self.num_prompt_logprobs = num_prompt_logprobs
        self.grammar_bitmask = grammar_bitmask
        self._block_size = block_size

    @property
    def slot_mapping(self) -> list[int]:
        """Cache slot of each of ``token_ids``: ``block_table[p // B] * B + p % B``.

        Derived on first read when the scheduler left it out (it passes
        ``block_size`` for that); a backend with the persistent batch never
        reads it and computes the slots vectorised instead.
        """
        if self._slot_mapping is None:
            bs = self._block_size
            if not bs:
                raise ValueError(f"request {self.request_id!r} has neither slot_mapping nor block_size")
            table = self.block_table
            self._slot_mapping = [table[p // bs] * bs + p % bs for p in self.positions]
        return self._slot_mapping

    @slot_mapping.setter
    def slot_mapping(self, value: list[int]) -> None:
        self._slot_mapping = value

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

    def __repr__(self) -> str:
        return (f"ScheduledRequest({self.request_id!r}, new={len(self.token_ids)}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, "
                f"needs_sample={self.needs_sample})")


@dataclass
class SchedulerOutput:
    """Everything a backend needs to run one step."""

    scheduled: list[ScheduledRequest]           # in the order their tokens are laid out
    block_size: int                             # tokens per KV block
    finished_request_ids: set[str] = field(default_factory=set)   # ended since last step: drop state
    preempted_request_ids: set[str] = field(default_factory=set)  # preempted since last step
    ahead: bool = False                         # every row's input token is the one the previous step samples

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
