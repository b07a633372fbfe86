"""Builds the wire requests from the client's Python arguments."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ._proto.pagedgen.v1 import generate_pb2 as pb

# The sampling keyword arguments ``generate`` accepts (SamplingParams fields).
SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)
_REPEATED = frozenset({"stop", "stop_token_ids"})


def sampling_params_pb(sampling: Mapping[str, Any]) -> pb.SamplingParams:
    """A SamplingParams message; ``None`` values stay unset (engine default)."""
    unknown = set(sampling) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
    msg = pb.SamplingParams()
    for name, value in sampling.items():
        if value is None:
            continue
        if name in _REPEATED:
            getattr(msg, name).extend([value] if isinstance(value, str) else list(value))
        else:
            setattr(msg, name, value)
    return msg


def chat_pb(messages: Iterable[Mapping[str, str]]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


def generate_request(
    prompt: str | None,
    *,
    messages: Iterable[Mapping[str, str]] | None,
    prompt_token_ids: Iterable[int] | None,
    request_id: str | None,
    cache_salt: str | None,
    return_token_ids: bool,
    sampling: Mapping[str, Any],
    return_timing: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one of prompt / messages / prompt_token_ids."""
    given = [x is not None for x in (prompt, messages, prompt_token_ids)]
    if sum(given) != 1:
        raise TypeError("pass exactly one of prompt, messages, prompt_token_ids")
    msg = pb.GenerateRequest(
        request_id=request_id or "",
        sampling=sampling_params_pb(sampling),
        return_token_ids=return_token_ids,
    )
    if prompt is not None:
        msg.prompt = prompt
    elif messages is not None:
        msg.chat.CopyFrom(chat_pb(messages))
    else:
        msg.prompt_token_ids.ids.extend(prompt_token_ids)
    if cache_salt is not None:
        msg.cache_salt = cache_salt
    if return_timing:
        msg.return_timing = True
    return msg


def tokenize_request(text: str | None, messages: Iterable[Mapping[str, str]] | None) -> pb.TokenizeRequest:
    if (text is None) == (messages is None):
        raise TypeError("pass exactly one of text, messages")
    if text is not None:
        return pb.TokenizeRequest(text=text)
    return pb.TokenizeRequest(chat=chat_pb(messages))


def detokenize_request(token_ids: Iterable[int], skip_special_tokens: bool | None) -> pb.DetokenizeRequest:
    msg = pb.DetokenizeRequest(token_ids=list(token_ids))
    if skip_special_tokens is not None:
        msg.skip_special_tokens = skip_special_tokens
    return msg
