"""Architecture of a decoder model, independent of where it was read from.

A model is one ``ModelConfig``: its sizes plus a small declarative
description of how its family computes (``ArchitectureTraits``: the norm
style, q/k norms, embedding scale, sandwich norms, mixture of experts) and
the per-checkpoint settings (activation, rotary kind and bases per layer,
biases, soft-caps, the attention scale, the sliding-window pattern, the
expert shape). Readers (``model/weights``) derive it from a Hugging Face
config.json or GGUF metadata; every backend's one model implementation reads
it, so a family is a row of ``ARCHITECTURES``, not a model class per backend.

Weights come as a dict of numpy arrays under the canonical (Hugging Face)
names, with the values the Hugging Face checkpoint holds::

    model.embed_tokens.weight                              [vocab, hidden]
    model.layers.{i}.input_layernorm.weight                [hidden]
    model.layers.{i}.self_attn.{q,k,v}_proj.weight         [heads*head_dim, hidden]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias           (attention_bias: Qwen2, Qwen2-MoE)
    model.layers.{i}.self_attn.{q,k}_norm.weight           [head_dim] (qk_norm: Qwen3, Qwen3-MoE, Gemma 3)
    model.layers.{i}.self_attn.o_proj.weight               [hidden, heads*head_dim]
    model.layers.{i}.post_attention_layernorm.weight       [hidden]: the pre-MLP norm; with
                                                           sandwich_norms the norm of the attention output
    model.layers.{i}.pre_feedforward_layernorm.weight      [hidden] (sandwich_norms: the pre-MLP norm)
    model.layers.{i}.post_feedforward_layernorm.weight     [hidden] (sandwich_norms: the MLP output's norm)
    model.layers.{i}.mlp.{gate,up}_proj.weight             [intermediate, hidden] (dense layers)
    model.layers.{i}.mlp.down_proj.weight                  [hidden, intermediate]
    model.layers.{i}.mlp.gate.weight                       [experts, hidden] (MoE layers: the router)
    model.layers.{i}.mlp.experts.{gate,up}_proj.weight     [experts, moe_intermediate, hidden]
    model.layers.{i}.mlp.experts.down_proj.weight          [experts, hidden, moe_intermediate]
    model.layers.{i}.mlp.shared_expert.{gate,up}_proj.weight  [shared_intermediate, hidden] (Qwen2-MoE)
    model.layers.{i}.mlp.shared_expert.down_proj.weight    [hidden, shared_intermediate]
    model.layers.{i}.mlp.shared_expert_gate.weight         [1, hidden]
    model.norm.weight                                      [hidden]
    lm_head.weight                                         [vocab, hidden] (absent when tied)

Q and K projections are in the Hugging Face (rotate-half) layout. Norm
weights are stored as the checkpoint has them; a family whose RMSNorm scales
by ``1 + weight`` (Gemma) says so in ``norm_weight_offset`` and the backends
add it once at load. Fused checkpoint tensors (Phi-3's ``qkv_proj`` and
``gate_up_proj``, per-expert tensors) are split or stacked by the readers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
ACTIVATIONS = ("silu", "gelu_tanh")        # SwiGLU / GeGLU with tanh-approximated GELU


@dataclass(frozen=True)
class LayerAttention:
    """How one layer's attention reads the paged cache (what every attention backend needs per layer)."""

    scale: float                      # softmax scale of q.k
    window: int | None = None         # a query at position p sees keys p - window + 1 .. p; None: 0 .. p
    softcap: float | None = None      # scores -> softcap * tanh(scores / softcap) before the softmax

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None, got {self.window}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be positive or None, got {self.softcap}")


@dataclass(frozen=True)
class ArchitectureTraits:
    """What a family fixes, whatever the sizes of the checkpoint."""

    norm_weight_offset: float = 0.0   # RMSNorm scales by (offset + weight): 1.0 for Gemma
    norm_in_float32: bool = False     # RMSNorm scales in float32 and casts after (Gemma); else casts first (Llama)
    sandwich_norms: bool = False      # norms on the attention and MLP outputs too (Gemma 2/3)
    qk_norm: bool = False             # per-head RMSNorm of q and k before rotary
    scaled_embeddings: bool = False   # token embeddings times sqrt(hidden_size) (Gemma)
    moe: bool = False                 # sparse mixture-of-experts MLP (router + top-k experts)
    display: str = ""                 # the family's name for logs and ModelInfo


