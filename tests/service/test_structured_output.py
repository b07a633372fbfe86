"""Structured output and logit_bias through the real server: gRPC from the generated stubs and the official
``openai`` client, with the same meaning as the offline API (tests/engine/test_structured_output.py)."""

from __future__ import annotations

import json
import re

import grpc
import openai
import pytest

from engine import LLM, SamplingParams
from engine.sampling_params import StructuredOutputsParams
from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from pagedgen_client._proto.pagedgen.v1 import generate_pb2_grpc as pb_grpc
from service.server import ServerOptions
from tests.service.conftest import serving

pytestmark = pytest.mark.timeout(180)

PROMPT = "The cat watches the answer"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}
REGEX = r"[a-c]{3}-[0-9]{2}"
GRAMMAR = 'root ::= "<" ("x" | "y")+ ">"'
CHOICES = ["red", "green", "blue sky"]


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    with serving(tiny_model_dir, ServerOptions(port=0, openai_port=0)) as server, \
            grpc.insecure_channel(server.address) as channel, \
            openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="none", max_retries=0, timeout=60) as server.oa:
        server.stub = pb_grpc.GenerateStub(channel)
        yield server


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    return LLM(tiny_model_dir, num_kv_blocks=256, block_size=16, seed=0)


def _grpc(srv, **sampling) -> tuple[str, list[int], int]:
    """Text, token ids and finish reason of one streamed gRPC generation (seeded, temperature 1)."""
    sampling = {"temperature": 1.0, "seed": 0, "max_tokens": 40, **sampling}
    request = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(**sampling))
    chunks = list(srv.stub.Generate(request, timeout=60))
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason


CASES = [  # (gRPC constraint, offline constraint, check of the text)
    (dict(json_schema=json.dumps(SCHEMA)), StructuredOutputsParams(json=SCHEMA),
     lambda t: set(json.loads(t)) == {"ok", "n"}),
    (dict(regex=REGEX), StructuredOutputsParams(regex=REGEX), lambda t: re.fullmatch(REGEX, t)),
    (dict(choice=pb.ChoiceConstraint(choices=CHOICES)), StructuredOutputsParams(choice=CHOICES),
     lambda t: t in CHOICES),
    (dict(grammar=GRAMMAR), StructuredOutputsParams(grammar=GRAMMAR), lambda t: re.fullmatch(r"<[xy]+>", t)),
]


@pytest.mark.parametrize("grpc_field,params,check", CASES, ids=["json_schema", "regex", "choice", "grammar"])
def test_grpc_constraints_match_the_offline_api(srv, offline, grpc_field, params, check):
    for seed in (0, 1):
        text, ids, finish = _grpc(srv, seed=seed, **grpc_field)
        want = offline.generate([PROMPT], SamplingParams(temperature=1.0, seed=seed, max_tokens=40,
                                                         structured_outputs=params))[0].outputs[0]
        assert finish == pb.FINISH_REASON_STOP and check(text), text
        assert (text, ids) == (want.text, list(want.token_ids)) and want.finish_reason == "stop"


def test_grpc_json_object_and_logit_bias(srv, offline):
    text, _, finish = _grpc(srv, json_object=True, max_tokens=120, temperature=0.0,
                            logit_bias={t: -100.0 for t in range(100, 110)})
    if finish == pb.FINISH_REASON_STOP:
        assert isinstance(json.loads(text), dict)
    else:                                             # the random model may run the object past max_tokens
        assert finish == pb.FINISH_REASON_LENGTH and text.startswith("{")
    _, ids, _ = _grpc(srv, logit_bias={77: 100.0}, max_tokens=5, ignore_eos=True)
    assert ids == [77] * 5
    free = _grpc(srv, temperature=0.0, max_tokens=3, ignore_eos=True)[1]
    banned = _grpc(srv, temperature=0.0, max_tokens=3, ignore_eos=True, logit_bias={free[0]: -100.0})[1]
    want = offline.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                                     logit_bias={free[0]: -100.0}))[0].outputs[0]
    assert banned[0] != free[0] and banned == list(want.token_ids)


