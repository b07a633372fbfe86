"""Tool-call parsing and tool specs on fixed strings: whole, and streamed in every split."""

from __future__ import annotations

import json

import pytest

from service.tools import parsers as tp
from service.tools import specs

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _parse(parser: str, text: str):
    return tp.parse_tool_calls(tp.TOOL_CALL_PARSERS[parser](), text)


def _streamed(stream: tp.ToolCallStream, pieces: list[str]) -> tuple[str, list[tp.ToolCall], list[str]]:
    """Feed ``pieces`` one by one; the content, the calls and the content given per feed."""
    out, contents = tp.ParsedDelta(), []
    for piece in pieces:
        d = stream.feed(piece)
        contents.append(d.content)
        out.extend(d)
    out.extend(stream.finish())
    return out.content, tp.merge_tool_call_deltas(out.tool_calls), contents


def _every_split(text: str):
    """The text in one-character pieces and in every two-piece split."""
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


# -- hermes ------------------------------------------------------------------------

HERMES_ONE = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HERMES_TWO = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>\n'
              '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')


def test_hermes_one_call_after_content():
    content, calls = _parse("hermes", HERMES_ONE)
    assert content == "Let me look.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and len(calls[0].id) > 10


def test_hermes_two_calls_drop_the_whitespace_between_them():
    content, calls = _parse("hermes", HERMES_TWO)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo", "days": 2}),
                                                                  ("get_time", {})]
    assert len({c.id for c in calls}) == 2


def test_hermes_plain_text_is_content():
    text = "No tools needed: 2 < 3 and <tool is not a tag."
    assert _parse("hermes", text) == (text, [])


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}',        # EOS before the end tag
    '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>',  # args as text
    '<tool_call>{"name": "get_weather", "parameters": {"city": "Rome"}}</tool_call>',
])
def test_hermes_accepts_the_variants_models_write(text):
    content, calls = _parse("hermes", text)
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Rome"})]


@pytest.mark.parametrize("text", [
    "<tool_call>not json</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',                 # no name
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',   # arguments not an object
    "<tool_call>{\"name\": \"f\", \"argu",                      # cut off (max_tokens)
])
def test_hermes_unparsable_call_comes_back_as_content(text):
    assert _parse("hermes", text) == (text, [])


@pytest.mark.parametrize("text", [HERMES_ONE, HERMES_TWO, "a <tool_ca b <tool_call", "plain"])
def test_hermes_streamed_in_any_split_equals_whole(text):
    whole = _parse("hermes", text)
    for pieces in _every_split(text):
        content, calls, _ = _streamed(tp.HermesToolStream(), pieces)
        assert (content, [(c.name, c.arguments) for c in calls]) == (whole[0], [(c.name, c.arguments)
                                                                                for c in whole[1]]), pieces


def test_hermes_streams_content_at_once_and_holds_back_only_a_possible_marker():
    _, _, contents = _streamed(tp.HermesToolStream(), ["Hello wor", "ld <tool", "_call>{\"name\": \"f\"",
                                                       ", \"arguments\": {}}</tool_call>"])
    assert contents == ["Hello wor", "ld ", "", ""]
    stream = tp.HermesToolStream()
    assert stream.feed("x <tool_").content == "x "
    assert stream.feed("box>").content == "<tool_box>"      # it was not a marker after all


# -- llama3_json -------------------------------------------------------------------

def test_llama3_json_one_call():
    content, calls = _parse("llama3_json", '{"name": "get_weather", "parameters": {"city": "Lima"}}')
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Lima"})]


def test_llama3_json_python_tag_and_several_calls():
    text = '<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "A"}}'
    content, calls = _parse("llama3_json", text)
    assert content == "" and [c.name for c in calls] == ["get_time", "get_weather"]


@pytest.mark.parametrize("text", ["The weather is fine.", '{"not": "a call"}', '{"name": "f", "parameters": {',
                                  "  <|python", "<x> hello"])
def test_llama3_json_text_that_is_no_call_is_content(text):
    assert _parse("llama3_json", text) == (text, [])


@pytest.mark.parametrize("text", ['{"name": "get_weather", "parameters": {"city": "Lima"}}',
                                  '<|python_tag|>{"name": "a", "parameters": {}};{"name": "b", "parameters": {}}',
                                  "Just words {not json}", ' {"name": "a", "parameters": {"x": "}"}}'])
def test_llama3_json_streamed_in_any_split_equals_whole(text):
    whole = _parse("llama3_json", text)
    for pieces in _every_split(text):
        content, calls, _ = _streamed(tp.Llama3JsonToolStream(), pieces)
        assert (content, [(c.name, c.arguments) for c in calls]) == (whole[0], [(c.name, c.arguments)
                                                                                for c in whole[1]]), pieces


