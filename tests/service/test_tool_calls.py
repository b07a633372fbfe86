"""Tool calling end to end: the official ``openai`` client and the gRPC stubs
against a real server on the tiny random Llama, whose tokenizer carries a
Hermes-style chat template that shows tools and renders tool turns.

The random model never writes a call by itself, so these tests force one
(tool_choice required or a named function, enforced by structured output)
and check that every output, at temperature 1.0 over several seeds, parses
into a call of that tool whose arguments validate against its schema.
"""

from __future__ import annotations

import json

import grpc
import openai
import pytest

from engine.tokenizer import Tokenizer
from pagedgen_client import PagedgenClientError
from service.server import ServerOptions
from tests.service.conftest import serving

pytestmark = pytest.mark.timeout(180)
jsonschema = pytest.importorskip("jsonschema")

# A Hermes / Qwen style template (written for these tests): tools in the system
# turn, calls as <tool_call>{json}</tool_call>, tool answers in their own turn.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Answer a call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>tool\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                   "unit": {"enum": ["c", "f"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
               "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                           "parameters": TIME_PARAMS}}]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
SEEDS = range(6)
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def tools_model_dir(tmp_path_factory):
    from tests.factories import make_tiny_hf_model
    from transformers import AutoTokenizer

    path = make_tiny_hf_model(tmp_path_factory.mktemp("tiny-tools"), arch="llama",
                              max_position_embeddings=2048)   # room for the tools in the prompt
    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    hf.chat_template = HERMES_TEMPLATE
    hf.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def server(tools_model_dir):
    with serving(tools_model_dir, ServerOptions(port=0, openai_port=0, tool_call_parser="hermes")) as server:
        server.tokenizer = Tokenizer.from_dir(tools_model_dir)
        yield server


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.openai_port}/v1", api_key="none",
                       max_retries=0, timeout=60) as c:
        yield c


def _check_call(name: str, arguments: str) -> None:
    """A call of a known tool whose arguments validate against its schema."""
    assert name in SCHEMAS, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _chat(client, **kwargs):
    """A forced call at temperature 1.0; the random model may chain many calls under required."""
    return client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0,
                                          **{"max_tokens": 800, **kwargs})


# -- the template -------------------------------------------------------------------

def test_template_gets_tools_and_tool_turns(server):
    messages = [*ASK, {"role": "assistant", "content": "",
                       "tool_calls": [{"type": "function", "id": "call_1",
                                       "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = server.tokenizer.render_chat(messages, tools=TOOLS)
    assert json.dumps(TOOLS[0]) in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<tool_response>sunny</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    assert "functions" not in server.tokenizer.render_chat(ASK)        # no tools: none shown


# -- OpenAI HTTP --------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_named_function_is_always_a_valid_call(client, seed):
    resp = _chat(client, tool_choice=NAMED, seed=seed)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    _check_call(call.function.name, call.function.arguments)


@pytest.mark.parametrize("seed", SEEDS)
def test_required_is_always_valid_calls_of_the_given_tools(client, seed):
    choice = _chat(client, tool_choice="required", seed=seed).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call.function.name, call.function.arguments)
    assert len({call.id for call in choice.message.tool_calls}) == len(choice.message.tool_calls)


@pytest.mark.parametrize("seed", SEEDS)
def test_required_without_parallel_calls_is_one_call(client, seed):
    choice = _chat(client, tool_choice="required", seed=seed, parallel_tool_calls=False, max_tokens=120).choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0].function.name, choice.message.tool_calls[0].function.arguments)


@pytest.mark.parametrize("tool_choice", [NAMED, "required"])
def test_streamed_calls_assemble_into_the_same_valid_calls(client, tool_choice):
    whole = _chat(client, tool_choice=tool_choice, seed=3).choices[0].message.tool_calls
    calls, finish = {}, None
    for chunk in _chat(client, tool_choice=tool_choice, seed=3, stream=True):
        for choice in chunk.choices:
            assert not choice.delta.content
            for d in choice.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                assert d.id is None or d.id == entry["id"]
                entry["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole]


def test_a_conversation_with_tool_turns_is_rendered_with_its_tools(client, server):
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "unit": "c"}'}}]
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1", "content": "-3 and snow"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                          max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    expected = server.tokenizer.apply_chat_template(
        [*ASK, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "-3 and snow"}], tools=TOOLS)
    assert resp.usage.prompt_tokens == len(expected)
    assert resp.choices[0].finish_reason == "length" and resp.choices[0].message.tool_calls == []


def test_auto_parses_a_call_the_model_writes(client):
    """auto with the hermes parser: the output (held to a call by a regex
    constraint) comes back as a call, not as text."""
    regex = r'Checking\.\n<tool_call>\{"name": "get_time", "arguments": \{"zone": "(utc|cet)"\}\}</tool_call>'
    try:
        resp = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, seed=0,
                                              extra_body={"structured_outputs": {"regex": regex}})
    except openai.BadRequestError as e:
        if e.body.get("param") == "structured_outputs":
            pytest.skip("the HTTP API has no structured_outputs yet")
        raise
    choice = resp.choices[0]
    assert choice.message.content == "Checking.\n" and choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time"
    _check_call(call.function.name, call.function.arguments)
    # streamed: the text before the call as content (never a piece of the marker), then the call
    content, deltas, finish = "", [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, seed=0,
                                                stream=True, extra_body={"structured_outputs": {"regex": regex}}):
        for c in chunk.choices:
            content += c.delta.content or ""
            assert "<" not in (c.delta.content or "")
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert content == "Checking.\n" and finish == "tool_calls"
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == \
        [(0, "get_time", call.function.arguments)]


