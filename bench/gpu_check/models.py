"""The GPU check's models, built on the box: nothing comes from a hub or the default-model package.

- ``tiny_hf_dir``: a random tiny Llama as a Hugging Face directory (weights,
  config, the tests' byte-level BPE tokenizer; ``tests.factories``), what
  ``pagedgen serve`` loads in section (g);
- ``build_random_model``: a Llama of ``SPECS[name]`` (the 8B shape on the
  GPU) as transformers' own ``LlamaForCausalLM`` with its random init, drawn
  directly on the device in the model dtype, plus the fused ``ModelWeights``
  the cuda backend runs, sharing every tensor that needs no fusion. The
  directory holds ``config.json`` (read back through the real loader's
  ``model_config_from_hf``) and the tokenizer, padded with added tokens to
  the model's vocabulary so every id decodes; the 16 GB of weights stay in
  GPU memory (writing and re-reading them would cost a minute of the
  check's eight).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SPECS = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
                 rope_theta=10000.0, rope_scaling=None),
}


def tiny_hf_dir(root: Path) -> Path:
    """A random tiny Llama directory under ``root`` (float32 safetensors + tokenizer)."""
    from tests.factories import make_tiny_hf_model

    return make_tiny_hf_model(root, "llama", name="tiny-llama-random", max_position_embeddings=1024, seed=0)


def padded_tokenizer(vocab_size: int):
    """The tests' tokenizer (``make_tiny_tokenizer``) with added tokens up to ``vocab_size`` ids."""
    from tests.factories import make_tiny_tokenizer

    hf = make_tiny_tokenizer()
    if len(hf) > vocab_size:
        raise ValueError(f"the tokenizer has {len(hf)} tokens, more than the model's {vocab_size}")
    hf.add_tokens([f"<|random_{i}|>" for i in range(len(hf), vocab_size)])
    return hf


@dataclass
class RandomModel:
    """A random Llama in memory: transformers' model and the backend's fused view of the same tensors."""

    name: str                  # e.g. "llama-3.1-8b-random"
    path: Path                 # config.json + tokenizer
    config: Any                # model.config.ModelConfig, read back from config.json
    tokenizer: Any             # engine.tokenizer.Tokenizer
    hf_model: Any | None       # transformers LlamaForCausalLM (None once dropped)
    weights: Any               # backends.torch_model.weights.ModelWeights

    def drop_hf_model(self) -> None:
        """Free the tensors only transformers uses (q/k/v and gate/up; the rest is shared)."""
        self.hf_model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fused_weights(hf_model):
    """``ModelWeights`` of a transformers Llama: q/k/v and gate/up concatenated, everything else shared."""
    from backends.torch_model.weights import LayerWeights, ModelWeights

    with torch.no_grad():
        layers = []
        for layer in hf_model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(LayerWeights(
                input_norm=layer.input_layernorm.weight.detach(),
                qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
                qkv_bias=None, o_proj=attn.o_proj.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                down=mlp.down_proj.weight.detach()))
        return ModelWeights(embed=hf_model.model.embed_tokens.weight.detach(), layers=layers,
                            final_norm=hf_model.model.norm.weight.detach(), lm_head=hf_model.lm_head.weight.detach())


def build_random_model(root: Path, name: str, dtype: torch.dtype, device: str, seed: int = 0) -> RandomModel:
    """The ``SPECS[name]`` Llama with random weights on ``device`` (see the module docstring)."""
    import transformers

    from engine.tokenizer import Tokenizer
    from model.weights.hf_reader import model_config_from_hf, read_config_json

    spec = dict(SPECS[name])
    rope = {**(spec.pop("rope_scaling") or {"rope_type": "default"}), "rope_theta": spec.pop("rope_theta")}
    hf_tokenizer = padded_tokenizer(spec["vocab_size"])
    hf_config = transformers.LlamaConfig(**spec, tie_word_embeddings=False, bos_token_id=hf_tokenizer.bos_token_id,
                                         eos_token_id=hf_tokenizer.eos_token_id, pad_token_id=None)
    if hasattr(hf_config, "rope_parameters"):          # transformers 5
        hf_config.rope_parameters = rope
    else:
        hf_config.rope_theta = rope.pop("rope_theta")
        hf_config.rope_scaling = rope if rope.get("rope_type") != "default" else None
    path = Path(root) / f"{name}-random"
    path.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(path)
    hf_tokenizer.save_pretrained(path)
    config = model_config_from_hf(read_config_json(path), path)[0]
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)                     # initialised in the model dtype, on the device
    try:
        with torch.device(device):
            hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    tokenizer = Tokenizer(hf_tokenizer, extra_eos_token_ids=config.eos_token_ids)
    return RandomModel(f"{name}-random", path, config, tokenizer, hf_model, fused_weights(hf_model))