def test_llama3_json_streams_plain_text_once_it_cannot_be_a_call():
    _, _, contents = _streamed(tp.Llama3JsonToolStream(), ["  ", "Sunny", " today"])
    assert contents == ["", "  Sunny", " today"]


# -- forced choices ------------------------------------------------------------------

def test_named_stream_sends_the_id_and_name_once_then_arguments():
    stream = tp.NamedToolStream("get_weather")
    first, second = stream.feed('{"city": '), stream.feed('"Bern"}')
    assert first.tool_calls[0].name == "get_weather" and first.tool_calls[0].id.startswith("call_")
    assert second.tool_calls == [tp.ToolCallDelta(0, None, None, '"Bern"}')]
    calls = tp.merge_tool_call_deltas(first.tool_calls + second.tool_calls)
    assert len(calls) == 1 and json.loads(calls[0].arguments) == {"city": "Bern"}


def test_required_stream_emits_each_call_when_its_object_closes():
    text = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Q"}}]'
    stream = tp.RequiredToolStream()
    cut = text.index("},") + 2
    assert [d.name for d in stream.feed(text[:cut]).tool_calls] == ["get_time"]
    assert [d.name for d in stream.feed(text[cut:]).tool_calls] == ["get_weather"]
    assert stream.finish() == tp.ParsedDelta()
    for pieces in _every_split(text):
        _, calls, _ = _streamed(tp.RequiredToolStream(), pieces)
        assert [c.name for c in calls] == ["get_time", "get_weather"]


def test_tool_call_stream_for_each_choice():
    assert tp.tool_call_stream("none", None, "hermes") is None
    assert tp.tool_call_stream("auto", None, None) is None
    assert isinstance(tp.tool_call_stream("auto", None, "llama3_json"), tp.Llama3JsonToolStream)
    assert isinstance(tp.tool_call_stream("required", None, None), tp.RequiredToolStream)
    assert tp.tool_call_stream("function", "f", None).name == "f"


# -- specs ---------------------------------------------------------------------------

def test_parse_tools_and_choice():
    tools = specs.parse_tools([WEATHER, TIME])
    assert [t.name for t in tools] == ["get_weather", "get_time"]
    assert tools[0].to_openai() == WEATHER
    assert specs.parse_tool_choice(None, tools) == specs.ToolChoice("auto")
    assert specs.parse_tool_choice(None, ()) == specs.ToolChoice("none")
    assert specs.parse_tool_choice("auto", ()) == specs.ToolChoice("none")      # no tools: nothing to parse
    specs.check_choice_servable(specs.parse_tool_choice("auto", ()), None)    # so no parser is needed
    with pytest.raises(specs.ToolRequestError, match="--tool-call-parser"):
        specs.check_choice_servable(specs.parse_tool_choice("auto", tools), None)
    named = specs.parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools)
    assert named == specs.ToolChoice("function", "get_time") and named.is_forced


@pytest.mark.parametrize("tools, param", [
    ({"type": "function"}, "tools"),
    ([{"type": "retrieval"}], "tools[0]"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "params": {}}}], "tools[0].function"),
    ([TIME, TIME], "tools[1].function.name"),
])
def test_invalid_tools_name_the_field(tools, param):
    with pytest.raises(specs.ToolRequestError) as info:
        specs.parse_tools(tools)
    assert info.value.param == param and str(info.value).startswith(param)


@pytest.mark.parametrize("choice, param", [
    ("sometimes", "tool_choice"),
    ({"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    ({"type": "function"}, "tool_choice"),
])
def test_invalid_tool_choice_names_the_field(choice, param):
    with pytest.raises(specs.ToolRequestError) as info:
        specs.parse_tool_choice(choice, specs.parse_tools([WEATHER]))
    assert info.value.param == param


def test_required_without_tools_is_refused():
    with pytest.raises(specs.ToolRequestError, match="needs tools"):
        specs.parse_tool_choice("required", ())


def test_forced_call_schemas_accept_exactly_valid_calls():
    jsonschema = pytest.importorskip("jsonschema")
    tools = specs.parse_tools([WEATHER, TIME])
    named = specs.forced_call_schema(tools, specs.ToolChoice("function", "get_weather"))
    assert named == WEATHER["function"]["parameters"]
    required = specs.forced_call_schema(tools, specs.ToolChoice("required"))
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "X"}}, {"name": "get_time", "parameters": {}}],
                        required)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    assert specs.forced_call_schema(tools, specs.ToolChoice("auto")) is None


def test_template_tool_calls_turn_arguments_into_dicts():
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    assert specs.template_tool_calls(calls, "messages[1].tool_calls") == [
        {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}, "id": "call_1"}]
    with pytest.raises(specs.ToolRequestError) as info:
        specs.template_tool_calls([{"function": {"name": "f", "arguments": "{oops"}}], "messages[1].tool_calls")
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"
