"""Request -> engine -> response for /v1/completions and /v1/chat/completions.

``OpenAIServing`` validates a typed request (sampling values by
``SamplingParams``, prompts and messages by the engine's tokenizer), runs it
on the shared ``AsyncEngine`` through an ``EngineRun``, and returns either a
whole response body or an async iterator of server-sent events ending with
``data: [DONE]``. The HTTP layer (``app.py``) only routes, authenticates and
maps exceptions (``errors.py``).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from common.errors import InvalidRequestError
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.outputs import Logprobs
from service.errors import LoadingEngine
from service.openai import responses as r
from service.openai.engine_run import EngineRun, UsageCounter
from service.openai.errors import ModelNotFoundError, error_of
from service.openai.protocol import ChatCompletionRequest, CompletionRequest, InvalidFieldError
from service.tools.parsers import ParsedDelta, ToolCallDelta, ToolCallStream, parse_tool_calls, tool_call_stream
from service.tools.specs import check_choice_servable, encode_chat, with_forced_call

log = structlog.get_logger(__name__)


@dataclass
class _Choice:
    """One completion gathered for a non-streamed answer."""

    text: str = ""
    logprobs: list[Logprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, c: CompletionOutput) -> None:
        self.text += c.text
        self.logprobs.extend(c.logprobs or ())
        if c.finish_reason is not None:
            self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason


@dataclass
class EventStream:
    """The server-sent events of a streamed answer. Closing it aborts whatever
    still runs, whether or not anyone started reading the events."""

    events: AsyncIterator[str]
    run: EngineRun

    def __aiter__(self) -> AsyncIterator[str]:
        return self.events

    async def aclose(self) -> None:
        await self.events.aclose()
        await self.run.close()


class OpenAIServing:
    """Serves one engine (attached once loaded) under one model name."""

    def __init__(self, engine=None, served_model_name: str | None = None, limits=None,
                 tool_call_parser: str | None = None):
        self._engine = engine
        self.tool_call_parser = tool_call_parser   # service.tools.parsers.TOOL_CALL_PARSERS name, for tool_choice auto
        self._served_model_name = served_model_name
        self._limits = limits          # service.limits.RequestLimits: what gRPC callers may ask for, too
        self.created = int(time.time())
        self._token_texts: dict[int, str] = {}
        self.is_draining = False

    @property
    def is_serving(self) -> bool:
        """An engine is attached, alive, and not draining."""
        return self._engine is not None and not self._engine.is_dead and not self.is_draining

    engine = LoadingEngine()                    # raises ModelLoadingError (UNAVAILABLE) until attached

    @property
    def model_name(self) -> str:
        return self._served_model_name or self.engine.model_info.model

    def check_model(self, name: str | None) -> None:
        """Accept the served name, the ``--model`` path, or no name at all."""
        if name is not None and name not in (self.model_name, self.engine.args.model):
            raise ModelNotFoundError(name, self.model_name)

    def models(self) -> r.ModelList:
        return r.ModelList(data=[r.ModelCard(id=self.model_name, created=self.created,
                                             max_model_len=self.engine.model_info.max_model_len)])

    def _within_limits(self, params: SamplingParams, max_tokens_field: str | None) -> SamplingParams:
        """``params`` under the server's request limits (an unset max_tokens is capped, not refused)."""
        if self._limits is None:
            return params
        try:
            return self._limits.enforce(params, max_tokens_given=max_tokens_field is not None)
        except InvalidRequestError as e:    # names the gRPC field ("sampling.n"); HTTP's is "n"
            field, _, rest = str(e).removeprefix("sampling.").partition(" ")
            field = max_tokens_field if field == "max_tokens" and max_tokens_field else field
            raise InvalidFieldError(field, f"{field} {rest}") from None

    # -- endpoints -----------------------------------------------------------------

    async def completion(self, body: CompletionRequest, request_id: str | None = None
                         ) -> r.CompletionResponse | EventStream:
        """``request_id``: the engine's id of the call (the HTTP X-Request-Id); one is made when None."""
        self.check_model(body.model)
        inputs = body.engine_prompts()
        params = self._within_limits(body.sampling_params(), body.max_tokens_field)
        run = EngineRun(self.engine, request_id or f"cmpl-{uuid.uuid4().hex}", inputs, params)
        await run.start()
        if body.stream:
            return EventStream(self._completion_events(run, body.n, body.include_usage), run)
        prompts: dict[int, RequestOutput] = {}
        usage, choices = await _collect(run, body.n, prompts)
        if body.is_echo_only:
            usage.completion_tokens = 0
        return r.CompletionResponse(
            id=run.request_id, created=int(time.time()), model=self.model_name, usage=usage.to_dict(),
            choices=[self._completion_choice(body, k, ch, prompts[k // body.n]) for k, ch in sorted(choices.items())])

    def _completion_choice(self, body: CompletionRequest, index: int, ch: _Choice,
                           prompt: RequestOutput) -> r.CompletionChoice:
        """A whole completion; with ``echo`` its prompt (text and logprobs) comes first."""
        text, lps = ch.text, ch.logprobs
        if body.is_echo_only:
            text, lps = "", []
        logprobs = None
        if body.echo:
            echoed = prompt.prompt if prompt.prompt is not None and body.truncate_prompt_tokens is None else \
                self.engine.tokenizer.decode(prompt.prompt_token_ids, skip_special_tokens=False)
            text = echoed + text
            if body.logprobs is not None:
                logprobs = self._echo_logprobs(prompt.prompt_token_ids, prompt.prompt_logprobs, lps)
        elif body.logprobs is not None:
            logprobs = self._completion_logprobs(lps, [0])
        return r.CompletionChoice(index=index, text=text, finish_reason=ch.finish_reason, stop_reason=ch.stop_reason,
                                  logprobs=logprobs, prompt_logprobs=self._prompt_logprobs(prompt.prompt_logprobs)
                                  if body.prompt_logprobs is not None else None)

    async def chat(self, body: ChatCompletionRequest, request_id: str | None = None
                   ) -> r.ChatCompletionResponse | EventStream:
        """``request_id``: the engine's id of the call (the HTTP X-Request-Id); one is made when None."""
        self.check_model(body.model)
        tools, choice = body.tool_request()
        check_choice_servable(choice, self.tool_call_parser)
        messages = body.engine_messages()
        params = self._within_limits(body.sampling_params(), body.max_tokens_field)
        params = with_forced_call(params, tools, choice, parallel=body.parallel_tool_calls is not False)
        inputs: list[dict] = [{"messages": messages}]
        if tools:                       # the template shows them to the model
            ids = await self.engine.run_tokenizer(encode_chat, self.engine.tokenizer, messages, tools)
            inputs = [{"prompt_token_ids": ids}]
        new_stream = functools.partial(tool_call_stream, choice.mode, choice.name, self.tool_call_parser)
        run = EngineRun(self.engine, request_id or f"chatcmpl-{uuid.uuid4().hex}", inputs, params)
        await run.start()
        if body.stream:
            return EventStream(self._chat_events(run, body.n, body.logprobs, body.include_usage, new_stream), run)
        prompts: dict[int, RequestOutput] = {}
        usage, choices = await _collect(run, body.n, prompts)
        return r.ChatCompletionResponse(
            id=run.request_id, created=int(time.time()), model=self.model_name, usage=usage.to_dict(),
            choices=[self._chat_choice(k, ch, new_stream(), body.logprobs) for k, ch in sorted(choices.items())],
            prompt_logprobs=self._prompt_logprobs(prompts[0].prompt_logprobs) if body.prompt_logprobs is not None
            else None)

    def _chat_choice(self, index: int, ch: _Choice, stream: ToolCallStream | None, logprobs: bool) -> r.ChatChoice:
        """A whole chat completion, its tool calls parsed out when ``stream`` is given."""
        content, calls = (ch.text, []) if stream is None else parse_tool_calls(stream, ch.text)
        message = r.AssistantMessage(content=content if content or not calls else None, tool_calls=[
            r.ToolCall(id=c.id, function=r.FunctionCall(name=c.name, arguments=c.arguments)) for c in calls])
        return r.ChatChoice(index=index, message=message, finish_reason=_finish_reason(ch.finish_reason, bool(calls)),
                            stop_reason=ch.stop_reason, logprobs=self._chat_logprobs(ch.logprobs) if logprobs else None)

    # -- server-sent events ----------------------------------------------------------

    async def _completion_events(self, run: EngineRun, n: int, include_usage: bool) -> AsyncIterator[str]:
        created, usage, offsets = int(time.time()), UsageCounter(), {}
        chunk = dict(id=run.request_id, created=created, model=self.model_name)
        try:
            async for batch in run.batches():
                for i, out in batch.items():
                    usage.add(i, out)
                    for c in out.outputs:
                        if not (c.text or c.logprobs or c.finished):
                            continue
                        k = i * n + c.index
                        logprobs = None
                        if c.logprobs is not None:
                            offset = offsets.setdefault(k, [0])
                            logprobs = self._completion_logprobs(c.logprobs, offset)
                        choice = r.CompletionChoice(index=k, text=c.text, logprobs=logprobs,
                                                    finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                        yield _event(r.CompletionResponse(choices=[choice], **chunk), include_usage)
            if include_usage:
                yield _event(r.CompletionResponse(choices=[], usage=usage.to_dict(), **chunk), True)
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            yield _error_event(e, run.request_id)
        yield "data: [DONE]\n\n"

    async def _chat_events(self, run: EngineRun, n: int, logprobs: bool, include_usage: bool,
                           new_stream=lambda: None) -> AsyncIterator[str]:
        """``new_stream()`` gives each completion its tool-call stream (None: all content)."""
        created, usage, streams, called = int(time.time()), UsageCounter(), {}, set()
        chunk = dict(id=run.request_id, created=created, model=self.model_name)

        def event(**choice) -> str:
            return _event(r.ChatCompletionChunk(choices=[r.ChatChunkChoice(**choice)], **chunk), include_usage)

        try:
            for k in range(n):
                yield event(index=k, delta={"role": "assistant", "content": ""})
            async for batch in run.batches():
                for out in batch.values():
                    usage.add(0, out)
                    for c in out.outputs:
                        if c.index not in streams:
                            streams[c.index] = new_stream()
                        stream = streams[c.index]
                        parsed = ParsedDelta(content=c.text) if stream is None else stream.feed(c.text)
                        if c.finished and stream is not None:
                            parsed.extend(stream.finish())
                        if parsed.content or c.logprobs:
                            yield event(index=c.index, delta={"content": parsed.content},
                                        logprobs=self._chat_logprobs(c.logprobs) if logprobs else None)
                        if parsed.tool_calls:
                            called.add(c.index)
                            yield event(index=c.index, delta={"tool_calls": [_tool_call_delta(d)
                                                                             for d in parsed.tool_calls]})
                        if c.finished:
                            yield event(index=c.index, delta={},
                                        finish_reason=_finish_reason(c.finish_reason, c.index in called),
                                        stop_reason=c.stop_reason)
            if include_usage:
                yield _event(r.ChatCompletionChunk(choices=[], usage=usage.to_dict(), **chunk), True)
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            yield _error_event(e, run.request_id)
        yield "data: [DONE]\n\n"

    # -- logprobs ------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _echo_logprobs(self, prompt_ids: list[int], prompt_lps: list[Logprobs | None] | None,
                       lps: list[Logprobs]) -> r.CompletionLogprobs:
        """Legacy logprobs of an echoed prompt then the completion, as evaluation
        harnesses read them: the first prompt token's logprob and top are null."""
        if prompt_lps is None or len(prompt_lps) != len(prompt_ids):
            raise InvalidRequestError("the prompt's logprobs are missing (the request ended before its prompt "
                                      "was computed)")
        out = r.CompletionLogprobs()
        offset = [0]
        first = self._token_text(prompt_ids[0])
        out.tokens.append(first)
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
        out.text_offset.append(0)
        offset[0] += len(first)
        rest = self._completion_logprobs([lp for lp in prompt_lps[1:]] + list(lps), offset)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(out, name).extend(getattr(rest, name))
        return out

    def _prompt_logprobs(self, lps: list[Logprobs | None] | None) -> r.PromptLogprobs | None:
        """vLLM's ``prompt_logprobs``: the prompt token and its top alternatives at each position."""
        if lps is None:
            return None

        def entry(token_id: int, logprob: float, rank: int | None) -> dict:
            return {"logprob": max(logprob, r.MIN_LOGPROB), "rank": rank, "decoded_token": self._token_text(token_id)}

        out: r.PromptLogprobs = []
        for lp in lps:
            if lp is None:
                out.append(None)
                continue
            position = {str(t): entry(t, v, k) for k, (t, v) in enumerate(lp.top, start=1)}
            position[str(lp.token_id)] = entry(lp.token_id, lp.logprob, lp.rank)
            out.append(position)
        return out

    def _completion_logprobs(self, lps: list[Logprobs], offset: list[int]) -> r.CompletionLogprobs:
        """Legacy completions logprobs; ``offset`` (a one-item list) carries the
        choice's text offset from one streamed chunk to the next."""
        out = r.CompletionLogprobs()
        for lp in lps:
            token = self._token_text(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(max(lp.logprob, r.MIN_LOGPROB))
            out.top_logprobs.append({self._token_text(t): max(v, r.MIN_LOGPROB) for t, v in lp.top})
            out.text_offset.append(offset[0])
            offset[0] += len(token)
        return out

    def _chat_logprobs(self, lps: list[Logprobs] | None) -> r.ChatLogprobs:
        def top(token_id: int, logprob: float) -> r.TopLogprob:
            token = self._token_text(token_id)
            return r.TopLogprob(token=token, logprob=max(logprob, r.MIN_LOGPROB), bytes=list(token.encode()))

        return r.ChatLogprobs(content=[
            r.TokenLogprob(**top(lp.token_id, lp.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in lp.top])
            for lp in lps or ()])


async def _collect(run: EngineRun, n: int, prompts: dict[int, RequestOutput] | None = None
                   ) -> tuple[UsageCounter, dict[int, _Choice]]:
    """A whole run: its usage, and its completions by choice index (prompt i's k-th is i * n + k).
    ``prompts`` gets, per prompt index, an output holding its prompt (and prompt logprobs)."""
    usage, choices = UsageCounter(), {}
    async for batch in run.batches():
        for i, out in batch.items():
            usage.add(i, out)
            if prompts is not None and (i not in prompts or out.prompt_logprobs is not None):
                prompts[i] = out
            for c in out.outputs:
                choices.setdefault(i * n + c.index, _Choice()).add(c)
    return usage, choices


def _finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    """A completion that stopped after calling tools finished with "tool_calls"."""
    return "tool_calls" if has_tool_calls and reason == "stop" else reason


def _tool_call_delta(d: ToolCallDelta) -> dict:
    """OpenAI's streamed form of a call piece (id, type and name on its first)."""
    function = {"arguments": d.arguments} if d.name is None else {"name": d.name, "arguments": d.arguments}
    head = {} if d.id is None else {"id": d.id, "type": "function"}
    return {"index": d.index, **head, "function": function}


def _event(model, include_usage: bool) -> str:
    """One SSE event; chunks carry ``usage`` (null until the last) only when asked for."""
    return f"data: {model.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


def _error_event(exc: Exception, request_id: str) -> str:
    status, body = error_of(exc, request_id)
    log.warning("http_stream_failed", request_id=request_id, status=status, error=body.error.message)
    return f"data: {body.model_dump_json()}\n\n"
