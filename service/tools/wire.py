"""The tool fields of the gRPC messages, to and from ``specs`` and ``parsers`` types.

Read errors name the proto field (``tools[0].parameters``,
``chat.messages[2].tool_calls[0].arguments``), as the rest of
``service.convert`` does.
"""

from __future__ import annotations

import json
from typing import Any

from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from service.tools.parsers import ToolCall
from service.tools.specs import ToolChoice, ToolRequestError, ToolSpec, parse_tool_choice, parse_tools, \
    template_tool_calls


def tools_from_pb(msg: pb.GenerateRequest) -> tuple[tuple[ToolSpec, ...], ToolChoice]:
    """The request's tools and tool choice, validated."""
    tools = []
    for i, tool in enumerate(msg.tools):
        function: dict[str, Any] = {"name": tool.name}
        if tool.HasField("description"):
            function["description"] = tool.description
        if tool.HasField("parameters"):
            try:
                function["parameters"] = json.loads(tool.parameters)
            except ValueError as e:
                raise ToolRequestError(f"tools[{i}].parameters",
                                       f"tools[{i}].parameters is not valid JSON: {e}") from None
        tools.append({"type": "function", "function": function})
    specs = parse_tools(tools)
    kind = msg.tool_choice.WhichOneof("choice") if msg.HasField("tool_choice") else None
    value: Any = None
    if kind == "mode":
        value = msg.tool_choice.mode
    elif kind == "function_name":
        value = {"type": "function", "function": {"name": msg.tool_choice.function_name}}
    try:
        return specs, parse_tool_choice(value, specs)
    except ToolRequestError as e:               # name the proto's field, not OpenAI's path
        param = "tool_choice.function_name" if kind == "function_name" else "tool_choice.mode"
        raise ToolRequestError(param, f"{param}: {e}") from None


def message_tool_fields(m: pb.ChatMessage, where: str) -> dict[str, Any]:
    """A chat turn's tool fields in the form chat templates take."""
    out: dict[str, Any] = {}
    if m.tool_calls:
        out["tool_calls"] = template_tool_calls(
            [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}}
             for c in m.tool_calls], f"{where}.tool_calls")
    if m.HasField("tool_call_id"):
        out["tool_call_id"] = m.tool_call_id
    if m.HasField("name"):
        out["name"] = m.name
    return out


def tool_calls_to_pb(calls: list[ToolCall]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]
