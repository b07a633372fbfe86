"""Conversions between the wire messages and the engine's types.

``*_from_pb`` validate what they read: a bad value raises
``InvalidRequestError`` whose message names the proto field (e.g.
``sampling.top_p``). Unset optional fields take the engine's defaults.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequestError
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from scheduler.output import Logprobs

if TYPE_CHECKING:
    from engine.async_engine import ModelInfo
    from engine.llm_engine import EngineStats

MAX_REQUEST_ID_LEN = 256
FINISH_REASON_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_SAMPLING_FIELDS = tuple(pb.SamplingParams.DESCRIPTOR.fields_by_name)
_REPEATED = ("stop", "stop_token_ids")


# -- requests ----------------------------------------------------------------

def sampling_params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Engine params from the set fields of ``msg``; the rest keep their defaults."""
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in _SAMPLING_FIELDS
                              if name not in _REPEATED and msg.HasField(name)}
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:    # SamplingParams names the field first, as the proto does
        raise InvalidRequestError(f"sampling.{e}") from None


def sampling_params_to_pb(params: SamplingParams) -> pb.SamplingParams:
    """The message that ``sampling_params_from_pb`` turns back into ``params``.

    ``None`` fields are left unset, so ``max_tokens=None`` (up to the context)
    comes back as the engine's default; send ``max_model_len`` instead.
    """
    msg = pb.SamplingParams(stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))
    for name in _SAMPLING_FIELDS:
        value = getattr(params, name)
        if name not in _REPEATED and value is not None:
            setattr(msg, name, value)
    return msg


def chat_from_pb(msg: pb.ChatMessages, field_name: str = "chat") -> list[dict]:
    if not msg.messages:
        raise InvalidRequestError(f"{field_name}.messages must hold at least one message")
    for i, m in enumerate(msg.messages):
        if not m.role:
            raise InvalidRequestError(f"{field_name}.messages[{i}].role must not be empty")
    return [{"role": m.role, "content": m.content} for m in msg.messages]


@dataclass
class GenerateInput:
    """A validated GenerateRequest, ready for ``AsyncEngine.generate``."""

    request_id: str
    sampling_params: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None
    cache_salt: str | None = None
    return_token_ids: bool = True
    return_timing: bool = False

    def engine_kwargs(self) -> dict[str, Any]:
        return dict(prompt=self.prompt, prompt_token_ids=self.prompt_token_ids, messages=self.messages,
                    sampling_params=self.sampling_params, cache_salt=self.cache_salt)


def new_request_id() -> str:
    return uuid.uuid4().hex


def generate_request_from_pb(msg: pb.GenerateRequest) -> GenerateInput:
    if len(msg.request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequestError(f"request_id must be at most {MAX_REQUEST_ID_LEN} characters")
    out = GenerateInput(request_id=msg.request_id or new_request_id(),
                        sampling_params=sampling_params_from_pb(msg.sampling),
                        return_token_ids=msg.return_token_ids if msg.HasField("return_token_ids") else True,
                        return_timing=msg.return_timing,
                        cache_salt=msg.cache_salt if msg.HasField("cache_salt") and msg.cache_salt else None)
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError("input is required: set one of prompt, prompt_token_ids, chat")
    if kind == "prompt":
        if not msg.prompt:
            raise InvalidRequestError("prompt must not be empty")
        out.prompt = msg.prompt
    elif kind == "prompt_token_ids":
        if not msg.prompt_token_ids.ids:
            raise InvalidRequestError("prompt_token_ids.ids must not be empty")
        out.prompt_token_ids = list(msg.prompt_token_ids.ids)
    else:
        out.messages = chat_from_pb(msg.chat)
    return out


def tokenize_input_from_pb(msg: pb.TokenizeRequest) -> tuple[str | None, list[dict] | None]:
    """(text, None) or (None, messages)."""
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError("input is required: set one of text, chat")
    return (msg.text, None) if kind == "text" else (None, chat_from_pb(msg.chat))


def detokenize_ids_from_pb(msg: pb.DetokenizeRequest, vocab_size: int) -> list[int]:
    ids = list(msg.token_ids)
    bad = next((i for i, t in enumerate(ids) if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token_ids[{bad}] = {ids[bad]} is outside the vocabulary [0, {vocab_size})")
    return ids


# -- responses ---------------------------------------------------------------

def logprobs_to_pb(lp: Logprobs) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                            top_logprobs=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def completion_to_pb(request_id: str, c: CompletionOutput, *, return_token_ids: bool = True,
                     usage: pb.Usage | None = None) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=request_id, index=c.index, text=c.text,
        token_ids=c.token_ids if return_token_ids else (),
        logprobs=[logprobs_to_pb(lp) for lp in c.logprobs or ()],
        finish_reason=FINISH_REASON_TO_PB[c.finish_reason], usage=usage)
    if isinstance(c.stop_reason, str):
        msg.stop_str = c.stop_reason
    elif isinstance(c.stop_reason, int):
        msg.stop_token_id = c.stop_reason
    return msg


@dataclass
class ResponseStream:
    """Turns a request's delta ``RequestOutput``s into GenerateResponses,
    counting tokens per completion for the ``usage`` of its last message."""

    request_id: str
    return_token_ids: bool = True
    return_timing: bool = False
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: dict[int, int] = field(default_factory=dict)     # index -> tokens so far
    finish_reasons: dict[int, str] = field(default_factory=dict)

    def to_pb(self, out: RequestOutput) -> list[pb.GenerateResponse]:
        self.num_prompt_tokens = len(out.prompt_token_ids)
        self.num_cached_tokens = out.num_cached_tokens
        msgs = []
        for c in out.outputs:
            n = self.num_output_tokens[c.index] = self.num_output_tokens.get(c.index, 0) + len(c.token_ids)
            usage = None
            if c.finish_reason is not None:
                self.finish_reasons[c.index] = c.finish_reason
                usage = pb.Usage(prompt_tokens=self.num_prompt_tokens, completion_tokens=n,
                                 cached_prompt_tokens=self.num_cached_tokens)
            elif not (c.text or c.token_ids or c.logprobs):
                continue                            # nothing new for this completion
            msgs.append(completion_to_pb(self.request_id, c, return_token_ids=self.return_token_ids, usage=usage))
        if self.return_timing and out.emitted_time is not None:
            nanos = int(out.emitted_time * 1e9)
            for msg in msgs:
                msg.engine_time_unix_nanos = nanos
        return msgs

    @property
    def num_completion_tokens(self) -> int:
        return sum(self.num_output_tokens.values())


def model_info_to_pb(info: ModelInfo) -> pb.ModelInfoResponse:
    return pb.ModelInfoResponse(
        model=info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
        eos_token_ids=list(info.eos_token_ids), block_size=info.block_size,
        num_kv_blocks=info.num_kv_blocks, backend=info.backend, dtype=info.dtype)


def stats_to_pb(stats: EngineStats) -> pb.GetStatsResponse:
    return pb.GetStatsResponse(
        num_running=stats.num_running, num_waiting=stats.num_waiting,
        kv_blocks_total=stats.kv_blocks_total, kv_blocks_free=stats.kv_blocks_free,
        num_preemptions=stats.num_preemptions, prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_hits=stats.prefix_cache_hits)
