"""The Generate servicer: validate, convert, submit, stream. Nothing more.

Each method is wrapped by ``errors.map_errors``, the one place that turns
exceptions into status codes. A cancelled call or a passed deadline cancels
the handler task; closing the engine's stream aborts the request inside the
engine, so its KV blocks return to the pool within one step. Deltas that
pile up behind a slow write go out as one message (``service.streaming``).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import grpc
import structlog

from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from pagedgen_client._proto.pagedgen.v1 import generate_pb2_grpc as pb_grpc
from service import convert
from service.errors import ModelLoadingError, map_errors
from service.streaming import coalesced, merge_deltas

log = structlog.get_logger(__name__)


class GenerateServicer(pb_grpc.GenerateServicer):
    """Serves one ``AsyncEngine`` (the model and tokenizer it loaded)."""

    def __init__(self, engine=None):
        self._engine = engine

    @property
    def engine(self):
        if self._engine is None:
            raise ModelLoadingError("the model is still loading; retry shortly")
        return self._engine

    @engine.setter
    def engine(self, engine) -> None:
        self._engine = engine

    @map_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        if not request.request_id:
            request.request_id = convert.new_request_id()   # errors and logs name it too
        inp = convert.generate_request_from_pb(request)
        stream = convert.ResponseStream(inp.request_id, inp.return_token_ids)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.time() + remaining
        start, first_token_s, status = time.perf_counter(), None, "error"
        try:
            outputs = self.engine.generate(inp.request_id, deadline=deadline, **inp.engine_kwargs())
            async with aclosing(coalesced(outputs)) as batches:
                async for batch in batches:
                    msgs = stream.to_pb(merge_deltas(batch))
                    if first_token_s is None and stream.num_completion_tokens:
                        first_token_s = time.perf_counter() - start
                    for msg in msgs:
                        if msg.finish_reason == pb.FINISH_REASON_ABORT and _passed(deadline):
                            raise TimeoutError(f"request {inp.request_id} passed its deadline")
                        yield msg
            status = "ok"
        except asyncio.CancelledError:      # the client went away or gRPC's deadline passed
            status = "cancelled"
            raise
        except TimeoutError:                # the engine expired it first
            status = "deadline_exceeded"
            raise
        finally:
            _log_finish(inp, stream, status, time.perf_counter() - start, first_token_s)

    @map_errors
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        text, messages = convert.tokenize_input_from_pb(request)
        tokenizer = self.engine.tokenizer
        if text is not None:
            ids = await asyncio.to_thread(tokenizer.encode, text)
        else:
            ids = await asyncio.to_thread(tokenizer.apply_chat_template, messages)
        return pb.TokenizeResponse(token_ids=ids)

    @map_errors
    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        ids = convert.detokenize_ids_from_pb(request, self.engine.model_info.vocab_size)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = await asyncio.to_thread(self.engine.tokenizer.decode, ids, skip_special_tokens=skip)
        return pb.DetokenizeResponse(text=text)

    @map_errors
    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        return convert.model_info_to_pb(self.engine.model_info)

    @map_errors
    async def GetStats(self, request: pb.GetStatsRequest, context) -> pb.GetStatsResponse:
        return convert.stats_to_pb(self.engine.get_stats())


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
