"""The ``pagedgen`` command: ``serve`` a model, ``generate`` from a running
server, and ``bench`` when ``service.bench`` is installed.

Every subcommand's parser sets ``func``: a callable taking the parsed
arguments and returning the exit code (``add_bench_parser(subparsers)`` in
``service.bench`` follows the same contract).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import re
import sys

from service.logging import LOG_FORMATS

DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20      # = service.limits.DEFAULT_MAX_MESSAGE_BYTES (not imported: it loads grpc)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def parse_bytes(text: str) -> int:
    """ "2GiB", "512MiB", "1.5G" (binary), "500MB" (decimal) or plain bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB, 1000000)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="load a model and serve the gRPC Generate API",
                       formatter_class=_HelpFormatter,
                       description="Serve pagedgen.v1.Generate (with health and reflection) until SIGTERM/SIGINT, "
                                   "then drain in-flight streams within --grace-period and exit 0.")
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="a .gguf file or a local Hugging Face model directory (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "metal"), help="device backend")
    g.add_argument("--dtype", default="float32", help="compute and KV cache dtype (float32, bfloat16, float16)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="running requests per step at most")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step at most")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="memory for the KV cache, e.g. 2GiB, 512MiB or bytes (default: the engine's, 1GiB on CPU)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="explicit KV block count (overrides --kv-cache-memory)")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit per request (default: the model's)")
    g.add_argument("--max-queue", type=int, default=1024,
                   help="waiting requests at most; more get RESOURCE_EXHAUSTED")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="prompt tokens per request at most; longer prompts get INVALID_ARGUMENT "
                        "(default: the context, max-model-len - 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="disable automatic prefix caching")
    g.add_argument("--num-threads", type=int, default=None, help="CPU threads of the cpu backend (default: all cores)")
    g.add_argument("--engine-mode", choices=("process", "thread"), default="process",
                   help="where the step loop runs: its own process (the model never waits for the GIL "
                        "the server's event loop holds), or a thread of the server process")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over N ranks (worker processes over torch.distributed; threads shared)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="cuda: share of GPU memory the engine may use; the KV cache gets what the model leaves")
    g.add_argument("--cuda-graph-mode", default="full", choices=("none", "piecewise", "full"),
                   help="cuda: full graphs for decode steps, piecewise graphs around eager attention, or none")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    s.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one (logged when ready)")
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
    from engine import envs
    from engine.args import EngineArgs
    from service.limits import RequestLimits
    from service.logging import configure_logging
    from service.server import ServerOptions, serve

    configure_logging(args.log_format, args.log_level)
    engine_args = EngineArgs(**{k: v for k, v in vars(args).items() if k in EngineArgs.field_names()})
    options = ServerOptions(host=args.host, port=args.port, tls_cert_file=args.tls_cert,
                            tls_key_file=args.tls_key, tls_client_ca_file=args.tls_client_ca,
                            api_key=args.api_key or envs.api_key(), max_message_bytes=args.max_message_bytes,
                            openai_port=args.openai_port, served_model_name=args.served_model_name,
                            metrics_port=args.metrics_port,
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
    if importlib.util.find_spec("service.bench") is not None:
        from service.bench import add_bench_parser

        add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:          # bad option values (EngineArgs, ServerOptions, the model path)
        parser.error(str(e))
    except OSError as e:             # e.g. the port is taken
        sys.stderr.write(f"pagedgen: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
