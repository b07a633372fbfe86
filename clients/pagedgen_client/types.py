"""Typed results of the client, converted from the wire messages."""

from __future__ import annotations

from dataclasses import dataclass

from ._proto.pagedgen.v1 import generate_pb2 as pb

_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
    pb.FINISH_REASON_TIME_LIMIT: "time_limit",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


@dataclass(frozen=True)
class ToolCall:
    """A call of a tool by the model."""

    id: str                                     # answer it with a "tool" message of this tool_call_id
    name: str                                   # the function called
    arguments: str                              # its arguments, a JSON object as text

    @classmethod
    def from_pb(cls, msg: pb.ToolCall) -> "ToolCall":
        return cls(msg.id, msg.name, msg.arguments)


@dataclass(frozen=True)
class Usage:
    """Token counts of one completion (sent with its last chunk)."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int

    @classmethod
    def from_pb(cls, msg: pb.Usage) -> "Usage":
        return cls(msg.prompt_tokens, msg.completion_tokens, msg.cached_prompt_tokens)


@dataclass(frozen=True)
class TokenLogprob:
    """Logprobs at one generated position: the sampled token and the top-k."""

    token_id: int
    logprob: float
    rank: int                                   # 1 = most likely
    top: list[tuple[int, float]]                # (token id, logprob), best first

    @classmethod
    def from_pb(cls, msg: pb.TokenLogprobs) -> "TokenLogprob":
        top = [(t.token_id, t.logprob) for t in msg.top_logprobs]
        return cls(msg.token_id, msg.logprob, msg.rank, top)


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed delta of completion ``index`` of a request."""

    request_id: str
    index: int                                  # which of the n completions
    text: str                                   # new text since the previous chunk
    token_ids: list[int]                        # new token ids (empty if not returned)
    logprobs: list[TokenLogprob] | None         # per new token, when asked
    finish_reason: str | None                   # None while running, then stop / length / abort
    stop_reason: str | int | None               # the matched stop string or stop token id
    usage: Usage | None                         # on the completion's last chunk
    engine_time: float | None = None            # return_timing: when the engine produced it (Unix s, server clock)
    tool_calls: tuple[ToolCall, ...] = ()       # calls parsed since the previous chunk (with tools)
    # With prompt_logprobs, on one chunk: the logprob of each prompt token after the first (entry i: token i + 1).
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def from_pb(cls, msg: pb.GenerateResponse) -> "GenerateChunk":
        kind = msg.WhichOneof("stop_reason")
        return cls(
            request_id=msg.request_id,
            index=msg.index,
            text=msg.text,
            token_ids=list(msg.token_ids),
            logprobs=[TokenLogprob.from_pb(lp) for lp in msg.logprobs] or None,
            finish_reason=_FINISH_REASONS.get(msg.finish_reason),
            stop_reason=None if kind is None else getattr(msg, kind),
            usage=Usage.from_pb(msg.usage) if msg.HasField("usage") else None,
            engine_time=msg.engine_time_unix_nanos / 1e9 if msg.engine_time_unix_nanos else None,
            tool_calls=tuple(ToolCall.from_pb(c) for c in msg.tool_calls),
            prompt_logprobs=[TokenLogprob.from_pb(lp) for lp in msg.prompt_logprobs] or None,
        )


@dataclass(frozen=True)
class ModelInfo:
    """The server's model and KV cache."""

    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    num_kv_blocks: int
    backend: str
    dtype: str
    architecture: str = ""                      # the model family, e.g. "qwen3" ("" from older servers)
    loaded_model: str = ""                      # the loaded model's own name; ``model`` is the served name
    weight_format: str = ""                     # dense dtype or kept quantized formats, e.g. "Q4_1+Q8_0" ("" from older servers)

    @classmethod
    def from_pb(cls, msg: pb.ModelInfoResponse) -> "ModelInfo":
        return cls(msg.model, msg.max_model_len, msg.vocab_size, tuple(msg.eos_token_ids),
                   msg.block_size, msg.num_kv_blocks, msg.backend, msg.dtype, msg.architecture,
                   msg.loaded_model or msg.model, msg.weight_format)


@dataclass(frozen=True)
class Stats:
    """A snapshot of the server's scheduler and KV cache counters."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    num_preemptions: int
    prefix_cache_queries: int                   # prompt tokens looked up
    prefix_cache_hits: int                      # prompt tokens found
    num_waiting_prompt_tokens: int = 0          # tokens the waiting requests still have to prefill
    num_running_tokens: int = 0                 # tokens the running requests hold (prompt plus output)
    device_memory_active_bytes: int = 0         # the backend's device allocator, bytes held now (0: not reported)
    device_memory_peak_bytes: int = 0           # its peak since start

    @classmethod
    def from_pb(cls, msg: pb.GetStatsResponse) -> "Stats":
        return cls(msg.num_running, msg.num_waiting, msg.kv_blocks_total, msg.kv_blocks_free,
                   msg.num_preemptions, msg.prefix_cache_queries, msg.prefix_cache_hits,
                   msg.num_waiting_prompt_tokens, msg.num_running_tokens, msg.device_memory_active_bytes,
                   msg.device_memory_peak_bytes)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server (over a limit: INVALID_ARGUMENT)."""

    max_n: int                                  # completions per request
    max_tokens: int | None                      # sampling max_tokens at most; None: the context bounds it
    max_stop_strings: int                       # stop strings per request
    max_stop_string_len: int                    # characters per stop string
    max_message_bytes: int                      # bytes of one request message
    max_prompt_tokens: int | None               # prompt tokens; None: the context (max_model_len - 1)

    @classmethod
    def from_pb(cls, msg: pb.ServerLimits) -> "ServerLimits":
        return cls(msg.max_n, msg.max_tokens if msg.HasField("max_tokens") else None, msg.max_stop_strings,
                   msg.max_stop_string_len, msg.max_message_bytes,
                   msg.max_prompt_tokens if msg.HasField("max_prompt_tokens") else None)


@dataclass(frozen=True)
class ServerInfo:
    """The server's version, how its engine is sized, and its request limits (for routers and operators)."""

    version: str                                # the pagedgen version
    model: str                                  # the served model name
    backend: str                                # "cpu", "cuda", "metal"
    dtype: str                                  # the compute dtype
    weight_format: str                          # a dtype, or a quantized format's name
    max_num_seqs: int                           # requests running at once at most
    max_num_batched_tokens: int                 # tokens per engine step at most
    max_queue: int | None                       # waiting requests at most; None: unbounded
    max_model_len: int                          # prompt plus output tokens of one request at most
    block_size: int                             # tokens per KV block
    num_kv_blocks: int                          # KV blocks in the pool
    limits: ServerLimits

    @classmethod
    def from_pb(cls, msg: pb.GetServerInfoResponse) -> "ServerInfo":
        return cls(msg.version, msg.model, msg.backend, msg.dtype, msg.weight_format, msg.max_num_seqs,
                   msg.max_num_batched_tokens, msg.max_queue if msg.HasField("max_queue") else None,
                   msg.max_model_len, msg.block_size, msg.num_kv_blocks, ServerLimits.from_pb(msg.limits))


def collect_texts(chunks: list[GenerateChunk]) -> list[str]:
    """The whole text of each completion, by index, from a request's chunks."""
    parts: dict[int, list[str]] = {}
    for chunk in chunks:
        parts.setdefault(chunk.index, []).append(chunk.text)
    return ["".join(parts.get(i, [])) for i in range(max(parts, default=-1) + 1)]
