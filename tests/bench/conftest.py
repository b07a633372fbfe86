"""Fixtures of the benchmark tests: a real server on the tiny model, on a free loopback port."""

from __future__ import annotations

import pytest

from tests.service.conftest import serving


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tests.factories import make_tiny_hf_model

    return str(make_tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama"))


@pytest.fixture(scope="module")
def bench_server(tiny_model_dir):
    with serving(tiny_model_dir) as server:
        yield server
