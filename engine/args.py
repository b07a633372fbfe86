"""Engine options, validated once, shared by the offline API, the service and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, fields

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_KV_CACHE_MEMORY = 1 << 30       # 1 GiB of KV cache on the CPU when nothing is said


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = None            # None: the embedded default (SmolLM2-135M-Instruct GGUF)
    backend: str = "auto"               # auto | cpu | cuda | metal
    dtype: str = "float32"              # compute and KV cache dtype
    kv_cache_memory: int | None = None  # bytes for the KV cache; default DEFAULT_KV_CACHE_MEMORY
    num_kv_blocks: int | None = None    # explicit block count, overrides kv_cache_memory
    max_num_seqs: int = 256             # running requests per step at most
    max_num_batched_tokens: int = 2048  # tokens per step at most (chunked prefill beyond)
    max_model_len: int | None = None    # context limit; default the model's
    block_size: int = 16                # tokens per KV block
    seed: int = 0                       # seed of unseeded sampling
    enable_prefix_caching: bool = True
    max_queue: int | None = None        # waiting requests at most (async engine); None: unbounded
    max_prompt_tokens: int | None = None  # prompt tokens per request at most; None: max_model_len - 1
    num_threads: int | None = None      # CPU threads for the cpu backend; None: all cores
    tensor_parallel_size: int = 1       # ranks the model is split over (worker processes; backends/tp)
    gpu_memory_utilization: float = 0.9  # cuda: share of GPU memory this engine may use (KV cache sized from it)
    cuda_graph_mode: str = "full"       # cuda: none | piecewise | full

    def __post_init__(self) -> None:
        from backends.base import BACKEND_NAMES

        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size")
        optional_positive = ("kv_cache_memory", "num_kv_blocks", "max_model_len", "num_threads", "max_prompt_tokens")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in optional_positive:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_queue is not None and (not isinstance(self.max_queue, int) or self.max_queue < 0):
            raise ValueError(f"max_queue must be a non-negative integer, got {self.max_queue!r}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.cuda_graph_mode not in ("none", "piecewise", "full"):
            raise ValueError(f"cuda_graph_mode must be one of none, piecewise, full, got {self.cuda_graph_mode!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
