"""The commands an ``AsyncEngine`` sends to its engine core.

The same objects go to either core (``engine.core_client``): through a queue
to the thread core, pickled through a pipe to the process core. Each stream
is named by a token the ``AsyncEngine`` assigns, not by its request id, so
that aborting an old stream never ends a new one that reuses the id.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams


def _check_token(token: object, *, optional: bool = False) -> None:
    if optional and token is None:
        return
    if not isinstance(token, int) or isinstance(token, bool) or token < 0:
        raise ValueError(f"a stream token is a non-negative int, got {token!r}")


@dataclass(frozen=True)
class AddRequest:
    """Start one request and stream its outputs under ``token``.

    The prompt fields are passed to ``LLMEngine.add_request`` as they are:
    what the caller got wrong (no prompt, two prompts, a token outside the
    vocabulary) fails that stream with ``InvalidRequestError`` in the core,
    like any other bad request, rather than here.
    """

    token: int                                  # the stream's token, unique per AsyncEngine
    request_id: str                             # the caller's id (unique among unfinished requests)
    prompt: str | None = None                   # text to tokenize in the core (the AsyncEngine tokenizes first)
    prompt_token_ids: list[int] | None = None   # the prompt, already tokenized
    messages: list[dict] | None = None          # chat messages, through the chat template
    sampling_params: SamplingParams | None = None   # None: SamplingParams() defaults
    cache_salt: str | None = None               # separates this request's prefix-cache entries
    prompt_text: str | None = None              # the text prompt_token_ids were encoded from, echoed in outputs
    deadline: float | None = None               # time.time() after which the core aborts the request

    def __post_init__(self):
        _check_token(self.token)
        if self.deadline is not None and not isinstance(self.deadline, (int, float)):
            raise ValueError(f"deadline must be a time.time() value, got {self.deadline!r}")


@dataclass(frozen=True)
class AbortRequest:
    """End a request now; its stream gets its last output, finished with "abort"."""

    token: int | None                           # the stream to end; None: whichever stream runs request_id
    request_id: str

    def __post_init__(self):
        _check_token(self.token, optional=True)


@dataclass(frozen=True)
class Stop:
    """End the core: commands sent before it are handled, then every stream
    still open ends with ``EngineShutdownError``. Sent by a core's own
    ``shutdown()``, never by the ``AsyncEngine`` itself."""


# What a core's ``send`` takes.
Command = AddRequest | AbortRequest
