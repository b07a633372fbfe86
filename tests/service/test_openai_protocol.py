"""The OpenAI request models: prompt shapes, field names in errors, engine params."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.openai.protocol import ChatCompletionRequest, CompletionRequest, InvalidFieldError


@pytest.mark.parametrize("prompt, inputs", [
    ("hi", [{"prompt": "hi"}]),
    (["a", "b"], [{"prompt": "a"}, {"prompt": "b"}]),
    ([1, 2, 3], [{"prompt_token_ids": [1, 2, 3]}]),
    ([[1, 2], [3]], [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]),
])
def test_every_prompt_shape_becomes_engine_inputs(prompt, inputs):
    assert CompletionRequest(prompt=prompt).engine_prompts() == inputs


def test_completion_defaults_follow_openai():
    params = CompletionRequest(prompt="x").sampling_params()
    # An unset max_tokens runs up to the context in both endpoints, as in gRPC (not legacy OpenAI's 16).
    assert params.max_tokens is None and params.logprobs is None and params.n == 1
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).sampling_params()
    assert chat.max_tokens is None                      # a chat reply runs up to the context


def test_extras_and_stop_reach_the_sampling_params():
    params = CompletionRequest(prompt="x", stop="END", top_k=5, min_p=0.1, repetition_penalty=1.2,
                               ignore_eos=True, min_tokens=2, seed=3, logprobs=4).sampling_params()
    assert (params.stop, params.top_k, params.min_p, params.repetition_penalty) == (("END",), 5, 0.1, 1.2)
    assert (params.ignore_eos, params.min_tokens, params.seed, params.logprobs) == (True, 2, 3, 4)


def test_errors_name_the_field_the_client_sent():
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_completion_tokens=-1)
    with pytest.raises(InvalidFieldError, match=r"^max_completion_tokens must be a positive integer") as info:
        request.sampling_params()
    assert info.value.param == "max_completion_tokens"
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=99)
    with pytest.raises(InvalidFieldError, match=r"^top_logprobs must be an integer in \[0, 20\]"):
        request.sampling_params()


def test_chat_max_completion_tokens_wins_and_text_parts_are_joined():
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                  {"role": "assistant", "content": None, "refusal": None}],
        max_tokens=5, max_completion_tokens=7, logprobs=True)
    assert request.engine_messages() == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": ""}]
    params = request.sampling_params()
    assert params.max_tokens == 7 and params.logprobs == 0


@pytest.mark.parametrize("fields, param", [
    (dict(stream_options={"include_usage": True}), "stream_options"),        # without stream: true
    (dict(logit_bias={"5": 200.0}), "logit_bias"),                          # outside [-100, 100]
    (dict(suffix="!"), "suffix"),
])
def test_unsupported_options_are_refused_not_ignored(fields, param):
    request = CompletionRequest(prompt="x", **fields)
    with pytest.raises(InvalidFieldError) as info:
        request.engine_prompts()
        request.sampling_params()
    assert info.value.param == param


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        CompletionRequest(prompt="x", temprature=0)


@pytest.mark.parametrize("path, body, param, says", [
    ("/v1/completions", b"{bad", None, "the request body is not valid JSON"),
    ("/v1/completions", b"", None, "the request needs a JSON object body"),
    ("/v1/completions", b"[]", None, "the request body must be a JSON object"),
    ("/v1/completions", b'{"prompt": 5}', "prompt", "prompt must be a string, a list of strings"),
    ("/v1/completions", b'{"messages": []}', "prompt", "prompt is required"),
    ("/v1/completions", b'{"prompt": "x", "stop": 3}', "stop", "stop must be a string or a list of strings"),
    ("/v1/chat/completions", b'{"messages": [{"content": "x"}]}', "messages[0].role", "messages[0].role is required"),
    ("/v1/chat/completions", b'{"messages": [], "n": "two"}', "n", "n: Input should be a valid integer"),
])
def test_malformed_bodies_get_400_naming_the_field(path, body, param, says):
    from fastapi.testclient import TestClient

    from service.openai.app import build_app
    from service.openai.serving import OpenAIServing

    with TestClient(build_app(OpenAIServing(None))) as client:     # rejected before any engine is needed
        resp = client.post(path, content=body, headers={"content-type": "application/json"})
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"].startswith(says)
