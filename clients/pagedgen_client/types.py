"""Typed results of the client, converted from the wire messages."""

from __future__ import annotations

from dataclasses import dataclass

from ._proto.pagedgen.v1 import generate_pb2 as pb

_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


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

    @classmethod
    def from_pb(cls, msg: pb.ModelInfoResponse) -> "ModelInfo":
        return cls(msg.model, msg.max_model_len, msg.vocab_size, tuple(msg.eos_token_ids),
                   msg.block_size, msg.num_kv_blocks, msg.backend, msg.dtype)


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

    @classmethod
    def from_pb(cls, msg: pb.GetStatsResponse) -> "Stats":
        return cls(msg.num_running, msg.num_waiting, msg.kv_blocks_total, msg.kv_blocks_free,
                   msg.num_preemptions, msg.prefix_cache_queries, msg.prefix_cache_hits)


def collect_texts(chunks: list[GenerateChunk]) -> list[str]:
    """The whole text of each completion, by index, from a request's chunks."""
    parts: dict[int, list[str]] = {}
    for chunk in chunks:
        parts.setdefault(chunk.index, []).append(chunk.text)
    return ["".join(parts.get(i, [])) for i in range(max(parts, default=-1) + 1)]
