"""Conversions between the wire messages and the engine's types.

``*_from_pb`` validate what they read: a bad value raises
``InvalidRequestError`` whose message names the proto field (e.g.
``sampling.top_p``). Unset optional fields take the engine's defaults.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from common.errors import InvalidRequestError
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams, StructuredOutputsParams
from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from engine.outputs import Logprobs
from service.tools.parsers import ToolCallStream, merge_tool_call_deltas
from service.tools.specs import ToolChoice, ToolSpec, with_forced_call
from service.tools.wire import message_tool_fields, tool_calls_to_pb, tools_from_pb

if TYPE_CHECKING:
    from engine.model_info import ModelInfo
    from engine.llm_engine import EngineStats
    from service.info import ServerInfo

MAX_REQUEST_ID_LEN = 256
FINISH_REASON_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "time_limit": pb.FINISH_REASON_TIME_LIMIT,
}
_SAMPLING_FIELDS = tuple(pb.SamplingParams.DESCRIPTOR.fields_by_name)
_REPEATED = ("stop", "stop_token_ids")
_CONSTRAINTS = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.oneofs_by_name["constraint"].fields)
_NOT_SCALAR = (*_REPEATED, "logit_bias", *_CONSTRAINTS)    # converted on their own


# -- requests ----------------------------------------------------------------

def sampling_params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Engine params from the set fields of ``msg``; the rest keep their defaults,
    but for ``max_tokens``: unset means up to the context (``None``), as in the
    HTTP API, not the offline API's 16 (the server caps it, ``RequestLimits``)."""
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in _SAMPLING_FIELDS
                              if name not in _NOT_SCALAR and msg.HasField(name)}
    kwargs.setdefault("max_tokens", None)
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    kwargs["logit_bias"] = dict(msg.logit_bias) or None
    try:
        kwargs["structured_outputs"] = structured_outputs_from_pb(msg)
        return SamplingParams(**kwargs)
    except ValueError as e:    # SamplingParams names the field first, as the proto does
        raise InvalidRequestError(f"sampling.{e}") from None


def structured_outputs_from_pb(msg: pb.SamplingParams) -> StructuredOutputsParams | None:
    """The ``constraint`` oneof of ``msg`` as engine params (ValueError naming the field); None when unset."""
    kind = msg.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not msg.json_object):
        return None
    if kind == "json_schema":
        return StructuredOutputsParams(json=msg.json_schema)
    if kind == "choice":
        return StructuredOutputsParams(choice=tuple(msg.choice.choices))
    return StructuredOutputsParams(**{kind: getattr(msg, kind)})


def sampling_params_to_pb(params: SamplingParams) -> pb.SamplingParams:
    """The message that ``sampling_params_from_pb`` turns back into ``params``.

    ``None`` fields are left unset (``max_tokens=None``: up to the context).
    """
    msg = pb.SamplingParams(stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
                            logit_bias=dict(params.logit_bias or {}))
    for name in _SAMPLING_FIELDS:
        value = getattr(params, name, None)
        if name not in _NOT_SCALAR and value is not None:
            setattr(msg, name, value)
    so = params.structured_outputs
    if so is not None:
        if so.kind == "json":
            msg.json_schema = so.json
        elif so.kind == "choice":
            msg.choice.choices.extend(so.choice)
        else:
            setattr(msg, so.kind, so.spec)
    return msg


# GenerateRequest fields that are engine SamplingParams fields of the same name (request-level options).
_REQUEST_FIELDS = ("priority", "time_limit_ms", "truncate_prompt_tokens")


def request_options_from_pb(msg: pb.GenerateRequest, params: SamplingParams) -> SamplingParams:
    """``params`` with the set request-level fields of ``msg`` (priority, time limit, truncation)."""
    kwargs = {name: getattr(msg, name) for name in _REQUEST_FIELDS if msg.HasField(name)}
    if not kwargs:
        return params
    try:
        return replace(params, **kwargs)
    except ValueError as e:    # names the field: "time_limit_ms must be a positive integer ..."
        raise InvalidRequestError(str(e)) from None


