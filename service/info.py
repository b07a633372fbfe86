"""What a server says about itself (the GetServerInfo rpc, HTTP ``/version``).

``ServerInfo`` gathers, once per call, the facts a router or an operator
needs: the pagedgen version, the loaded model's device form, how the engine
was sized (``EngineArgs``) and the per-request limits both front ends enforce
(``service.limits.RequestLimits``, the message size, the prompt length).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from service.limits import RequestLimits

DISTRIBUTION = "pagedgen"           # the distribution whose version the server reports


def pagedgen_version() -> str:
    """The installed ``pagedgen`` distribution's version ("unknown" when run from a bare checkout)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ServerInfo:
    version: str                        # the pagedgen version
    model: str                          # the served model name (--served-model-name, else the model's)
    backend: str                        # "cpu", "cuda", "metal"
    dtype: str                          # the compute dtype the backend runs in
    weight_format: str                  # how the weights are stored: a dtype, or a quantized format's name
    max_num_seqs: int                   # running requests at most
    max_num_batched_tokens: int         # tokens per step at most
    max_queue: int | None               # waiting requests at most; None: unbounded
    max_model_len: int                  # prompt plus output tokens of one request at most
    block_size: int                     # tokens per KV block
    num_kv_blocks: int                  # KV blocks in the pool
    limits: RequestLimits               # n, max_tokens, stop strings per request
    max_message_bytes: int              # bytes of one request message or HTTP body at most
    max_prompt_tokens: int | None       # prompt tokens at most; None: max_model_len - 1

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_kv_blocks",
                     "max_message_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def of(cls, engine, *, limits: RequestLimits, max_message_bytes: int,
           served_model_name: str | None = None) -> ServerInfo:
        """The description of a server over ``engine`` (an ``AsyncEngine``: its ``args`` and ``model_info``)."""
        info, args = engine.model_info, engine.args
        return cls(version=pagedgen_version(), model=served_model_name or info.model, backend=info.backend,
                   dtype=info.dtype, weight_format=info.weight_format or info.dtype,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   max_queue=args.max_queue, max_model_len=info.max_model_len, block_size=info.block_size,
                   num_kv_blocks=info.num_kv_blocks, limits=limits, max_message_bytes=max_message_bytes,
                   max_prompt_tokens=args.max_prompt_tokens)
