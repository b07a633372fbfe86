"""What a server reports about the model it serves (the ModelInfo rpc, the
OpenAI model list): read from an ``LLMEngine`` once it is built, in whichever
process builds it, and small enough to cross a pipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class ModelInfo:
    model: str                          # the model's name (its directory or GGUF file stem)
    max_model_len: int                  # prompt plus generated tokens of one request, at most
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    block_size: int                     # tokens per KV block
    num_kv_blocks: int                  # KV blocks allocated on the device
    backend: str                        # the backend's registry name ("cpu", "cuda", "metal")
    dtype: str                          # the dtype the backend runs in ("auto" resolved)
    architecture: str = ""              # the model family (model.config.SUPPORTED_ARCHITECTURES), e.g. "qwen3"
    weight_format: str = ""             # how the backend holds the weights: its dtype ("bfloat16") when dense,
                                        # else the quantized formats, most tensors first ("Q4_1+Q8_0", "mlx-affine")

    @classmethod
    def of(cls, engine: LLMEngine) -> ModelInfo:
        """The description of a built engine; ``max_model_len`` is what one request can hold (cache included)."""
        return cls(model=engine.model.name, max_model_len=engine.scheduler.config.max_tokens_per_request,
                   vocab_size=engine.tokenizer.vocab_size, eos_token_ids=tuple(engine.tokenizer.eos_token_ids),
                   block_size=engine.scheduler.config.block_size, num_kv_blocks=engine.scheduler.config.num_kv_blocks,
                   backend=engine.backend_name, dtype=engine.dtype, architecture=engine.model_config.architecture,
                   weight_format=engine.weight_format)
