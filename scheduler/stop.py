"""When a sequence ends: the stop rules that depend on token ids alone.

The scheduler applies them as it appends each sampled token, so a request
that ends frees its blocks in the same update. Stop strings need text and
stay with the engine's detokenizer. The rules, in the order they are tried:

1. EOS (one of the ``eos_token_ids``) stops, unless ``ignore_eos``; stop
   reason None. Only once more than ``min_tokens`` tokens are out.
2. A token of ``stop_token_ids`` stops; its id is the stop reason. Also only
   past ``min_tokens``.
3. ``max_tokens`` output tokens end the request for length.
4. So does reaching ``max_tokens_per_request`` tokens, prompt included (the
   context limit, or the whole KV cache if that is smaller).

The stopping token stays in the request's token ids either way.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from scheduler.request import Request, RequestStatus


class StopParams(Protocol):
    """The sampling-param fields the scheduler reads; ``engine.SamplingParams``
    has them, and any object with these attributes will do."""

    @property
    def ignore_eos(self) -> bool:
        """Keep going past EOS."""

    @property
    def min_tokens(self) -> int:
        """EOS and stop ids do not stop while at most this many tokens are out."""

    @property
    def max_tokens(self) -> int | None:
        """Output tokens at most; None: up to the context limit."""

    @property
    def stop_token_ids(self) -> Collection[int]:
        """Tokens that stop the request besides EOS."""


@dataclass(frozen=True)
class DefaultStopParams:
    """The rules of a request whose ``sampling_params`` is None: EOS and the context limit only."""

    ignore_eos: bool = False                    # EOS stops
    min_tokens: int = 0                         # from the first token on
    max_tokens: int | None = None               # no output cap
    stop_token_ids: tuple[int, ...] = ()        # no extra stop tokens


_DEFAULT_STOP = DefaultStopParams()


def check_stop(request: Request, eos_token_ids: Collection[int],
               max_tokens_per_request: int) -> tuple[RequestStatus, int | None] | None:
    """Whether the token just appended to ``request`` ends it.

    Returns ``(FINISHED_STOPPED, stop token id or None for EOS)``,
    ``(FINISHED_LENGTH, None)``, or None while the request goes on. Called
    for every sampled token: plain attribute reads only.
    """
    params: StopParams = request.sampling_params if request.sampling_params is not None else _DEFAULT_STOP
    outputs = request.output_token_ids
    num_outputs = len(outputs)
    if num_outputs > params.min_tokens:                      # the new token is already counted
        token_id = outputs[-1]
        if token_id in eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED, None
        if params.stop_token_ids and token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
    max_tokens = params.max_tokens
    if max_tokens is not None and num_outputs >= max_tokens:
        return RequestStatus.FINISHED_LENGTH, None
    if len(request.all_token_ids) >= max_tokens_per_request:
        return RequestStatus.FINISHED_LENGTH, None
    return None
