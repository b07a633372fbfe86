"""The API key from a mounted file (PAGEDGEN_API_KEY_FILE), as a Kubernetes Secret provides it.

``common.envs.api_key()`` reads the file at call time; a key that was meant
to be there (both variables set, an unreadable, empty or multi-line file)
is an error, never a server without authentication. End to end, `pagedgen
serve` started with only the file variable requires that key.
"""

from __future__ import annotations

import grpc
import pytest

from common import envs
from pagedgen_client import Client, PagedgenClientError, RetryPolicy
from tests.service.conftest import tiny_model_dir  # noqa: F401  (the tiny model fixture)
from tests.service.test_serve_process import ServeProcess


@pytest.fixture(autouse=True)
def _no_key_in_the_environment(monkeypatch):
    monkeypatch.delenv("PAGEDGEN_API_KEY", raising=False)
    monkeypatch.delenv("PAGEDGEN_API_KEY_FILE", raising=False)


def test_the_file_holds_the_key(tmp_path, monkeypatch):
    key_file = tmp_path / "api-key"
    key_file.write_text("s3cret-from-a-secret\n")                  # `kubectl create secret` adds no newline; echo does
    monkeypatch.setenv("PAGEDGEN_API_KEY_FILE", str(key_file))
    assert envs.api_key() == "s3cret-from-a-secret"
    key_file.write_text("rotated")                                  # read at call time
    assert envs.api_key() == "rotated"


def test_without_either_variable_there_is_no_key(monkeypatch):
    assert envs.api_key() is None
    monkeypatch.setenv("PAGEDGEN_API_KEY", "from-env")
    assert envs.api_key() == "from-env"


@pytest.mark.parametrize("content, message", [("", "is empty"), (" \n", "is empty"),
                                              ("two\nlines", "one key"), ("with space", "one key")])
def test_a_bad_file_is_an_error(tmp_path, monkeypatch, content, message):
    key_file = tmp_path / "api-key"
    key_file.write_text(content)
    monkeypatch.setenv("PAGEDGEN_API_KEY_FILE", str(key_file))
    with pytest.raises(ValueError, match=message):
        envs.api_key()


def test_a_missing_file_or_both_variables_are_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDGEN_API_KEY_FILE", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="cannot read"):
        envs.api_key()
    (tmp_path / "absent").write_text("k")
    monkeypatch.setenv("PAGEDGEN_API_KEY", "k")
    with pytest.raises(ValueError, match="not both"):
        envs.api_key()


@pytest.mark.timeout(120)
def test_serve_requires_the_key_from_the_file(tiny_model_dir, tmp_path, monkeypatch):
    key_file = tmp_path / "api-key"
    key_file.write_text("file-k3y\n")
    key_file.chmod(0o400)
    monkeypatch.setenv("PAGEDGEN_API_KEY_FILE", str(key_file))     # the server process inherits it
    server = ServeProcess("--model", tiny_model_dir, "--backend", "cpu", "--num-kv-blocks", "64")
    try:
        address = server.wait_event("server_ready", timeout=60)["address"]
        no_retry = RetryPolicy(max_attempts=1)
        with Client(address, retry=no_retry) as stranger, Client(address, api_key="file-k3y") as member:
            assert stranger.health() == "SERVING"
            with pytest.raises(PagedgenClientError) as info:
                stranger.generate_text("The cat", max_tokens=2)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert len(member.generate_text("The cat", max_tokens=4, ignore_eos=True, temperature=0)) > 0
    finally:
        server.kill()


@pytest.mark.timeout(60)
def test_serve_refuses_to_start_with_an_empty_key_file(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "api-key").write_text("")
    monkeypatch.setenv("PAGEDGEN_API_KEY_FILE", str(tmp_path / "api-key"))
    server = ServeProcess("--model", tiny_model_dir, "--backend", "cpu", "--num-kv-blocks", "16")
    try:
        assert server.proc.wait(timeout=50) == 2                        # a usage error, before any port is bound
        assert not any(e.get("event") == "server_ready" for e in server.events)
    finally:
        server.kill()
