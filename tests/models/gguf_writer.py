"""Write a tiny Hugging Face directory as GGUF the way llama.cpp's converter does, with the ``gguf`` package.

Covered: ``qwen3``, ``gemma2``, ``gemma3`` (text) and ``qwen3moe``. What the
converter does and pagedgen's reader must undo or derive: llama.cpp tensor
names (``blk.N.attn_q``, ``post_attention_norm``, ``ffn_gate_exps`` ...),
Gemma's norm weights stored plus one, experts stacked into 3-D tensors, no
Q/K permutation (these families use NeoX RoPE), the settings in
``{arch}.*`` metadata keys, and the tokenizer in ``tokenizer.ggml.*``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.factories import _add_gguf_tokenizer, _write_gguf

GGUF_ARCH = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3", "qwen3_moe": "qwen3moe"}
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
}
_SANDWICH = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm"}
_EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def write_gguf(source: Path, path: Path, num_kv_heads: int | None = None) -> Path:
    """Convert the HF directory ``source`` (written by ``make_family_model``) into the GGUF file ``path``.

    ``num_kv_heads`` writes that head count instead of the model's (a file whose metadata lies).
    """
    import gguf

    from model.weights.safetensors_io import read_safetensors

    raw = json.loads((source / "config.json").read_text())
    arch = GGUF_ARCH[raw["model_type"]]
    gemma = arch.startswith("gemma")
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(raw["max_position_embeddings"])
    writer.add_embedding_length(raw["hidden_size"])
    writer.add_block_count(raw["num_hidden_layers"])
    writer.add_feed_forward_length(raw["intermediate_size"])
    writer.add_head_count(raw["num_attention_heads"])
    writer.add_head_count_kv(num_kv_heads or raw["num_key_value_heads"])
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(raw["rms_norm_eps"])
    rope = raw["rope_parameters"].get("full_attention", raw["rope_parameters"])
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if gemma:
        writer.add_sliding_window(raw["sliding_window"])
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in raw["layer_types"]])
        if raw.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(raw["final_logit_softcapping"])
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(raw["attn_logit_softcapping"])
    if arch == "qwen3moe":
        writer.add_expert_count(raw["num_local_experts"])
        writer.add_expert_used_count(raw["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(raw["moe_intermediate_size"])
        writer.add_expert_weights_norm(bool(raw["norm_topk_prob"]))
    _add_gguf_tokenizer(writer, source, add_bos_token=False)

    tensors = read_safetensors(source / "model.safetensors")
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, array in tensors.items():
        if gemma and name.endswith("norm.weight"):
            array = array + np.float32(1.0)                  # llama.cpp stores Gemma's 1 + weight
        if ".experts." in name:                              # model.layers.L.mlp.experts.E.proj.weight
            _, _, layer, _, _, expert, proj, _ = name.split(".")
            experts.setdefault(f"blk.{layer}.{_EXPERTS[proj]}.weight", {})[int(expert)] = array
            continue
        writer.add_tensor(_gguf_name(name, gemma), np.ascontiguousarray(array, dtype=np.float32))
    for gguf_name, by_expert in experts.items():
        stacked = np.stack([by_expert[e] for e in sorted(by_expert)])   # [E, out, in]
        writer.add_tensor(gguf_name, np.ascontiguousarray(stacked, dtype=np.float32))
    _write_gguf(writer)
    return path


def _gguf_name(hf_name: str, gemma: bool) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    names = {**_LAYER, **(_SANDWICH if gemma else {"post_attention_layernorm": "ffn_norm"})}
    return f"blk.{layer}.{names[module]}.{kind}"
