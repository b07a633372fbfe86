"""Architecture of a Llama-family model, independent of where it was read from.

Weight readers (``engine/weights``) produce a ``ModelConfig`` and a dict of
numpy arrays under the canonical (Hugging Face Llama) names::

    model.embed_tokens.weight                       [vocab, hidden]
    model.layers.{i}.input_layernorm.weight         [hidden]
    model.layers.{i}.self_attn.{q,k,v}_proj.weight  [heads*head_dim, hidden]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias    (Qwen2 only)
    model.layers.{i}.self_attn.o_proj.weight        [hidden, heads*head_dim]
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up}_proj.weight      [intermediate, hidden]
    model.layers.{i}.mlp.down_proj.weight           [hidden, intermediate]
    model.norm.weight                               [hidden]
    lm_head.weight                                  [vocab, hidden] (absent when tied)

Q and K projections are in the Hugging Face (rotate-half) layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str                   # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # HF rope_scaling dict (e.g. Llama-3 "llama3")
    tie_word_embeddings: bool = False
    attention_bias: bool = False        # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)
