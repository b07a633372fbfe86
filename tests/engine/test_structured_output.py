"""Structured output and logit_bias through the offline API, on the default model and the tiny one."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from common.errors import InvalidRequestError
from engine import LLM, SamplingParams
from engine.sampling_params import StructuredOutputsParams
from engine.structured_output import StructuredOutputs
from scheduler.output import ScheduledRequest, SchedulerOutput
from tests.factories import make_tiny_hf_model

pytestmark = pytest.mark.timeout(600)

# Every field bounded, so a sampled (temperature 1.0) completion ends well within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
PROMPT = "Describe a person as JSON with a name, an age, a role and whether they are active:"


@pytest.fixture(scope="module")
def llm():
    return LLM(None, max_num_seqs=32, num_kv_blocks=512)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return LLM(str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny"), arch="llama")), num_kv_blocks=256)


@pytest.mark.slow
def test_json_schema_every_sampled_output_validates(llm):
    """20 seeds at temperature 1.0 on the default model: every output parses and follows the schema."""
    so = StructuredOutputsParams(json=PERSON)
    outs = llm.generate([PROMPT] * 20, [SamplingParams(temperature=1.0, seed=s, max_tokens=48, structured_outputs=so)
                                        for s in range(20)])
    texts = set()
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
        texts.add(c.text)
    assert len(texts) > 1                               # the seeds sampled, the grammar only constrained


def _every_token_allowed(llm, so: StructuredOutputsParams, token_ids: list[int]) -> bool:
    """A fresh matcher takes every token of an output cut by max_tokens without completing."""
    tok = llm.tokenizer
    fresh = StructuredOutputs(tok.hf, llm.engine.structured.vocab_size, tuple(tok.eos_token_ids))
    fresh.add("check", fresh.compile(so))
    return not any(fresh.accept("check", t) for t in token_ids)


@pytest.mark.slow
def test_each_constraint_kind_is_followed(llm):
    grammar = 'root ::= "(" digit ("," digit)* ")"\ndigit ::= [0-9]'
    cases = [
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (StructuredOutputsParams(regex=r"[A-Z][a-z]{2,5}-\d{3}"), lambda t: re.fullmatch(r"[A-Z][a-z]{2,5}-\d{3}", t)),
        (StructuredOutputsParams(choice=["yes", "no", "maybe not"]), lambda t: t in ("yes", "no", "maybe not")),
        (StructuredOutputsParams(grammar=grammar), lambda t: re.fullmatch(r"\(\d(,\d)*\)", t)),
    ]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs=so)
              for so, _ in cases for s in (0, 1)]
    outs = llm.generate(["Answer in the requested format: " + PROMPT] * len(params), params)
    for i, out in enumerate(outs):
        c = out.outputs[0]
        check = cases[i // 2][1]
        so = cases[i // 2][0]
        if so.kind == "json_object" and c.finish_reason == "length":     # an unbounded object may run past the cap
            assert c.text.startswith("{") and _every_token_allowed(llm, so, list(c.token_ids)), c.text
            continue
        assert c.finish_reason == "stop" and check(c.text), (so, c.text)


@pytest.mark.slow
def test_logit_bias_forces_and_bans_tokens(llm):
    free = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids
    banned = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, logit_bias={free[0]: -100}))
    assert banned[0].outputs[0].token_ids[0] != free[0]
    forced = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=3, max_tokens=4, logit_bias={"1000": 100}))
    assert forced[0].outputs[0].token_ids == [1000] * 4


@pytest.mark.parametrize("so,needle", [
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "structured_outputs.json"),
    (StructuredOutputsParams(regex="a(b"), "structured_outputs.regex"),
    (StructuredOutputsParams(grammar="root ::= undefined_rule"), "structured_outputs.grammar"),
])
def test_a_constraint_that_does_not_compile_is_refused(tiny, so, needle):
    with pytest.raises(InvalidRequestError, match=re.escape(needle) + ": the .* does not compile"):
        tiny.generate(["hi"], SamplingParams(max_tokens=2, structured_outputs=so))
    assert tiny.generate(["hi"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids     # still serving


def test_bad_params_are_refused_naming_the_field(tiny):
    vocab = tiny.tokenizer.vocab_size
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        tiny.generate(["hi"], SamplingParams(max_tokens=2, logit_bias={vocab: 1.0}))
    for kwargs, needle in [(dict(logit_bias={1: 100.5}), "logit_bias"), (dict(logit_bias={-1: 1}), "logit_bias"),
                           (dict(logit_bias={"x": 1}), "logit_bias")]:
        with pytest.raises(ValueError, match=needle):
            SamplingParams(**kwargs)
    for kwargs in [dict(), dict(regex="a", choice=["b"]), dict(choice=[]), dict(choice=["a", ""]),
                   dict(json="{not json"), dict(json="[1]"), dict(regex="")]:
        with pytest.raises(ValueError, match="structured_outputs"):
            StructuredOutputsParams(**kwargs)


def test_grammar_survives_preemption(tmp_path):
    """A preempted constrained request replays its matcher: the same tokens as a run without preemption."""
    model = str(make_tiny_hf_model(tmp_path, arch="llama"))
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=60, ignore_eos=True,
                             structured_outputs=StructuredOutputsParams(regex=r"[a-z ]{20,60}")) for s in range(6)]
    prompts = [f"prompt number {s} " * 3 for s in range(6)]
    roomy = LLM(model, num_kv_blocks=256, block_size=16)
    tight = LLM(model, num_kv_blocks=14, block_size=16)
    want = [o.outputs[0] for o in roomy.generate(prompts, params)]
    got = [o.outputs[0] for o in tight.generate(prompts, params)]
    assert tight.get_stats().num_preemptions > 0
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert all(re.fullmatch(r"[a-z ]{20,60}", c.text) for c in got)
    assert tight.engine.structured.num_sequences <= len(prompts)            # dropped at the next step at the latest


def test_matcher_rebuilds_from_the_output_tokens(default_tokenizer):
    """fill() after a preemption (or any mismatch) replays the output: the same bitmask as stepping token by token."""
    tok = default_tokenizer
    so = StructuredOutputs(tok.hf, tok.vocab_size, tuple(tok.eos_token_ids))
    grammar = so.compile(StructuredOutputsParams(regex=r"abc[0-9]+"))
    assert so.compile(StructuredOutputsParams(regex=r"abc[0-9]+")) is grammar          # cached
    output = tok.encode("abc12", add_special_tokens=False)
    so.add("stepped", grammar)
    so.add("replayed", grammar)
    assert not any(so.accept("stepped", t) for t in output)

    def sched(seq_id: str, preempted: bool) -> SchedulerOutput:
        sr = ScheduledRequest(seq_id, [1], 0, [0], [0], SamplingParams(), True, output_token_ids=list(output))
        return SchedulerOutput([sr], 16, preempted_request_ids={seq_id} if preempted else set())

    stepped, replayed = sched("stepped", True), sched("replayed", False)
    so.fill(stepped)
    so.fill(replayed)
    a, b = stepped.scheduled[0].grammar_bitmask, replayed.scheduled[0].grammar_bitmask
    assert a.dtype == np.int32 and np.array_equal(a, b)
    allowed = np.flatnonzero(np.unpackbits(a.view(np.uint8), bitorder="little")[:tok.vocab_size])
    assert tok.eos_token_ids[0] in allowed and all(tok.decode([t]).isdigit() for t in allowed
                                                   if t not in tok.eos_token_ids)
    so.fill(SchedulerOutput([], 16, finished_request_ids={"stepped", "replayed"}))
    assert so.num_sequences == 0


def test_choice_ends_when_complete_with_the_last_token_in_the_text(tiny):
    out = tiny.generate(["pick"], SamplingParams(temperature=1.0, seed=0, max_tokens=30, ignore_eos=True,
                                                 structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"])))
    c = out[0].outputs[0]
    assert c.finish_reason == "stop" and c.text in ("alpha", "beta")
