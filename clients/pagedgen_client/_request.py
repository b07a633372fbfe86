"""Builds the wire requests from the client's Python arguments."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ._proto.pagedgen.v1 import generate_pb2 as pb

# The sampling keyword arguments ``generate`` accepts (SamplingParams fields).
SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)
# Keyword arguments of ``generate`` that are GenerateRequest fields, set when not None.
REQUEST_OPTIONS = ("priority", "time_limit_ms", "truncate_prompt_tokens")
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
        elif name == "logit_bias":                  # {token id: bias}; ids may be strings, as in OpenAI's API
            msg.logit_bias.update({int(k): float(v) for k, v in value.items()})
        elif name == "choice":                      # the strings a choice constraint allows
            msg.choice.choices.extend(value)
        elif name == "json_schema" and not isinstance(value, str):
            msg.json_schema = json.dumps(value)     # a schema given as a dict
        else:
            setattr(msg, name, value)
    return msg


def chat_message_pb(m: Mapping[str, Any]) -> pb.ChatMessage:
    """One turn from an OpenAI-style dict: role, content, and the tool fields
    (``tool_calls`` as OpenAI returns them, ``tool_call_id``, ``name``)."""
    msg = pb.ChatMessage(role=m["role"], content=m.get("content") or "")
    for call in m.get("tool_calls") or ():
        function = call.get("function", call)       # OpenAI's nesting, or a flat {"id", "name", "arguments"}
        arguments = function.get("arguments", "{}")
        msg.tool_calls.append(pb.ToolCall(id=call.get("id", ""), name=function["name"],
                                          arguments=arguments if isinstance(arguments, str) else json.dumps(arguments)))
    for name in ("tool_call_id", "name"):
        if m.get(name) is not None:
            setattr(msg, name, m[name])
    return msg


def chat_pb(messages: Iterable[Mapping[str, Any]]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[chat_message_pb(m) for m in messages])


def tools_pb(tools: Iterable[Mapping[str, Any]]) -> list[pb.Tool]:
    """Tool messages from OpenAI function tools (``{"type": "function", "function": {...}}``)
    or from their ``function`` parts."""
    out = []
    for tool in tools:
        function = tool.get("function", tool)
        msg = pb.Tool(name=function["name"])
        if function.get("description") is not None:
            msg.description = function["description"]
        if function.get("parameters") is not None:
            parameters = function["parameters"]
            msg.parameters = parameters if isinstance(parameters, str) else json.dumps(parameters)
        out.append(msg)
    return out


def tool_choice_pb(choice: str | Mapping[str, Any]) -> pb.ToolChoice:
    """"none" / "auto" / "required", a function's name as {"name": ...}, or OpenAI's
    {"type": "function", "function": {"name": ...}}."""
    if isinstance(choice, str):
        return pb.ToolChoice(mode=choice)
    return pb.ToolChoice(function_name=choice.get("function", choice)["name"])


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
    tools: Iterable[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one of prompt / messages / prompt_token_ids."""
    given = [x is not None for x in (prompt, messages, prompt_token_ids)]
    if sum(given) != 1:
        raise TypeError("pass exactly one of prompt, messages, prompt_token_ids")
    sampling = dict(sampling)
    options = {name: sampling.pop(name) for name in REQUEST_OPTIONS if name in sampling}
    msg = pb.GenerateRequest(
        request_id=request_id or "",
        sampling=sampling_params_pb(sampling),
        return_token_ids=return_token_ids,
    )
    for name, value in options.items():
        if value is not None:
            setattr(msg, name, value)
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
    if tools is not None:
        msg.tools.extend(tools_pb(tools))
    if tool_choice is not None:
        msg.tool_choice.CopyFrom(tool_choice_pb(tool_choice))
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
