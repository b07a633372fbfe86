"""The one mapping from exceptions to status codes."""

from __future__ import annotations

import grpc
import pytest

from common.errors import (EngineDeadError, EngineShutdownError, InvalidRequestError, QueueFullError,
                           RequestFailedError)
from service.errors import status_of


@pytest.mark.parametrize("exc, code", [
    (InvalidRequestError("sampling.top_p must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineShutdownError("draining"), grpc.StatusCode.UNAVAILABLE),
    (RequestFailedError("r7", "nan logits"), grpc.StatusCode.INTERNAL),
    (EngineDeadError("dead"), grpc.StatusCode.INTERNAL),
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL),
])
def test_status_of(exc, code):
    assert status_of(exc, "r7")[0] == code


def test_internal_errors_carry_the_request_id_but_no_internals():
    assert "r7" in status_of(RequestFailedError("r7", "boom"), "r7")[1]
    assert "r7" in status_of(EngineDeadError("dead"), "r7")[1]
    message = status_of(RuntimeError("secret detail"), "r7")[1]
    assert "r7" in message and "secret" not in message


def test_invalid_argument_keeps_the_field_name():
    assert status_of(InvalidRequestError("sampling.top_p must be in (0, 1]"))[1].startswith("sampling.top_p")