_GEMMA = dict(norm_weight_offset=1.0, norm_in_float32=True, sandwich_norms=True, scaled_embeddings=True)
ARCHITECTURES: dict[str, ArchitectureTraits] = {
    "llama": ArchitectureTraits(display="Llama"),
    "mistral": ArchitectureTraits(display="Mistral"),
    "qwen2": ArchitectureTraits(display="Qwen2"),
    "qwen3": ArchitectureTraits(qk_norm=True, display="Qwen3"),
    "gemma2": ArchitectureTraits(**_GEMMA, display="Gemma 2"),
    "gemma3": ArchitectureTraits(**_GEMMA, qk_norm=True, display="Gemma 3 (text)"),
    "phi3": ArchitectureTraits(display="Phi-3"),
    "mixtral": ArchitectureTraits(moe=True, display="Mixtral"),
    "qwen2_moe": ArchitectureTraits(moe=True, display="Qwen2-MoE"),
    "qwen3_moe": ArchitectureTraits(moe=True, qk_norm=True, display="Qwen3-MoE"),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str                   # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int              # the dense MLP (0 when every layer is MoE)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0         # RoPE base of the full-attention layers (all layers unless sliding_rope_theta)
    rope_scaling: dict | None = None    # HF rope_scaling dict (linear, llama3, longrope) of those layers
    tie_word_embeddings: bool = False
    attention_bias: bool = False        # q/k/v projections carry a bias (Qwen2, Qwen2-MoE)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    hidden_act: str = "silu"            # the gated MLP's activation: one of ACTIVATIONS
    partial_rotary_factor: float = 1.0  # share of head_dim that is rotated (Phi-4-mini 0.75); the rest passes
    sliding_rope_theta: float | None = None  # plain RoPE base of the sliding layers (Gemma 3 local); None: as full
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power (Gemma); None: head_dim's
    attn_logit_softcap: float | None = None     # scores -> cap * tanh(scores / cap) before softmax (Gemma 2)
    final_logit_softcap: float | None = None    # logits -> cap * tanh(logits / cap) (Gemma 2/3)
    sliding_window: int | None = None   # keys a sliding layer's query sees, itself included
    layer_types: tuple[str, ...] = ()   # per layer one of LAYER_TYPES; (): every layer full attention
    num_experts: int = 0                # MoE: routed experts per MoE layer
    num_experts_per_tok: int = 0        # MoE: experts each token is routed to (top-k)
    moe_intermediate_size: int = 0      # MoE: one expert's MLP width
    norm_topk_prob: bool = True         # MoE: renormalise the top-k router probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # MoE: a sigmoid-gated shared expert's width (Qwen2-MoE); 0: none
    dense_layers: tuple[int, ...] = ()  # MoE: layers with a dense MLP of intermediate_size instead

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        for name in ("eos_token_ids", "layer_types", "dense_layers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} must rotate an even number "
                             f"(>= 2) of the head_dim={self.head_dim} dims")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        self._check_layers()
        self._check_moe()

    def _check_layers(self) -> None:
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_types entries must be {' or '.join(LAYER_TYPES)}, got {', '.join(bad)}")
        if SLIDING_ATTENTION in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError(f"sliding layers need sliding_window >= 1, got {self.sliding_window!r}")

    def _check_moe(self) -> None:
        if not self.traits.moe:
            if self.num_experts or self.dense_layers or self.shared_expert_intermediate_size:
                raise ValueError(f"{self.architecture} has no mixture of experts, yet num_experts={self.num_experts}")
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts or self.moe_intermediate_size < 1:
            raise ValueError(
                f"a mixture of experts needs 1 <= num_experts_per_tok ({self.num_experts_per_tok}) <= "
                f"num_experts ({self.num_experts}) and moe_intermediate_size >= 1 ({self.moe_intermediate_size})")
        if any(not 0 <= i < self.num_hidden_layers for i in self.dense_layers):
            raise ValueError(f"dense_layers {self.dense_layers} name layers outside 0..{self.num_hidden_layers - 1}")
        if self.dense_layers and self.intermediate_size < 1:
            raise ValueError("dense_layers need intermediate_size >= 1")

    @property
    def traits(self) -> ArchitectureTraits:
        """The family's fixed traits (``ARCHITECTURES[architecture]``)."""
        return ARCHITECTURES[self.architecture]

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (HF: ``int(head_dim * partial_rotary_factor)``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        """The softmax scale of q.k: ``query_pre_attn_scalar ** -0.5`` or ``head_dim ** -0.5``."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embedding_scale(self) -> float | None:
        """The factor the token embeddings are multiplied by (Gemma: sqrt(hidden)), or None."""
        return math.sqrt(self.hidden_size) if self.traits.scaled_embeddings else None

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None for full attention."""
        if self.layer_types and self.layer_types[layer] == SLIDING_ATTENTION:
            return self.sliding_window
        return None

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """``layer_window(i)`` of every layer."""
        return tuple(self.layer_window(i) for i in range(self.num_hidden_layers))

    def layer_attention(self, layer: int) -> LayerAttention:
        """Scale, sliding window and soft-cap of ``layer``'s attention."""
        return LayerAttention(self.attention_scale, self.layer_window(layer), self.attn_logit_softcap)

    def layer_rope(self, layer: int) -> tuple[float, dict | None]:
        """``(rope_theta, rope_scaling)`` of ``layer``: the local base on sliding layers where one is set."""
        if self.sliding_rope_theta is not None and self.layer_window(layer) is not None:
            return self.sliding_rope_theta, None
        return self.rope_theta, self.rope_scaling

    def is_moe_layer(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is the mixture of experts (else dense)."""
        return self.traits.moe and layer not in self.dense_layers

    def describe(self) -> str:
        """A one-line summary for logs: family, layers, windows, experts."""
        parts = [f"{self.traits.display or self.architecture}, {self.num_hidden_layers} layers"]
        windows = [w for w in self.layer_windows if w is not None]
        if windows:
            parts.append(f"{len(windows)} with a {windows[0]}-token sliding window")
        if self.traits.moe:
            parts.append(f"{self.num_experts} experts, top-{self.num_experts_per_tok}"
                         + (", a shared expert" if self.shared_expert_intermediate_size else ""))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)
