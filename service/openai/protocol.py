"""Typed request bodies of the OpenAI-compatible API, and their engine form.

Request models forbid fields they do not know (OpenAI answers those with 400
"Unrecognized request argument"), so a mistyped option never passes
silently. pagedgen's extra sampling options (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``min_tokens``...) are ordinary
fields here: the OpenAI SDK sends them through ``extra_body``, as with vLLM.
Values are checked by ``SamplingParams`` itself, never twice.
"""

from __future__ import annotations

from typing import Any, Literal

from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field

from common.errors import InvalidRequestError
from engine.sampling_params import SamplingParams, StructuredOutputsParams
from service.tools.specs import ToolChoice, ToolSpec, parse_tool_choice, parse_tools, template_tool_calls

# Request fields that are SamplingParams fields of the same name and meaning.
_SAME_NAME_FIELDS = ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids", "skip_special_tokens",
                     "include_stop_str_in_output")
# pagedgen's request-level options (SamplingParams fields of the same name, as in gRPC's GenerateRequest).
_SAME_NAME_FIELDS += ("priority", "time_limit_ms", "truncate_prompt_tokens", "prompt_logprobs")


class InvalidFieldError(InvalidRequestError):
    """A request field holds a value the API cannot serve (400, with ``param``)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's named schema (``strict`` is accepted; the output always follows it)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``response_format``: ``text`` (unconstrained), ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Strict):
    """vLLM's ``structured_outputs`` body field: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


