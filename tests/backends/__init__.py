"""Builders for backend tests: tiny random HF models and hand-made steps.

``tiny_model`` builds a random transformers model (nothing is downloaded),
its float32 weights under the canonical names and an equivalent
``ModelConfig``. ``PagedSequence`` plays the scheduler for one request: it
owns a block table (any block ids the test hands it) and turns the next
chunk of tokens into a ``ScheduledRequest`` with the right slot mapping.
"""

from __future__ import annotations

import numpy as np
import torch

from model.config import ModelConfig
from engine.sampling_params import SamplingParams
from scheduler.output import ScheduledRequest, SchedulerOutput

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def model_config_from_hf(hf_config, architecture: str) -> ModelConfig:
    """The ``ModelConfig`` of a transformers config (test-only stand-in for the real loader)."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    eos = hf_config.eos_token_id
    return ModelConfig(
        architecture=architecture,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        max_position_embeddings=hf_config.max_position_embeddings,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        attention_bias=architecture == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        eos_token_ids=() if eos is None else tuple(eos if isinstance(eos, list) else [eos]),
    )


def tiny_model(architecture: str = "llama", seed: int = 0, **overrides):
    """``(hf_model, ModelConfig, weights)`` of a small random model in eval mode.

    Weights are drawn with a wider spread than HF's init so that logits
    differ by more than rounding between positions.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[architecture]
    hf_config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    hf_model = model_cls(hf_config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.1)
    weights = {k: v.detach().float().numpy().copy() for k, v in hf_model.state_dict().items()}
    if hf_config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return hf_model, model_config_from_hf(hf_config, architecture), weights


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """Float32 logits ``[L, V]`` of one full forward of transformers."""
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


class PagedSequence:
    """One request's tokens and block table; emits its chunks as ``ScheduledRequest``."""

    def __init__(self, request_id: str, token_ids: list[int], block_ids: list[int], block_size: int,
                 params: SamplingParams | None = None) -> None:
        if len(block_ids) * block_size < len(token_ids):
            raise ValueError("not enough blocks for the tokens")
        self.request_id = request_id
        self.token_ids = list(token_ids)
        self.block_ids = list(block_ids)
        self.block_size = block_size
        self.params = params or SamplingParams(temperature=0.0)
        self.num_computed_tokens = 0

    def chunk(self, num_tokens: int, needs_sample: bool = True) -> ScheduledRequest:
        """The next ``num_tokens`` tokens as one scheduled chunk (advances the sequence)."""
        start = self.num_computed_tokens
        positions = range(start, start + num_tokens)
        if positions.stop > len(self.token_ids):
            raise ValueError("chunk runs past the known tokens")
        bs = self.block_size
        request = ScheduledRequest(
            request_id=self.request_id,
            token_ids=self.token_ids[start:positions.stop],
            num_computed_tokens=start,
            block_table=list(self.block_ids),
            slot_mapping=[self.block_ids[p // bs] * bs + p % bs for p in positions],
            sampling_params=self.params,
            needs_sample=needs_sample,
            prompt_token_ids=list(self.token_ids),
        )
        self.num_computed_tokens = positions.stop
        return request


def step(requests: list[ScheduledRequest], block_size: int) -> SchedulerOutput:
    return SchedulerOutput(scheduled=requests, block_size=block_size)


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()