@pytest.mark.parametrize("kwargs, param", [
    (dict(tool_choice={"type": "function", "function": {"name": "launch"}}), "tool_choice.function.name"),
    (dict(tool_choice="always"), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
     "tools[0].function.parameters"),
    (dict(tools=[{"type": "code_interpreter"}]), "tools[0]"),
    (dict(tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
    (dict(messages=[{"role": "assistant", "content": None,
                     "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]),
     "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_tools_are_400_naming_the_field(client, kwargs, param):
    body = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{**body, **kwargs})
    assert info.value.body["param"] == param and param in info.value.body["message"]
    assert _chat(client, tool_choice=NAMED, seed=0).choices[0].message.tool_calls      # still serving


def test_auto_without_a_parser_is_400(tools_model_dir):
    with serving(tools_model_dir, ServerOptions(port=0, openai_port=0), grace=1.0) as bare, \
            openai.OpenAI(base_url=f"{bare.http_url}/v1", api_key="none", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=4)
        assert info.value.body["param"] == "tool_choice" and "--tool-call-parser" in info.value.body["message"]
        resp = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=120)
        _check_call(resp.choices[0].message.tool_calls[0].function.name,
                    resp.choices[0].message.tool_calls[0].function.arguments)


# -- gRPC -----------------------------------------------------------------------------

@pytest.mark.parametrize("tool_choice", [{"name": "get_time"}, "required"])
def test_grpc_forced_calls_are_valid(server, tool_choice):
    with server.client() as c:
        for seed in SEEDS:
            chunks = list(c.generate(messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=800,
                                     temperature=1.0, seed=seed))
            calls = [call for chunk in chunks for call in chunk.tool_calls]
            assert chunks[-1].finish_reason == "tool_calls" and calls
            assert "".join(chunk.text for chunk in chunks) == ""
            for call in calls:
                assert call.id.startswith("call_")
                _check_call(call.name, call.arguments)
            if tool_choice != "required":
                assert [call.name for call in calls] == ["get_time"]


def test_grpc_auto_parses_a_call_the_model_writes(server):
    regex = r'Checking\.\n<tool_call>\{"name": "get_time", "arguments": \{"zone": "(utc|cet)"\}\}</tool_call>'
    with server.client() as c:
        try:
            chunks = list(c.generate(messages=ASK, tools=TOOLS, max_tokens=120, seed=1, regex=regex))
        except TypeError:
            pytest.skip("the gRPC API has no regex constraint yet")
    assert "".join(chunk.text for chunk in chunks) == "Checking.\n"
    assert all("<" not in chunk.text for chunk in chunks)
    (call,) = [call for chunk in chunks for call in chunk.tool_calls]
    assert call.name == "get_time" and chunks[-1].finish_reason == "tool_calls"
    _check_call(call.name, call.arguments)


def test_grpc_tool_turns_and_bad_tools(server):
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "utc"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "name": "get_time", "content": "12:00"}]
    with server.client() as c:
        chunks = list(c.generate(messages=messages, tools=TOOLS, tool_choice="none", max_tokens=3,
                                 ignore_eos=True, temperature=0))
        expected = server.tokenizer.apply_chat_template(
            [*ASK, {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "utc"}}}]},
             {"role": "tool", "tool_call_id": "call_1", "name": "get_time", "content": "12:00"}], tools=TOOLS)
        assert chunks[-1].usage.prompt_tokens == len(expected) and chunks[-1].finish_reason == "length"
        for kwargs, says in [(dict(tool_choice={"name": "launch"}), "tool_choice.function_name"),
                             (dict(tools=[{"name": "x y"}]), "tools[0].function.name"),
                             (dict(tools=[{"name": "f", "parameters": "{oops"}]), "tools[0].parameters")]:
            with pytest.raises(PagedgenClientError) as info:
                list(c.generate(messages=ASK, **{"tools": TOOLS, **kwargs}, max_tokens=4))
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and says in info.value.message, kwargs
        with pytest.raises(PagedgenClientError, match="tools need chat input"):
            list(c.generate("plain prompt", tools=TOOLS, tool_choice="required", max_tokens=4))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_default_model_named_and_required_calls_validate_over_20_seeds():
    """SmolLM2's template ignores tools; a forced choice still yields valid calls
    (20 seeds each, sent at once so that the engine batches them)."""
    from concurrent.futures import ThreadPoolExecutor

    with serving(None, ServerOptions(port=0, openai_port=0, tool_call_parser="hermes"), grace=1.0) as default:
        engine = default.engine
        with openai.OpenAI(base_url=f"{default.http_url}/v1", api_key="none", max_retries=0, timeout=300) as c:
            def ask(job):
                seed, tool_choice = job
                return c.chat.completions.create(
                    model=engine.model_info.model, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                    temperature=1.0, seed=seed, max_tokens=100, parallel_tool_calls=False).choices[0]

            jobs = [(seed, choice) for seed in range(20) for choice in (NAMED, "required")]
            with ThreadPoolExecutor(len(jobs)) as pool:
                for job, choice in zip(jobs, pool.map(ask, jobs)):
                    assert choice.finish_reason == "tool_calls", job
                    (call,) = choice.message.tool_calls
                    _check_call(call.function.name, call.function.arguments)
