"""``POST /tokenize`` and ``POST /detokenize``, shaped as vLLM's OpenAI server shapes them.

``/tokenize`` takes a ``prompt`` (text) or chat ``messages`` (rendered with the
model's chat template, as ``/v1/chat/completions`` renders them) and answers
``{"count", "max_model_len", "tokens", "token_strs"}``; ``/detokenize`` takes
``tokens`` and answers ``{"prompt"}``. Both run on the engine's tokenizer
thread, as the gRPC Tokenize and Detokenize do.
"""

from __future__ import annotations

import functools

from pydantic import BaseModel, ConfigDict

from service.openai.protocol import ChatCompletionRequest, ChatMessage, InvalidFieldError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizeCompletionRequest(_Strict):
    """Text to tokenize as a completion prompt is."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True         # the model's BOS policy, as a completion prompt gets it
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    """Chat messages to tokenize as a chat completion's prompt is."""

    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True      # end with the prompt for the assistant's turn
    add_special_tokens: bool = False        # the template writes the special tokens itself
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int                              # len(tokens)
    max_model_len: int                      # prompt plus output tokens of one request at most
    tokens: list[int]
    token_strs: list[str] | None = None     # each token's text, with return_token_strs


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


async def tokenize(engine, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
    """The token ids of ``body``'s prompt or messages (InvalidFieldError for messages the template refuses)."""
    tokenizer = engine.tokenizer
    if isinstance(body, TokenizeChatRequest):
        messages = ChatCompletionRequest(messages=body.messages).engine_messages()
        try:
            text = await engine.run_tokenizer(tokenizer.render_chat, messages, body.add_generation_prompt)
        except (ValueError, TypeError) as e:
            raise InvalidFieldError("messages", str(e)) from None
    else:
        text = body.prompt
    ids = await engine.run_tokenizer(functools.partial(tokenizer.encode, add_special_tokens=body.add_special_tokens),
                                     text)
    strs = await engine.run_tokenizer(tokenizer.convert_ids_to_tokens, ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.model_info.max_model_len, tokens=ids,
                            token_strs=strs)


async def detokenize(engine, body: DetokenizeRequest) -> DetokenizeResponse:
    """The text of ``body.tokens`` (special tokens kept, as vLLM's /detokenize keeps them)."""
    vocab = engine.model_info.vocab_size
    bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidFieldError("tokens", f"tokens[{bad}] = {body.tokens[bad]} is outside the vocabulary [0, {vocab})")
    text = await engine.run_tokenizer(functools.partial(engine.tokenizer.decode, skip_special_tokens=False),
                                      body.tokens)
    return DetokenizeResponse(prompt=text)
