"""The tools and tool_choice of a chat request: validation, template form, and
the JSON schema that forces a call.

Tools come in OpenAI's form, ``{"type": "function", "function": {"name",
"description", "parameters"}}``; a bad one is refused with an error naming
the field (``tools[1].function.name``). ``tool_choice`` is ``"none"``,
``"auto"``, ``"required"`` or ``{"type": "function", "function": {"name"}}``.

A forced choice (required, or a named function) is enforced through
structured output, as vLLM does: a named function constrains the output to
its arguments (the tool's parameters schema), ``required`` to a JSON array
of ``{"name": ..., "parameters": ...}`` calls to the given tools.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from common.errors import InvalidRequestError
from engine.sampling_params import SamplingParams, StructuredOutputsParams

# What tool_choice may say besides naming a function.
TOOL_CHOICE_MODES = ("none", "auto", "required")
# OpenAI's rule for function names.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# The arguments schema of a tool that declares none: an object of anything.
_ANY_OBJECT = {"type": "object"}


class ToolRequestError(InvalidRequestError):
    """A tool field of the request is invalid; ``param`` names it (HTTP 400 / INVALID_ARGUMENT)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call."""

    name: str                                   # the function's name (letters, digits, _ . -; at most 64)
    description: str | None = None              # what it does, shown to the model by the template
    parameters: dict = field(default_factory=lambda: dict(_ANY_OBJECT), hash=False)  # JSON schema of the arguments

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"name must be 1-64 letters, digits, '_', '.' or '-', got {self.name!r}")
        if self.description is not None and not isinstance(self.description, str):
            raise ValueError("description must be a string")
        if not isinstance(self.parameters, dict):
            raise ValueError("parameters must be a JSON schema object")
        if self.parameters.get("type", "object") != "object":
            raise ValueError(f"parameters must describe an object, got type {self.parameters.get('type')!r}")

    def to_openai(self) -> dict:
        """The OpenAI form, which chat templates take as ``tools``."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """Whether and which tool the model must call."""

    mode: str                                   # "none", "auto", "required" or "function"
    name: str | None = None                     # the function, when mode is "function"

    def __post_init__(self) -> None:
        if self.mode not in (*TOOL_CHOICE_MODES, "function"):
            raise ValueError(f"mode must be one of none, auto, required, function, got {self.mode!r}")
        if (self.mode == "function") != (self.name is not None):
            raise ValueError("name is given exactly when mode is 'function'")

    @property
    def is_forced(self) -> bool:
        """The output is constrained to a call (required, or a named function)."""
        return self.mode in ("required", "function")


def parse_tools(tools: Any, param: str = "tools") -> tuple[ToolSpec, ...]:
    """ToolSpecs from an OpenAI ``tools`` list; ``None`` or ``[]`` gives none."""
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise ToolRequestError(param, f"{param} must be a list of function tools")
    specs: dict[str, ToolSpec] = {}
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolRequestError(where, f"{where} must be {{'type': 'function', 'function': {{...}}}}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ToolRequestError(f"{where}.function", f"{where}.function must be an object with a name")
        unknown = set(function) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise ToolRequestError(f"{where}.function", f"{where}.function has unknown field(s) {sorted(unknown)}")
        parameters = function.get("parameters")
        try:
            spec = ToolSpec(function.get("name"), function.get("description"),
                            dict(_ANY_OBJECT) if parameters is None else parameters)
        except ValueError as e:         # "name must be ...": the field comes first
            name, _, rest = str(e).partition(" ")
            raise ToolRequestError(f"{where}.function.{name}", f"{where}.function.{name} {rest}") from None
        if spec.name in specs:
            raise ToolRequestError(f"{where}.function.name", f"{where}.function.name {spec.name!r} is given twice")
        specs[spec.name] = spec
    return tuple(specs.values())


def parse_tool_choice(value: Any, tools: tuple[ToolSpec, ...], param: str = "tool_choice") -> ToolChoice:
    """The ToolChoice of a request; unset means "auto" with tools, "none" without."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in TOOL_CHOICE_MODES:
            raise ToolRequestError(param, f"{param} must be none, auto, required or a named function, got {value!r}")
        if value == "required" and not tools:
            raise ToolRequestError(param, f"{param} 'required' needs tools")
        return ToolChoice(value if tools else "none")       # auto without tools: nothing to call
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ToolRequestError(param, f"{param} must be none, auto, required or "
                                      "{'type': 'function', 'function': {'name': ...}}")
    if name not in {t.name for t in tools}:
        raise ToolRequestError(f"{param}.function.name",
                               f"{param}.function.name {name!r} is not one of the request's tools")
    return ToolChoice("function", name)


def forced_call_schema(tools: tuple[ToolSpec, ...], choice: ToolChoice, parallel: bool = True) -> dict | None:
    """The JSON schema the output must match under a forced choice; None otherwise.

    Named function: its arguments object. Required: a non-empty array of
    ``{"name": <one tool>, "parameters": <that tool's arguments>}`` (of one
    call only without ``parallel``).
    """
    if choice.mode == "function":
        return next(t.parameters for t in tools if t.name == choice.name)
    if choice.mode != "required":
        return None
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t.name]}, "parameters": t.parameters},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    return schema if parallel else {**schema, "maxItems": 1}


def template_tool_calls(calls: Any, param: str) -> list[dict]:
    """An assistant message's OpenAI ``tool_calls`` in the form chat templates
    expect (transformers' convention): ``function.arguments`` as a dict."""
    if not isinstance(calls, list):
        raise ToolRequestError(param, f"{param} must be a list of tool calls")
    out = []
    for i, call in enumerate(calls):
        where = f"{param}[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolRequestError(where, f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise ToolRequestError(f"{where}.function.arguments",
                                       f"{where}.function.arguments is not valid JSON") from None
        if not isinstance(arguments, dict):
            raise ToolRequestError(f"{where}.function.arguments", f"{where}.function.arguments must be a JSON object")
        entry: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if call.get("id"):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def encode_chat(tokenizer, messages: list[dict], tools: tuple[ToolSpec, ...]) -> list[int]:
    """Token ids of ``messages`` through the chat template, with ``tools`` shown
    to it; what the caller must fix raises InvalidRequestError."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tools=[t.to_openai() for t in tools] or None)
    except (ValueError, TypeError, TemplateError) as e:
        raise InvalidRequestError(f"messages: the chat template failed: {e}") from e


def check_choice_servable(choice: ToolChoice, parser: str | None, param: str = "tool_choice") -> None:
    """'auto' needs a parser to find the calls in free text; forced choices do not."""
    if choice.mode == "auto" and parser is None:
        raise ToolRequestError(param, f"{param} 'auto' (the default with tools) needs the server started with "
                                      "--tool-call-parser; or set tool_choice to required, a named function or none")


def with_forced_call(params: SamplingParams, tools: tuple[ToolSpec, ...], choice: ToolChoice,
                     parallel: bool = True, param: str = "tool_choice") -> SamplingParams:
    """``params`` constrained to a call when the choice forces one (else unchanged)."""
    schema = forced_call_schema(tools, choice, parallel)
    if schema is None:
        return params
    if params.structured_outputs is not None:
        raise ToolRequestError(param, f"{param} {choice.mode!r} forces the output's shape and cannot be combined "
                                      "with response_format or structured_outputs")
    return replace(params, structured_outputs=StructuredOutputsParams(json=schema))