@pytest.mark.parametrize("sampling,field", [
    (dict(json_schema='{"type": "nope"}'), "json"),
    (dict(json_schema="{not json"), "json"),
    (dict(regex="a(b"), "regex"),
    (dict(grammar="root ::= missing"), "grammar"),
    (dict(choice=pb.ChoiceConstraint()), "choice"),
    (dict(logit_bias={5: 150.0}), "logit_bias"),
    (dict(logit_bias={10_000_000: 1.0}), "logit_bias"),
])
def test_grpc_bad_constraints_are_invalid_argument_and_the_server_keeps_serving(srv, sampling, field):
    with pytest.raises(grpc.RpcError) as info:
        _grpc(srv, **sampling)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in info.value.details()
    assert _grpc(srv, max_tokens=2)[1]


# -- OpenAI HTTP ------------------------------------------------------------------------

def _chat(srv, **kwargs):
    kwargs = {"temperature": 1.0, "seed": 0, "max_tokens": 40, **kwargs}
    return srv.oa.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": PROMPT}],
                                          **kwargs).choices[0]


def test_openai_response_format_json_schema_and_json_object(srv):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for seed in (0, 1, 2):
        choice = _chat(srv, response_format=fmt, seed=seed)
        assert choice.finish_reason == "stop" and set(json.loads(choice.message.content)) == {"ok", "n"}
    done = srv.oa.completions.create(model="tiny-llama", prompt=PROMPT, temperature=0.0, max_tokens=120,
                                     extra_body={"response_format": {"type": "json_object"}}).choices[0]
    if done.finish_reason == "stop":
        assert isinstance(json.loads(done.text), dict)
    else:
        assert done.text.startswith("{")
    assert _chat(srv, response_format={"type": "text"}).message.content is not None


@pytest.mark.parametrize("body,check", [
    ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
    ({"choice": CHOICES}, lambda t: t in CHOICES),
    ({"grammar": GRAMMAR}, lambda t: re.fullmatch(r"<[xy]+>", t)),
    ({"json": SCHEMA}, lambda t: set(json.loads(t)) == {"ok", "n"}),
])
def test_openai_structured_outputs_on_chat_and_completions(srv, offline, body, check):
    chat = _chat(srv, extra_body={"structured_outputs": body})
    assert chat.finish_reason == "stop" and check(chat.message.content), chat.message.content
    comp = srv.oa.completions.create(model="tiny-llama", prompt=PROMPT, temperature=1.0, seed=3, max_tokens=40,
                                     extra_body={"structured_outputs": body}).choices[0]
    want = offline.generate([PROMPT], SamplingParams(
        temperature=1.0, seed=3, max_tokens=40,
        structured_outputs=StructuredOutputsParams(**body)))[0].outputs[0]
    assert comp.finish_reason == "stop" and comp.text == want.text and check(comp.text)


def test_openai_logit_bias_with_string_ids(srv, offline):
    want = offline.generate([PROMPT], SamplingParams(max_tokens=4, ignore_eos=True, logit_bias={77: 100}))[0]
    assert list(want.outputs[0].token_ids) == [77] * 4
    comp = srv.oa.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=4, logit_bias={"77": 100},
                                     extra_body={"ignore_eos": True}).choices[0]
    chat = _chat(srv, logit_bias={"77": 100}, extra_body={"ignore_eos": True}, max_tokens=4)
    assert comp.text == chat.message.content == want.outputs[0].text


@pytest.mark.parametrize("kwargs,param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
     "JSON schema does not compile"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(extra_body={"structured_outputs": {"regex": "a(b"}}), "regex"),
    (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}), "structured_outputs"),
    (dict(extra_body={"structured_outputs": {"grammar": "root ::= nope"}}), "grammar"),
    (dict(logit_bias={"5": 101}), "logit_bias"),
    (dict(logit_bias={"five": 1}), "logit_bias"),
    (dict(logit_bias={"99999999": 1}), "logit_bias"),
])
def test_openai_bad_input_is_400_naming_the_field(srv, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(srv, **kwargs)
    assert param in str(info.value)
    assert _chat(srv, max_tokens=2).message.content is not None