def chat_from_pb(msg: pb.ChatMessages, field_name: str = "chat") -> list[dict]:
    if not msg.messages:
        raise InvalidRequestError(f"{field_name}.messages must hold at least one message")
    out = []
    for i, m in enumerate(msg.messages):
        if not m.role:
            raise InvalidRequestError(f"{field_name}.messages[{i}].role must not be empty")
        out.append({"role": m.role, "content": m.content, **message_tool_fields(m, f"{field_name}.messages[{i}]")})
    return out


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
    tools: tuple[ToolSpec, ...] = ()            # functions shown to the chat template
    tool_choice: ToolChoice = ToolChoice("none")

    def engine_kwargs(self) -> dict[str, Any]:
        return dict(prompt=self.prompt, prompt_token_ids=self.prompt_token_ids, messages=self.messages,
                    sampling_params=self.sampling_params, cache_salt=self.cache_salt)


def new_request_id() -> str:
    return uuid.uuid4().hex


def generate_request_from_pb(msg: pb.GenerateRequest) -> GenerateInput:
    if len(msg.request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequestError(f"request_id must be at most {MAX_REQUEST_ID_LEN} characters")
    out = GenerateInput(request_id=msg.request_id or new_request_id(),
                        sampling_params=request_options_from_pb(msg, sampling_params_from_pb(msg.sampling)),
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
    out.tools, out.tool_choice = tools_from_pb(msg)
    if out.tools and out.messages is None:
        raise InvalidRequestError("tools need chat input: the chat template shows them to the model")
    out.sampling_params = with_forced_call(out.sampling_params, out.tools, out.tool_choice)
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


def prompt_logprobs_to_pb(lps: list[Logprobs | None]) -> list[pb.TokenLogprobs]:
    """The prompt's logprobs, from its second token on (the first has none)."""
    return [logprobs_to_pb(lp) for lp in lps[1:]]


def completion_to_pb(request_id: str, c: CompletionOutput, *, return_token_ids: bool = True,
                     usage: pb.Usage | None = None, eos_token_ids: frozenset[int] = frozenset()) -> pb.GenerateResponse:
    """One completion's delta. An end-of-sequence stop (the engine's
    ``stop_reason`` is None for it, as vLLM's is) reports the EOS token that
    ended it in ``stop_token_id``, as the proto says."""
    msg = pb.GenerateResponse(
        request_id=request_id, index=c.index, text=c.text,
        token_ids=c.token_ids if return_token_ids else (),
        logprobs=[logprobs_to_pb(lp) for lp in c.logprobs or ()],
        finish_reason=FINISH_REASON_TO_PB[c.finish_reason], usage=usage)
    if isinstance(c.stop_reason, str):
        msg.stop_str = c.stop_reason
    elif isinstance(c.stop_reason, int):
        msg.stop_token_id = c.stop_reason
    elif c.finish_reason == "stop" and c.token_ids and c.token_ids[-1] in eos_token_ids:
        msg.stop_token_id = c.token_ids[-1]
    return msg


@dataclass
class ResponseStream:
    """Turns a request's delta ``RequestOutput``s into GenerateResponses,
    counting tokens per completion for the ``usage`` of its last message."""

    request_id: str
    return_token_ids: bool = True
    return_timing: bool = False
    eos_token_ids: frozenset[int] = frozenset()  # the model's: an EOS stop reports its id in stop_token_id
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: dict[int, int] = field(default_factory=dict)     # index -> tokens so far
    finish_reasons: dict[int, str] = field(default_factory=dict)
    new_tool_stream: Callable[[], ToolCallStream | None] = lambda: None  # with tools: each completion's parser
    tool_streams: dict[int, ToolCallStream | None] = field(default_factory=dict)    # index -> its parser
    tool_call_deltas: dict[int, list] = field(default_factory=dict)     # index -> call pieces not yet sent

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
            msg = completion_to_pb(self.request_id, c, return_token_ids=self.return_token_ids, usage=usage,
                                   eos_token_ids=self.eos_token_ids)
            self._parse_tool_calls(c, msg)
            msgs.append(msg)
        if out.prompt_logprobs is not None:        # once per request, on its first message of this delta
            if not msgs:
                msgs.append(pb.GenerateResponse(request_id=self.request_id))
            msgs[0].prompt_logprobs.extend(prompt_logprobs_to_pb(out.prompt_logprobs))
        if self.return_timing and out.emitted_time is not None:
            nanos = int(out.emitted_time * 1e9)
            for msg in msgs:
                msg.engine_time_unix_nanos = nanos
        return msgs

    def _parse_tool_calls(self, c: CompletionOutput, msg: pb.GenerateResponse) -> None:
        """With tools: ``msg.text`` keeps the content only, and complete calls
        go out in ``msg.tool_calls`` (a streamed-arguments call once it ends)."""
        if c.index not in self.tool_streams:
            self.tool_streams[c.index] = self.new_tool_stream()
        stream = self.tool_streams[c.index]
        if stream is None:
            return
        parsed = stream.feed(c.text)
        if c.finish_reason is not None:
            parsed.extend(stream.finish())
        msg.text = parsed.content
        pending = self.tool_call_deltas.setdefault(c.index, [])
        pending.extend(parsed.tool_calls)
        if pending and (c.finish_reason is not None or not stream.streams_arguments):
            msg.tool_calls.extend(tool_calls_to_pb(merge_tool_call_deltas(pending)))
            pending.clear()
        if c.finish_reason == "stop" and stream.num_calls:
            msg.finish_reason = pb.FINISH_REASON_TOOL_CALLS

    @property
    def num_completion_tokens(self) -> int:
        return sum(self.num_output_tokens.values())


def model_info_to_pb(info: ModelInfo, served_model_name: str | None = None) -> pb.ModelInfoResponse:
    """``served_model_name`` (``--served-model-name``) replaces the model's own name in ``model``."""
    return pb.ModelInfoResponse(
        model=served_model_name or info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
        eos_token_ids=list(info.eos_token_ids), block_size=info.block_size,
        num_kv_blocks=info.num_kv_blocks, backend=info.backend, dtype=info.dtype, architecture=info.architecture,
        loaded_model=info.model, weight_format=info.weight_format)


def stats_to_pb(stats: EngineStats) -> pb.GetStatsResponse:
    return pb.GetStatsResponse(
        num_running=stats.num_running, num_waiting=stats.num_waiting,
        kv_blocks_total=stats.kv_blocks_total, kv_blocks_free=stats.kv_blocks_free,
        num_preemptions=stats.num_preemptions, prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_hits=stats.prefix_cache_hits, num_waiting_prompt_tokens=stats.num_waiting_prompt_tokens,
        num_running_tokens=stats.num_running_tokens, device_memory_active_bytes=stats.device_memory_active_bytes,
        device_memory_peak_bytes=stats.device_memory_peak_bytes)


def server_info_to_pb(info: ServerInfo) -> pb.GetServerInfoResponse:
    lim = info.limits
    msg = pb.GetServerInfoResponse(
        version=info.version, model=info.model, backend=info.backend, dtype=info.dtype,
        weight_format=info.weight_format, max_num_seqs=info.max_num_seqs,
        max_num_batched_tokens=info.max_num_batched_tokens, max_model_len=info.max_model_len,
        block_size=info.block_size, num_kv_blocks=info.num_kv_blocks,
        limits=pb.ServerLimits(max_n=lim.max_n, max_stop_strings=lim.max_stop_strings,
                               max_stop_string_len=lim.max_stop_string_len,
                               max_message_bytes=info.max_message_bytes))
    if info.max_queue is not None:
        msg.max_queue = info.max_queue
    if lim.max_tokens is not None:
        msg.limits.max_tokens = lim.max_tokens
    if info.max_prompt_tokens is not None:
        msg.limits.max_prompt_tokens = info.max_prompt_tokens
    return msg
