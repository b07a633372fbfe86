"""A Llama-family model in torch, shared by the cpu and cuda backends.

``LlamaModel`` runs the flattened tokens of a step; attention over the paged
KV cache is delegated to an ``AttentionBackend`` chosen by the device backend.
"""

from backends.torch_model.attention import AttentionBackend, KVCache
from backends.torch_model.model import LlamaModel, rms_norm
from backends.torch_model.rope import apply_rope, compute_inv_freq, rope_cos_sin
from backends.torch_model.weights import LayerWeights, ModelWeights, load_weights, torch_dtype

__all__ = [
    "AttentionBackend",
    "KVCache",
    "LayerWeights",
    "LlamaModel",
    "ModelWeights",
    "apply_rope",
    "compute_inv_freq",
    "load_weights",
    "rms_norm",
    "rope_cos_sin",
    "torch_dtype",
]
