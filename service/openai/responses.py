"""Typed response bodies of the OpenAI-compatible API (what the OpenAI SDK parses).

Field names and nesting follow OpenAI's API reference; ``stop_reason`` (the
matched stop string or token id) is a vLLM extra that OpenAI clients ignore.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

# JSON has no -inf; a token the sampler masked out reports this instead (as vLLM does).
MIN_LOGPROB = -9999.0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0          # prompt tokens served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


# -- /v1/completions ---------------------------------------------------------

class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []         # None: an echoed prompt's first token (nothing predicts it)
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []     # character offset of each token in the choice's text


# vLLM's prompt_logprobs: per prompt token, None for the first, else token id (as text) ->
# {"logprob", "rank", "decoded_token"} for the prompt token and the top alternatives.
PromptLogprobs = list[dict[str, dict[str, Any]] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None   # with the request's prompt_logprobs (vLLM's extra)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- /v1/chat/completions ----------------------------------------------------

class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = []


class FunctionCall(BaseModel):
    name: str
    arguments: str                  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None             # None when the turn only calls tools
    tool_calls: list[ToolCall] = []


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None   # with the request's prompt_logprobs (vLLM's extra)
    system_fingerprint: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]           # {"role": "assistant", "content": ""} first, then {"content": ...} or
                                    # {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}, {} last
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- /v1/models and errors ---------------------------------------------------

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagedgen"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
