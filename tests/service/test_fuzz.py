"""Property-based tests of the wire API against a real server on the tiny model.

Whatever a caller sends, as a ``GenerateRequest`` with any field values or as
raw bytes in place of a message, the server answers OK or INVALID_ARGUMENT
(never INTERNAL or UNKNOWN), answers within a bounded time, and keeps serving.
Examples are derandomised (the same cases every run) and bounded so the file
runs in well under a minute; ``test_the_server_still_serves`` prints how many
cases were tried.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb
from service.limits import RequestLimits
from service.server import SERVICE_NAME, ServerOptions
from tests.service.conftest import serving

pytestmark = pytest.mark.timeout(120)

CALL_TIMEOUT_S = 20.0                   # a hang shows as DEADLINE_EXCEEDED, which fails the test
ACCEPTED = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)
MAX_MESSAGE_BYTES = 64 * 1024           # larger messages: RESOURCE_EXHAUSTED, before any parsing
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=120,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
TRIED: dict[str, int] = {}

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
DOUBLES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3),
                    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e-5, 1.0, 2.0, 1e308]))
# Any unicode a client can encode (lone surrogates cannot be sent; raw bytes cover bad UTF-8).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
HUGE_TEXT = st.builds(lambda c, k: c * k, st.sampled_from(["a", "🙂", "\x00", " ", "<|im_end|>"]),
                      st.integers(100, 5000))


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """Short context (every accepted request ends within 48 tokens) and tight limits."""
    options = ServerOptions(port=0, max_message_bytes=MAX_MESSAGE_BYTES,
                            limits=RequestLimits(max_n=4, max_stop_strings=8, max_stop_string_len=32))
    with serving(tiny_model_dir, options, max_model_len=48, num_kv_blocks=128, max_num_seqs=16,
                 max_queue=64) as server, grpc.insecure_channel(server.address) as server.channel:
        yield server


def _optional(strategy):
    return st.one_of(st.none(), strategy)


FIELD_STRATEGIES = {  # name: (values a well-behaved client sends, anything the wire type holds)
    "temperature": (st.floats(0, 2), DOUBLES), "top_p": (st.floats(0.01, 1), DOUBLES),
    "min_p": (st.floats(0, 1), DOUBLES), "presence_penalty": (st.floats(-2, 2), DOUBLES),
    "frequency_penalty": (st.floats(-2, 2), DOUBLES), "repetition_penalty": (st.floats(0.1, 2), DOUBLES),
    "top_k": (st.integers(0, 50), INT32), "seed": (st.integers(-(2**63), 2**63 - 1),) * 2,
    "max_tokens": (st.integers(1, 60), INT32), "min_tokens": (st.integers(0, 4), INT32),
    "n": (st.integers(1, 4), INT32), "logprobs": (st.integers(0, 20), INT32),
    "ignore_eos": (st.booleans(),) * 2, "skip_special_tokens": (st.booleans(),) * 2,
    "include_stop_str_in_output": (st.booleans(),) * 2,
    "prompt_logprobs": (st.integers(0, 5), INT32),
}
INT64 = st.integers(-(2**63), 2**63 - 1)
REQUEST_FIELD_STRATEGIES = {  # GenerateRequest options, as FIELD_STRATEGIES (the server runs fcfs: priority 0)
    "priority": (st.just(0), INT32), "time_limit_ms": (st.integers(1, 10_000), INT64),
    "truncate_prompt_tokens": (st.integers(1, 100), INT32),
}
VOCAB_IDS = st.integers(0, 399)


@st.composite
def sampling_params(draw, wild: bool) -> pb.SamplingParams:
    msg = pb.SamplingParams()
    for name, (tame, anything) in FIELD_STRATEGIES.items():
        value = draw(_optional(anything if wild else tame))
        if value is not None:
            setattr(msg, name, value)
    if wild:
        msg.stop.extend(draw(st.lists(st.one_of(TEXT, HUGE_TEXT), max_size=10)))
        msg.stop_token_ids.extend(draw(st.lists(st.one_of(UINT32, VOCAB_IDS), max_size=10)))
    else:
        msg.stop.extend(draw(st.lists(TEXT.filter(bool).map(lambda t: t[:32]), max_size=3)))
        msg.stop_token_ids.extend(draw(st.lists(VOCAB_IDS, max_size=3)))
    bias = st.floats(-100, 100) if not wild else st.one_of(st.floats(width=32, allow_nan=True), st.floats(-100, 100))
    msg.logit_bias.update(draw(st.dictionaries(st.one_of(UINT32, VOCAB_IDS) if wild else VOCAB_IDS, bias, max_size=4)))
    constraint = draw(st.sampled_from([None, "json_schema", "json_object", "regex", "choice", "grammar"]))
    if constraint == "choice":
        msg.choice.choices.extend(draw(st.lists(TEXT, max_size=3)))
    elif constraint == "json_object":
        msg.json_object = draw(st.booleans())
    elif constraint is not None:              # valid ones, and whatever text (mostly refused: INVALID_ARGUMENT)
        valid = {"json_schema": '{"type": "object", "properties": {"a": {"type": "integer"}}}',
                 "regex": "[a-z]{1,8}", "grammar": 'root ::= "x" | "y" root'}[constraint]
        setattr(msg, constraint, draw(st.one_of(st.just(valid), TEXT)))
    return msg


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """Half are requests a careful client could send, half anything the types allow."""
    wild = draw(st.booleans())
    msg = pb.GenerateRequest(request_id=draw(st.one_of(st.just(""), TEXT, HUGE_TEXT) if wild else TEXT),
                             sampling=draw(sampling_params(wild)))
    kinds = ["prompt", "token_ids", "chat"] + (["huge_prompt", "none"] if wild else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "prompt":
        msg.prompt = draw(TEXT if wild else TEXT.filter(bool))
    elif kind == "huge_prompt":
        msg.prompt = draw(HUGE_TEXT)
    elif kind == "token_ids":
        ids = st.one_of(UINT32, VOCAB_IDS) if wild else VOCAB_IDS
        msg.prompt_token_ids.ids.extend(draw(st.lists(ids, min_size=0 if wild else 1, max_size=80 if wild else 30)))
    elif kind == "chat":
        role = TEXT if wild else st.sampled_from(["system", "user", "assistant"])
        for r, content in draw(st.lists(st.tuples(role, TEXT), min_size=0 if wild else 1, max_size=4)):
            msg.chat.messages.add(role=r, content=content)
    for name, (tame, anything) in REQUEST_FIELD_STRATEGIES.items():
        value = draw(_optional(anything if wild else tame))
        if value is not None:
            setattr(msg, name, value)
    for name in ("return_token_ids", "cache_salt"):
        value = draw(_optional(st.booleans() if name == "return_token_ids" else TEXT))
        if value is not None:
            setattr(msg, name, value)
    return msg


def _assert_accepted(code: grpc.StatusCode, data: bytes, what="") -> None:
    if len(data) > MAX_MESSAGE_BYTES:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (what, len(data), code)
    else:
        assert code in ACCEPTED, (what, code)


def _generate(channel, request: bytes) -> tuple[grpc.StatusCode, list[bytes]]:
    """Send ``request`` bytes as a Generate call; its status and raw responses."""
    call = channel.unary_stream(f"/{SERVICE_NAME}/Generate")(request, timeout=CALL_TIMEOUT_S)
    responses = []
    try:
        for response in call:
            responses.append(response)
    except grpc.RpcError as e:
        return e.code(), responses
    return call.code(), responses


def _assert_served(server) -> None:
    assert not server.engine.is_dead


@FUZZ
@given(request=generate_requests())
def test_any_generate_request_gets_ok_or_invalid_argument(server, request):
    TRIED["GenerateRequest"] = TRIED.get("GenerateRequest", 0) + 1
    data = request.SerializeToString()
    code, responses = _generate(server.channel, data)
    _assert_accepted(code, data)
    TRIED[f"GenerateRequest {code.name}"] = TRIED.get(f"GenerateRequest {code.name}", 0) + 1
    if code == grpc.StatusCode.OK:          # every completion ended with a reason
        msgs = [pb.GenerateResponse.FromString(r) for r in responses]
        finished = {m.index for m in msgs if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED}
        n = request.sampling.n if request.sampling.HasField("n") else 1
        assert finished == set(range(n))
    _assert_served(server)


def _mutated(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        if out:
            out[position % len(out)] = value
    return bytes(out)


RAW_BYTES = st.one_of(
    st.binary(max_size=300),
    st.builds(_mutated, generate_requests().map(lambda m: m.SerializeToString()),
              st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)),
)
UNARY_METHODS = ("Tokenize", "Detokenize", "ModelInfo", "GetStats", "Abort")


@FUZZ
@given(data=RAW_BYTES, method=st.sampled_from(("Generate",) * 4 + UNARY_METHODS))
def test_any_bytes_get_ok_or_invalid_argument(server, data, method):
    TRIED["raw bytes"] = TRIED.get("raw bytes", 0) + 1
    if method == "Generate":
        code, _ = _generate(server.channel, data)
    else:
        call = server.channel.unary_unary(f"/{SERVICE_NAME}/{method}")
        try:
            call(data, timeout=CALL_TIMEOUT_S)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
    _assert_accepted(code, data, method)
    TRIED[f"raw bytes {code.name}"] = TRIED.get(f"raw bytes {code.name}", 0) + 1
    _assert_served(server)


def test_a_message_over_the_size_limit_is_resource_exhausted(server):
    request = pb.GenerateRequest(prompt="a" * (MAX_MESSAGE_BYTES + 1))
    code, _ = _generate(server.channel, request.SerializeToString())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_server_still_serves(server):
    """Runs after the properties: a normal request succeeds and nothing leaked."""
    with server.client() as client:
        assert client.health() == "SERVING"
        chunks = list(client.generate("The cat watches", max_tokens=8, ignore_eos=True, temperature=0))
        assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 8
        stats = client.stats()
        assert (stats.num_running, stats.num_waiting, stats.kv_blocks_free) == (0, 0, stats.kv_blocks_total)
    print(f"\nfuzz cases tried: {TRIED}")
