"""The ``pagedgen`` command: ``serve`` a model, ``generate`` from a running
server, and ``bench`` when ``cli.bench`` is installed.

Every subcommand's parser sets ``func``: a callable taking the parsed
arguments and returning the exit code (``add_bench_parser(subparsers)`` in
``cli.bench`` follows the same contract).

Under ``torchrun`` every rank runs the same command line: rank 0 runs the
command (its engine is the tensor-parallel driver), and every other rank
becomes a worker of that engine (``_run_tp_worker``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys

from backends.tp.launch import torchrun_rank
from engine.args import EngineArgs, parse_bytes
from service.logging import LOG_FORMATS
from service.tools.parsers import TOOL_CALL_PARSERS

DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20      # = service.limits.DEFAULT_MAX_MESSAGE_BYTES (not imported: it loads grpc)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="load a model and serve the gRPC Generate API",
                       formatter_class=_HelpFormatter,
                       description="Serve pagedgen.v1.Generate (with health and reflection) until SIGTERM/SIGINT, "
                                   "then drain in-flight streams within --grace-period and exit 0.")
    g = p.add_argument_group("model and engine")
    EngineArgs.add_cli_args(g)
    g.add_argument("--engine-mode", choices=("process", "thread"), default="process",
                   help="where the step loop runs: its own process (the model never waits for the GIL "
                        "the server's event loop holds), or a thread of the server process")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    s.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one (logged when ready)")
    s.add_argument("--uds", default=None, metavar="PATH",
                   help="also listen on the Unix socket unix:PATH (mode 0660: this user and group may connect)")
    s.add_argument("--grace-period", type=float, default=30.0, help="seconds in-flight streams get to finish on shutdown")
    s.add_argument("--tls-cert", default=None, help="server certificate chain (PEM file); enables TLS")
    s.add_argument("--tls-key", default=None, help="server private key (PEM file)")
    s.add_argument("--tls-client-ca", default=None, help="require client certificates signed by this CA (PEM file)")
    s.add_argument("--api-key", default=None,
                   help="require 'authorization: Bearer KEY' on gRPC calls and HTTP requests "
                        "(health and reflection stay open; default: PAGEDGEN_API_KEY)")
    s.add_argument("--openai-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health) on this port of --host; 0 picks a free one (logged when ready)")
    s.add_argument("--served-model-name", default=None,
                   help="the model name the HTTP API lists and accepts (default: the model's own)")
    s.add_argument("--log-format", choices=LOG_FORMATS, default="console", help="log lines as text or JSON (stderr)")
    s.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING... (default: PAGEDGEN_LOG_LEVEL or INFO)")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port, logged when ready)")
    s.add_argument("--tool-call-parser", choices=tuple(TOOL_CALL_PARSERS), default=None,
                   help="the format tool calls are parsed from (hermes: <tool_call>{json}</tool_call>, Qwen and "
                        "Hermes; llama3_json: Llama 3.x JSON calls); needed for tool_choice auto (the default "
                        "with tools); required and named functions work without it")
    s.add_argument("--log-requests", action="store_true",
                   help="log prompt and completion text (debugging only; never on by default)")
    lim = p.add_argument_group("request limits (over a limit: INVALID_ARGUMENT; a larger message: RESOURCE_EXHAUSTED)")
    lim.add_argument("--max-message-bytes", type=parse_bytes, default=DEFAULT_MAX_MESSAGE_BYTES,
                     help="largest request message, e.g. 4MiB")
    lim.add_argument("--max-n", type=int, default=16, help="completions per request (sampling.n) at most")
    lim.add_argument("--max-output-tokens", type=int, default=None,
                     help="sampling.max_tokens at most (default: only the context bounds it)")
    lim.add_argument("--max-stop-strings", type=int, default=16, help="stop strings per request at most")
    lim.add_argument("--max-stop-string-len", type=int, default=256, help="characters per stop string at most")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from common import envs
    from service.limits import RequestLimits
    from service.logging import configure_logging
    from service.server import ServerOptions, serve

    configure_logging(args.log_format, args.log_level)
    engine_args = EngineArgs.from_cli_args(args)
    options = ServerOptions(host=args.host, port=args.port, tls_cert_file=args.tls_cert,
                            tls_key_file=args.tls_key, tls_client_ca_file=args.tls_client_ca,
                            api_key=args.api_key or envs.api_key(), max_message_bytes=args.max_message_bytes,
                            openai_port=args.openai_port, served_model_name=args.served_model_name,
                            tool_call_parser=args.tool_call_parser,
                            metrics_port=args.metrics_port, uds_path=args.uds,
                            log_requests=args.log_requests, limits=RequestLimits(
                                max_n=args.max_n, max_tokens=args.max_output_tokens,
                                max_stop_strings=args.max_stop_strings, max_stop_string_len=args.max_stop_string_len))
    return asyncio.run(serve(engine_args, options, args.grace_period, engine_process=args.engine_mode == "process",
                             log_config=(args.log_format, args.log_level)))


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion from a running server to stdout",
                       formatter_class=_HelpFormatter,
                       description="Send one prompt to a running pagedgen server and print the answer as it streams.")
    p.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message (chat template)")
    p.add_argument("--system", default=None, help="with --chat: a system message before the user's")
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port of the server")
    p.add_argument("--timeout", type=float, default=None, help="deadline of the call in seconds")
    p.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY'")
    p.add_argument("--tls-ca", default=None, help="use TLS, trusting this CA (PEM file)")
    p.add_argument("--usage", action="store_true", help="print token counts to stderr at the end")
    g = p.add_argument_group("sampling (unset: the server's defaults)")
    g.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most (server default 16)")
    g.add_argument("--min-tokens", type=int, default=None, help="tokens to generate at least")
    g.add_argument("--temperature", type=float, default=None, help="0 for greedy (server default 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1]")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens; 0 disables")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the best one's probability")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--presence-penalty", type=float, default=None, help="in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=None, help="in [-2, 2]")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 0; 1 disables")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append", default=None,
                   help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None, help="keep going past end-of-sequence")
    p.set_defaults(func=_run_generate)


_SAMPLING_FLAGS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids",
                   "ignore_eos")


def _run_generate(args: argparse.Namespace) -> int:
    from pagedgen_client import Client, PagedgenClientError

    sampling = {name: getattr(args, name) for name in _SAMPLING_FLAGS}
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        inputs = {"messages": messages}
    else:
        inputs = {"prompt": args.prompt}
    usage = None
    try:
        with Client(args.server, api_key=args.api_key, root_certificates=args.tls_ca) as client:
            for chunk in client.generate(**inputs, timeout=args.timeout, **sampling):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                usage = chunk.usage or usage
    except PagedgenClientError as e:
        sys.stdout.write("\n")
        sys.stderr.write(f"pagedgen: {e}\n")
        return 1
    sys.stdout.write("\n")
    if args.usage and usage is not None:
        sys.stderr.write(f"prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
                         f"cached_prompt_tokens={usage.cached_prompt_tokens}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedgen", description="LLM inference over a paged KV cache, served over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve_parser(sub)
    _add_generate_parser(sub)
    from cli.health import add_health_parser

    add_health_parser(sub)
    if importlib.util.find_spec("cli.bench") is not None:
        from cli.bench import add_bench_parser

        add_bench_parser(sub)
    return parser


def _run_tp_worker(args: argparse.Namespace) -> int:
    """A torchrun rank other than 0: a tensor-parallel worker of rank 0's engine, until it stops.

    The rank parses the same command line as rank 0 and checks its engine
    options, so a bad flag stops every rank alike; the model config, the
    weight shard and every step come from rank 0 (``backends.tp.worker``).
    """
    from backends.tp.worker import run_torchrun_worker
    from service.logging import configure_logging

    rank, world_size = torchrun_rank()
    given = vars(args)
    if "tensor_parallel_size" not in given:
        raise ValueError(f"under torchrun, rank {rank} is a tensor-parallel worker, so the command must build "
                         f"an engine (serve, bench offline)")
    engine_args = EngineArgs.from_cli_args(args)
    if engine_args.tensor_parallel_size != world_size:
        raise ValueError(f"under torchrun, --tensor-parallel-size must be the world size {world_size}, "
                         f"got {engine_args.tensor_parallel_size}")
    configure_logging(given.get("log_format", "console"), given.get("log_level"))
    return run_torchrun_worker()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        launched = torchrun_rank()
        run = _run_tp_worker if launched is not None and launched[0] != 0 else args.func
        return run(args)
    except ValueError as e:          # bad option values (EngineArgs, ServerOptions, the model path)
        parser.error(str(e))
    except OSError as e:             # e.g. the port is taken
        sys.stderr.write(f"pagedgen: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