def _structured_outputs(response_format: ResponseFormat | None,
                        structured: StructuredOutputsRequest | None) -> StructuredOutputsParams | None:
    """The engine constraint of a request's ``response_format`` or ``structured_outputs`` (400 naming the field)."""
    if response_format is not None and structured is not None:
        raise InvalidFieldError("response_format", "give response_format or structured_outputs, not both")
    try:
        if structured is not None:
            return StructuredOutputsParams(json=structured.json_, json_object=bool(structured.json_object),
                                           regex=structured.regex, choice=structured.choice,
                                           grammar=structured.grammar)
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        schema = response_format.json_schema.json_schema if response_format.json_schema else None
        if schema is not None:
            return StructuredOutputsParams(json=schema)
    except ValueError as e:             # "structured_outputs.json is not valid JSON: ...": name the request's field
        param = "structured_outputs" if structured is not None else "response_format"
        message = str(e).removeprefix("structured_outputs")
        raise InvalidFieldError(param, param + ("" if message[:1] == "." else message[:1] and ":") + message) from None
    raise InvalidFieldError("response_format", "response_format type json_schema needs json_schema.schema "
                                               "(a JSON schema object)")


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None                # None: the served model
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None      # token id (as a string, OpenAI's form) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None   # OpenAI structured output: json_object / json_schema
    structured_outputs: StructuredOutputsRequest | None = None   # vLLM's: json, json_object, regex, choice, grammar
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None                 # logged nowhere, accepted for compatibility
    # pagedgen (vLLM) extras, sent by the OpenAI SDK through extra_body
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: int | None = None             # lower runs first; needs --scheduling-policy priority unless 0
    time_limit_ms: int | None = None        # ends with finish_reason "time_limit" and the text so far
    truncate_prompt_tokens: int | None = None   # keep the last N prompt tokens (after the chat template)
    prompt_logprobs: int | None = None      # vLLM's: logprobs of the prompt tokens (in choices[].prompt_logprobs)

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidFieldError("stream_options", "stream_options is only allowed with stream: true")
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidFieldError("prompt_logprobs", "prompt_logprobs is not supported with stream: true; "
                                                       "leave one out")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         renames: dict[str, str]) -> SamplingParams:
        """SamplingParams from the set fields; its ValueError becomes a 400 naming
        the request's own field (``renames``: engine name -> request name)."""
        kwargs: dict[str, Any] = {name: getattr(self, name) for name in _SAME_NAME_FIELDS
                                  if getattr(self, name) is not None}
        kwargs.update(max_tokens=max_tokens, logprobs=logprobs, stop=self.stop or (), logit_bias=self.logit_bias,
                      structured_outputs=_structured_outputs(self.response_format, self.structured_outputs))
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:          # "top_p must be in (0, 1], got 2.0": the field comes first
            name, _, rest = str(e).partition(" ")
            param = renames.get(name, name)
            raise InvalidFieldError(param, f"{param} {rest}") from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None           # None: up to the context (capped by --max-output-tokens), as in gRPC
    logprobs: int | None = None             # the sampled token's logprob and this many alternatives
    echo: bool = False                      # the prompt comes first in text (and, with logprobs, in logprobs)
    suffix: str | None = None               # accepted only unset

    @property
    def max_tokens_field(self) -> str | None:
        """The field the client set the output length with, if any."""
        return "max_tokens" if "max_tokens" in self.model_fields_set else None

    def engine_prompts(self) -> list[dict[str, Any]]:
        """One ``AsyncEngine.generate`` input per prompt (text or token ids)."""
        if self.echo and self.stream:
            raise InvalidFieldError("echo", "echo is not supported with stream: true; leave one out")
        if self.suffix is not None:
            raise InvalidFieldError("suffix", "suffix is not supported; leave it out")
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]                          # one prompt of token ids
        else:
            prompts = list(prompt)
        if not prompts:
            raise InvalidFieldError("prompt", "prompt must not be empty: give a string, a list of strings, "
                                              "a list of token ids or a list of such lists")
        inputs = []
        for i, p in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if not p:
                raise InvalidFieldError("prompt", f"{where} must not be empty")
            inputs.append({"prompt": p} if isinstance(p, str) else {"prompt_token_ids": list(p)})
        return inputs

    @property
    def is_echo_only(self) -> bool:
        """echo with max_tokens 0 (how evaluation harnesses score a prompt): the
        engine samples one token, left out of the answer."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self) -> SamplingParams:
        self._check_common()
        params = self._sampling_params(1 if self.is_echo_only else self.max_tokens, self.logprobs, {})
        if self.echo and self.logprobs is not None and params.prompt_logprobs is None:
            params = replace(params, prompt_logprobs=self.logprobs)   # echo's logprobs cover the prompt
        return params


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message; fields a client echoes back from a response (refusal...)
    are ignored rather than refused."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None     # an assistant turn's calls (OpenAI form)
    tool_call_id: str | None = None                    # a "tool" turn: the call it answers


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None           # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None                     # OpenAI function tools (checked by service.tools.specs)
    tool_choice: str | dict[str, Any] | None = None    # none / auto / required / {"type": "function", ...}
    parallel_tool_calls: bool | None = None            # False: tool_choice required makes one call only

    def tool_request(self) -> tuple[tuple[ToolSpec, ...], ToolChoice]:
        """The validated tools and tool choice (400 naming the field when bad)."""
        tools = parse_tools(self.tools)
        return tools, parse_tool_choice(self.tool_choice, tools)

    @property
    def max_tokens_field(self) -> str | None:
        """The field the client set the output length with, if any (max_completion_tokens wins)."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "max_tokens" if self.max_tokens is not None else None

    def engine_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them: role and text content,
        plus an assistant turn's tool calls and a tool turn's call id and name."""
        if not self.messages:
            raise InvalidFieldError("messages", "messages must hold at least one message")
        out = []
        for i, m in enumerate(self.messages):
            if not m.role:
                raise InvalidFieldError("messages", f"messages[{i}].role must not be empty")
            if m.content is None or isinstance(m.content, str):
                text = m.content or ""
            else:
                parts = []
                for j, part in enumerate(m.content):
                    if part.type != "text" or part.text is None:
                        raise InvalidFieldError("messages", f"messages[{i}].content[{j}] has type {part.type!r}; "
                                                            "only text parts are supported")
                    parts.append(part.text)
                text = "".join(parts)
            message: dict[str, Any] = {"role": m.role, "content": text}
            if m.tool_calls:
                message["tool_calls"] = template_tool_calls(m.tool_calls, f"messages[{i}].tool_calls")
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None and m.role == "tool":
                message["name"] = m.name
            out.append(message)
        return out

    def sampling_params(self) -> SamplingParams:
        self._check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidFieldError("top_logprobs", "top_logprobs needs logprobs: true")
        use_completion_tokens = self.max_completion_tokens is not None
        max_tokens = self.max_completion_tokens if use_completion_tokens else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        renames = {"logprobs": "top_logprobs"}
        if use_completion_tokens:
            renames["max_tokens"] = "max_completion_tokens"
        return self._sampling_params(max_tokens, logprobs, renames)


class AbortRequest(_Strict):
    """POST /v1/abort: end in-flight requests by id (the X-Request-Id they were sent with)."""

    request_ids: list[str]
