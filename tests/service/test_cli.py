"""The pagedgen command: option parsing, --help, and `generate` against a server."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import build_parser, main
from engine.args import parse_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, value", [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("512mib", 512 * 2**20), ("1.5G", int(1.5 * 2**30)),
    ("500MB", 500 * 10**6), ("1000000", 1000000), ("64 KiB", 64 * 1024),
])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "2XB", "-1GiB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_serve_options_map_to_engine_args():
    from engine.args import EngineArgs

    args = build_parser().parse_args(["serve", "--model", "m", "--kv-cache-memory", "1GiB", "--max-queue", "8",
                                      "--no-enable-prefix-caching", "--port", "0", "--block-size", "32"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.model, engine_args.kv_cache_memory, engine_args.max_queue) == ("m", 2**30, 8)
    assert engine_args.enable_prefix_caching is False and engine_args.block_size == 32
    assert args.host == "127.0.0.1" and args.port == 0 and args.grace_period == 30.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [[], ["serve"], ["generate"], ["bench"]])
def test_help(command):
    out = subprocess.run([sys.executable, "-m", "cli", *command, "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: pagedgen")
    if command == ["serve"]:
        for flag in ("--model", "--host", "--port", "--backend", "--dtype", "--max-num-seqs",
                     "--max-num-batched-tokens", "--block-size", "--kv-cache-memory", "--num-kv-blocks",
                     "--max-model-len", "--max-queue", "--seed", "--no-enable-prefix-caching",
                     "--grace-period", "--log-format"):
            assert flag in out, flag
    if command == ["generate"]:
        for flag in ("--chat", "--server", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--stop"):
            assert flag in out, flag


def test_bad_engine_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--block-size", "0", "--port", "0"])
    assert info.value.code == 2 and "block_size" in capsys.readouterr().err


def test_generate_streams_to_stdout(fake_server, capsys):
    assert main(["generate", "hello", "--server", fake_server.address, "--max-tokens", "5", "--usage"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "olleh\n"
    assert "completion_tokens=5" in captured.err
    assert main(["generate", "hi", "--chat", "--server", fake_server.address, "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out == ">tn\n"               # "...<assistant>" reversed, 3 tokens


def test_generate_reports_errors(fake_server, capsys):
    assert main(["generate", "hello", "--server", fake_server.address, "--top-p", "7"]) == 1
    assert "INVALID_ARGUMENT: sampling.top_p" in capsys.readouterr().err


TORCHRUN_RANK_1 = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.parametrize("argv, message", [
    (["generate", "hello"], "rank 1 is a tensor-parallel worker"),
    (["serve", "--tensor-parallel-size", "3"], "--tensor-parallel-size must be the world size 2"),
    (["serve", "--tensor-parallel-size", "2", "--block-size", "0"], "block_size"),
])
def test_a_torchrun_worker_rank_checks_the_command_line_first(monkeypatch, capsys, argv, message):
    for name, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:                  # before any rendezvous: nothing listens on port 1
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
