"""Typed request bodies of the OpenAI-compatible API, and their engine form.

Request models forbid fields they do not know (OpenAI answers those with 400
"Unrecognized request argument"), so a mistyped option never passes
silently. pagedgen's extra sampling options (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``min_tokens``...) are ordinary
fields here: the OpenAI SDK sends them through ``extra_body``, as with vLLM.
Values are checked by ``SamplingParams`` itself, never twice.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

# OpenAI's defaults where they differ from the engine's: a legacy completion
# stops after 16 tokens, a chat completion runs up to the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16
# Request fields that are SamplingParams fields of the same name and meaning.
_SAME_NAME_FIELDS = ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids", "skip_special_tokens",
                     "include_stop_str_in_output")


class InvalidFieldError(InvalidRequestError):
    """A request field holds a value the API cannot serve (400, with ``param``)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


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
    logit_bias: dict[str, float] | None = None      # accepted only empty
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

    def _check_common(self) -> None:
        if self.logit_bias:
            raise InvalidFieldError("logit_bias", "logit_bias is not supported; leave it out")
        if self.stream_options is not None and not self.stream:
            raise InvalidFieldError("stream_options", "stream_options is only allowed with stream: true")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         renames: dict[str, str]) -> SamplingParams:
        """SamplingParams from the set fields; its ValueError becomes a 400 naming
        the request's own field (``renames``: engine name -> request name)."""
        kwargs: dict[str, Any] = {name: getattr(self, name) for name in _SAME_NAME_FIELDS
                                  if getattr(self, name) is not None}
        kwargs.update(max_tokens=max_tokens, logprobs=logprobs, stop=self.stop or ())
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
    max_tokens: int | None = DEFAULT_COMPLETION_MAX_TOKENS
    logprobs: int | None = None             # the sampled token's logprob and this many alternatives
    echo: bool = False                      # accepted only false
    suffix: str | None = None               # accepted only unset

    @property
    def max_tokens_field(self) -> str | None:
        """The field the client set the output length with, if any."""
        return "max_tokens" if "max_tokens" in self.model_fields_set else None

    def engine_prompts(self) -> list[dict[str, Any]]:
        """One ``AsyncEngine.generate`` input per prompt (text or token ids)."""
        if self.echo:
            raise InvalidFieldError("echo", "echo is not supported; leave it out or set it to false")
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

    def sampling_params(self) -> SamplingParams:
        self._check_common()
        return self._sampling_params(self.max_tokens, self.logprobs, {})


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message; fields a client echoes back from a response (tool_calls,
    refusal...) are ignored rather than refused."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None           # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @property
    def max_tokens_field(self) -> str | None:
        """The field the client set the output length with, if any (max_completion_tokens wins)."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "max_tokens" if self.max_tokens is not None else None

    def engine_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: role and text content."""
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
            out.append({"role": m.role, "content": text})
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
