"""Hugging Face transformers ``generate()`` on the same weights: the baseline.

Static batches, left-padded, greedy; each batch runs until its longest
requested output, as a user of plain transformers would serve a batch.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.datasets import BenchRequest
from model.config import ModelConfig


def hf_baseline_model(loaded, dtype: torch.dtype = torch.float32):
    """The baseline of a loaded model: transformers' own load of a Hugging Face directory
    (every family), or ``build_hf_model`` from the weights of a GGUF (Llama and Qwen2)."""
    from transformers import AutoModelForCausalLM

    if loaded.path.is_dir():
        return AutoModelForCausalLM.from_pretrained(loaded.path, dtype=dtype).eval()
    return build_hf_model(loaded.config, loaded.weights, dtype)


def build_hf_model(config: ModelConfig, weights: dict[str, np.ndarray], dtype: torch.dtype = torch.float32):
    """A transformers model with exactly our weights (the parity oracle and the baseline; Llama and Qwen2)."""
    import transformers

    if config.architecture not in ("llama", "mistral", "qwen2") or config.sliding_window is not None:
        raise ValueError(f"build_hf_model builds Llama and Qwen2 models, not {config.architecture}; "
                         f"compare against the model's Hugging Face directory instead")

    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids) or None,
    )
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {**config.rope_scaling, "rope_theta": config.rope_theta}
    if config.architecture == "qwen2":
        hf_config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        hf_config = transformers.LlamaConfig(**common, head_dim=config.head_dim,
                                             attention_bias=config.attention_bias, mlp_bias=False)
        cls = transformers.LlamaForCausalLM
    # transformers 5 keeps rope settings in rope_parameters; 4.x in rope_theta / rope_scaling.
    if hasattr(hf_config, "rope_parameters"):
        hf_config.rope_parameters = rope
    else:
        hf_config.rope_theta = config.rope_theta
        hf_config.rope_scaling = config.rope_scaling
    model = cls(hf_config)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the HF model: missing={missing[:5]} unexpected={unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype).eval()
    return model


def run_hf(model, requests: list[BenchRequest], batch_size: int, pad_token_id: int) -> dict:
    """Generate every request in static batches; returns timing and token counts."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)          # [B, S]
        mask = torch.zeros((len(batch), width), dtype=torch.long)                      # [B, S]
        for row, r in enumerate(batch):
            n = len(r.prompt_token_ids)
            ids[row, width - n:] = torch.tensor(r.prompt_token_ids)
            mask[row, width - n:] = 1
        max_new = max(r.max_tokens for r in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                           min_new_tokens=max_new, do_sample=False, pad_token_id=pad_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(r.max_tokens for r in requests)
    in_tokens = sum(len(r.prompt_token_ids) for r in requests)
    return {"elapsed_s": elapsed, "output_tokens": out_tokens, "prompt_tokens": in_tokens,
            "output_tokens_per_s": out_tokens / elapsed, "requests_per_s": len(requests) / elapsed}
