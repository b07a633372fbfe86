"""Tiny random models of every served family, written by transformers, and their greedy oracle.

``make_family_model(tmp_path, family)`` writes a Hugging Face directory of
a 2-3 layer, hidden-64 model of ``family`` (one of ``FAMILIES``) with the
tiny tokenizer of ``tests.factories``; each family's settings are chosen so
that what makes it different is exercised: windows smaller than the test
prompts, soft-caps small enough to bend the scores, a non-default attention
scale, per-layer RoPE bases, partial rotary with LongRoPE whose switch length
the prompts cross, experts with and without renormalisation, a shared
expert and a dense layer among MoE layers. ``hf_greedy`` is transformers'
own greedy decoding of those directories, the token-for-token oracle.

``family_dir`` and ``hf_reference`` keep one directory per family and one
oracle run per prompt set for the whole test session (every backend's tests
compare with the same tokens), in a temporary directory removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

WINDOW = 8                    # the sliding window of the windowed families; test prompts are longer
FAMILIES = ("qwen3", "gemma2", "gemma3", "phi3", "mistral", "mixtral", "qwen3_moe", "qwen2_moe")
WINDOWED = ("gemma2", "gemma3", "mistral")
PHI3_ORIGINAL_MAX = 64        # Phi-3's LongRoPE switches to the long factors past this many tokens

_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
_SETTINGS = {
    "qwen3": ("Qwen3Config", dict(head_dim=32)),                                        # head_dim decoupled
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                    attn_logit_softcapping=4.0, final_logit_softcapping=6.0)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, num_hidden_layers=3, sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        query_pre_attn_scalar=12, final_logit_softcapping=8.0,
                                        rope_parameters={
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1000000.0}})),
    "phi3": ("Phi3Config", dict(original_max_position_embeddings=PHI3_ORIGINAL_MAX,
                                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5,
                                                 "short_factor": [1.0, 1.5, 2.0, 3.0],
                                                 "long_factor": [2.0, 3.0, 5.0, 8.0],
                                                 "original_max_position_embeddings": PHI3_ORIGINAL_MAX},
                                partial_rotary_factor=0.5)),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_hidden_layers=3, moe_intermediate_size=32, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
}


def make_family_model(tmp_path: Path, family: str, seed: int = 0, **overrides) -> Path:
    """Write a random tiny ``family`` model (float32) as a Hugging Face directory; return its path.

    Matrices are drawn with a wider spread than transformers' init (std 0.1)
    and norm weights around their neutral value, so that logits differ by far
    more than rounding and a backend that skips a norm fails parity.
    """
    import torch
    import transformers

    from tests.factories import make_tiny_tokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    config_class, settings = _SETTINGS[family]
    tokenizer = make_tiny_tokenizer()
    kwargs = {**_BASE, **settings, **overrides, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id}
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(p))     # Gemma scales by 1 + weight
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    out = Path(tmp_path) / f"tiny-{family}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def hf_model(path: Path):
    """The directory loaded by transformers in float32 (eager attention where it soft-caps)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' greedy decoding of ``n`` tokens that, like ignore_eos, neither stops at nor masks EOS."""
    import torch

    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def random_prompts(n: int, seed: int, low: int = 12, high: int = 48, vocab: int = 300) -> list[list[int]]:
    """``n`` prompts of random token ids, ``low`` to ``high`` tokens long (all longer than ``WINDOW``)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(10, vocab, int(rng.integers(low, high))).tolist() for _ in range(n)]


@functools.lru_cache(maxsize=None)
def _session_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="pagedgen-families-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.lru_cache(maxsize=None)
def family_dir(family: str) -> Path:
    """The session's tiny ``family`` directory (written on first use)."""
    return make_family_model(_session_root() / family, family)


@functools.lru_cache(maxsize=None)
def _hf_model_of(family: str):
    return hf_model(family_dir(family))


@functools.lru_cache(maxsize=None)
def hf_reference(family: str, prompts: tuple[tuple[int, ...], ...], n: int) -> tuple[tuple[int, ...], ...]:
    """transformers' greedy ``n`` tokens for each of ``prompts`` on ``family_dir(family)``, once per session."""
    model = _hf_model_of(family)
    return tuple(tuple(hf_greedy(model, list(p), n)) for p in prompts)
