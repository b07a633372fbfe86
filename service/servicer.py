"""The Generate servicer: validate, convert, submit, stream. Nothing more.

Each method is wrapped by ``errors.map_errors``, the one place that turns
exceptions into status codes. A cancelled call or a passed deadline cancels
the handler task; closing the engine's stream aborts the request inside the
engine, so its KV blocks return to the pool within one step. Deltas that
pile up behind a slow write go out as one message (``generate_batches``
hands them over together, ``service.streaming.merge_deltas`` joins them).
"""

from __future__ import annotations

import asyncio
import functools
import time
from contextlib import aclosing

import grpc
import structlog

from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from pagedgen_client._proto.pagedgen.v1 import generate_pb2_grpc as pb_grpc
from service import convert
from service.errors import LoadingEngine, map_errors
from service.info import ServerInfo
from service.metrics import observe_generate
from service.limits import DEFAULT_MAX_MESSAGE_BYTES, RequestLimits
from service.streaming import merge_deltas
from service.tools.parsers import tool_call_stream
from service.tools.specs import check_choice_servable, encode_chat

log = structlog.get_logger(__name__)


class GenerateServicer(pb_grpc.GenerateServicer):
    """Serves one ``AsyncEngine`` (the model and tokenizer it loaded)."""

    metrics = None                              # a service.metrics.ServerMetrics with --metrics-port

    def __init__(self, engine=None, *, limits: RequestLimits | None = None, log_requests: bool = False,
                 served_model_name: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tool_call_parser: str | None = None):
        self._engine = engine
        self.limits = limits or RequestLimits()
        self.log_requests = log_requests        # prompt and completion text in the logs (debugging only)
        self.served_model_name = served_model_name  # what ModelInfo reports, as the HTTP API does
        self.max_message_bytes = max_message_bytes  # the server's gRPC message limit (reported only)
        self.tool_call_parser = tool_call_parser    # how tool calls are found in output (tool_choice auto)

    engine = LoadingEngine()                    # raises ModelLoadingError (UNAVAILABLE) until attached

    @observe_generate
    @map_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        if not request.request_id:
            request.request_id = convert.new_request_id()   # errors and logs name it too
        inp = convert.generate_request_from_pb(request)
        inp.sampling_params = self.limits.enforce(inp.sampling_params,
                                                  max_tokens_given=request.sampling.HasField("max_tokens"))
        texts = _log_request_text(inp) if self.log_requests else None
        stream = convert.ResponseStream(inp.request_id, inp.return_token_ids, inp.return_timing,
                                        frozenset(self.engine.model_info.eos_token_ids))
        if inp.tools:
            check_choice_servable(inp.tool_choice, self.tool_call_parser)
            stream.new_tool_stream = functools.partial(tool_call_stream, inp.tool_choice.mode, inp.tool_choice.name,
                                                       self.tool_call_parser)
            inp.prompt_token_ids = await self.engine.run_tokenizer(encode_chat, self.engine.tokenizer,
                                                                   inp.messages, inp.tools)
            inp.messages = None
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.time() + remaining
        start, first_token_s, status = time.perf_counter(), None, "error"
        try:
            batches = self.engine.generate_batches(inp.request_id, deadline=deadline, **inp.engine_kwargs())
            async with aclosing(batches):
                async for batch in batches:
                    delta = merge_deltas(batch)
                    msgs = stream.to_pb(delta)
                    if first_token_s is None and stream.num_completion_tokens:
                        first_token_s = time.perf_counter() - start
                    for msg in msgs:
                        if msg.finish_reason == pb.FINISH_REASON_ABORT and _passed(deadline):
                            raise TimeoutError(f"request {inp.request_id} passed its deadline")
                        if texts is not None:
                            texts[msg.index] = texts.get(msg.index, "") + msg.text
                        yield msg
                    if self.metrics is not None and msgs and delta.emitted_time is not None:
                        # gRPC resumes this generator once the message is sent
                        self.metrics.observe_delivery(time.time() - delta.emitted_time)
            status = "ok"
        except (asyncio.CancelledError, GeneratorExit):  # the client went away or gRPC's deadline passed
            status = "cancelled"
            raise
        except TimeoutError:                # the engine expired it first
            status = "deadline_exceeded"
            raise
        finally:
            _log_finish(inp, stream, status, time.perf_counter() - start, first_token_s)
            if texts is not None:
                log.info("request_completion_text", request_id=inp.request_id,
                         completions=[texts[i] for i in sorted(texts)])

    @map_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        text, messages = convert.tokenize_input_from_pb(request)
        tokenizer = self.engine.tokenizer
        if text is not None:
            ids = await self.engine.run_tokenizer(tokenizer.encode, text)
        else:
            ids = await self.engine.run_tokenizer(tokenizer.apply_chat_template, messages)
        return pb.TokenizeResponse(token_ids=ids)

    @map_errors
    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        ids = convert.detokenize_ids_from_pb(request, self.engine.model_info.vocab_size)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = await self.engine.run_tokenizer(functools.partial(self.engine.tokenizer.decode, skip_special_tokens=skip),
                                               ids)
        return pb.DetokenizeResponse(text=text)

    @map_errors
    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        return convert.model_info_to_pb(self.engine.model_info, self.served_model_name)

    @map_errors
    async def GetStats(self, request: pb.GetStatsRequest, context) -> pb.GetStatsResponse:
        return convert.stats_to_pb(self.engine.get_stats())

    @map_errors
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        """End the named requests that are in flight (any caller may: see the proto); others are ignored."""
        aborted = self.engine.abort_in_flight(request.request_ids)
        if aborted:
            log.info("requests_aborted", request_ids=aborted, api="grpc")
        return pb.AbortResponse(aborted_ids=aborted)

    @map_errors
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.GetServerInfoResponse:
        return convert.server_info_to_pb(ServerInfo.of(self.engine, limits=self.limits,
                                                       max_message_bytes=self.max_message_bytes,
                                                       served_model_name=self.served_model_name))


def _log_request_text(inp: convert.GenerateInput) -> dict[int, str]:
    """With ``--log-requests`` only: the request's input, and a dict to collect its completions in."""
    log.info("request_text", request_id=inp.request_id, prompt=inp.prompt, messages=inp.messages,
             prompt_token_ids=inp.prompt_token_ids)
    return {}


def _passed(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline


def _log_finish(inp: convert.GenerateInput, stream: convert.ResponseStream, status: str,
                duration_s: float, first_token_s: float | None) -> None:
    """One event per request; never the prompt text. A failing log sink must
    not fail a request that was served."""
    try:
        _emit_finish(inp, stream, status, duration_s, first_token_s)
    except Exception:  # noqa: BLE001
        pass


def _emit_finish(inp: convert.GenerateInput, stream: convert.ResponseStream, status: str,
                 duration_s: float, first_token_s: float | None) -> None:
    log.info("request_finished", request_id=inp.request_id, status=status,
             finish_reasons=[stream.finish_reasons.get(i) for i in sorted(stream.num_output_tokens)],
             prompt_tokens=stream.num_prompt_tokens, cached_prompt_tokens=stream.num_cached_tokens,
             completion_tokens=stream.num_completion_tokens, n=inp.sampling_params.n,
             ttft_ms=None if first_token_s is None else round(first_token_s * 1000, 1),
             duration_ms=round(duration_s * 1000, 1))
