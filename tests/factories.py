"""Tiny, deterministic models for tests: Hugging Face directories and GGUF files.

``make_tiny_hf_model`` writes a random llama / qwen2 / mistral model with
transformers' own classes (fixed seed) plus a small real byte-level BPE
tokenizer, so every layer of pagedgen can be checked against transformers
without a download. ``make_tiny_gguf`` writes the same kind of model the way
llama.cpp's converter does (renamed tensors, permuted Q/K rows, optional
quantisation, tokenizer in ``tokenizer.ggml.*``).
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
TOKENIZER_VOCAB_SIZE = 400
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MULTIBYTE_SAMPLES = ("héllo wörld", "café crème brûlée", "日本語のテキスト", "emoji 🙂🚀🎉", "naïve façade Ωμέγα", "Привет мир")

_SUBJECTS = ("The cat", "A small robot", "My neighbour", "The old river", "Every student", "The quiet engineer", "A red kite")
_VERBS = ("watches", "builds", "remembers", "carries", "paints", "follows", "explains")
_OBJECTS = ("the morning light", "a paper boat", "seven green apples", "the long winter", "an open window", "the answer")
_ENDINGS = (".", "!", "?", " today.", " again and again.", ", slowly.", " with care.")


def training_lines() -> list[str]:
    """A few hundred lines of varied English plus multi-byte text to train the tokenizer on."""
    lines = [
        f"{s} {v} {o}{e}"
        for (s, v, o), e in zip(itertools.product(_SUBJECTS, _VERBS, _OBJECTS), itertools.cycle(_ENDINGS))
    ]
    lines += [f"Line {i}: {i * 37 % 1000} items cost ${i * 3}.{i % 100:02d}" for i in range(60)]
    lines += ["def add(a, b):\n    return a + b", "for i in range(10): print(i)", "x = {'key': [1, 2, 3]}"] * 5
    lines += list(MULTIBYTE_SAMPLES) * 2
    return lines


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE once per process; return its JSON serialisation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_lines(), trainer)
    return tokenizer.to_str()


def make_tiny_tokenizer(add_bos_token: bool = False):
    """A fresh ``PreTrainedTokenizerFast`` over the trained BPE, with a ChatML template.

    ``add_bos_token`` makes ``tokenizer(text)`` prepend ``<|endoftext|>`` as BOS
    (Llama-style); by default nothing is added (GPT-2 / SmolLM style).
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_tokenizer_json())
    if add_bos_token:
        bos_id = backend.token_to_id(BOS_TOKEN)
        backend.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
                ),
            ]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS_TOKEN, EOS_TOKEN)],
        chat_template=CHATML_TEMPLATE,
    )


_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}


def make_tiny_hf_model(
    tmp_path: Path,
    arch: str = "llama",
    *,
    tie_word_embeddings: bool = False,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    intermediate_size: int = 128,
    head_dim: int | None = None,
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    attention_bias: bool | None = None,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    add_bos_token: bool = False,
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Write a random tiny ``arch`` model as a Hugging Face directory; return its path.

    Norm weights and biases are randomised too (not left at 1 / 0), so a backend
    that ignores them fails parity. ``attention_bias`` applies to llama only
    (qwen2 always has q/k/v biases, mistral never). ``dtype`` is "float32",
    "bfloat16" or "float16"; ``max_shard_size`` (e.g. "200KB") writes shards
    plus model.safetensors.index.json.
    """
    import torch
    import transformers

    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"arch must be one of {', '.join(_CONFIG_CLASSES)}, got {arch!r}")
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars in test output
    tokenizer = make_tiny_tokenizer(add_bos_token=add_bos_token)
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if arch == "llama" and attention_bias is not None:
        kwargs["attention_bias"] = attention_bias
    config = getattr(transformers, _CONFIG_CLASSES[arch])(**kwargs)

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param_name.endswith(".bias"):
                param.copy_(0.05 * torch.randn_like(param))
    model = model.to(getattr(torch, dtype)).eval()

    out = Path(tmp_path) / (name or f"tiny-{arch}")
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **save_kwargs)
    tokenizer.save_pretrained(out)
    return out


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Rotate-half rows -> llama.cpp's interleaved rows (what its converter writes for Q/K)."""
    halves = weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])  # [h, 2, d/2, ...]
    return halves.swapaxes(1, 2).reshape(weight.shape)                                          # [h, d/2, 2, ...]


_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{kind}"


def make_tiny_gguf(
    tmp_path: Path,
    *,
    arch: str = "llama",
    quant: str = "F32",
    tie_word_embeddings: bool = True,
    add_bos_token: bool = False,
    file_name: str = "tiny-llama.Q8_0.gguf",
    **model_kwargs,
) -> Path:
    """Write a tiny llama GGUF the way llama.cpp converts one; return the file.

    The weights come from ``make_tiny_hf_model(..., arch="llama")`` (saved next
    to the file as ``<tmp_path>/hf-source``). 2-D matrices are stored as
    ``quant`` ("F32" or a ggml type such as "Q8_0"); norms stay F32. With
    ``arch`` other than "llama" only metadata is written, for error tests.
    """
    import gguf

    from model.weights.safetensors_io import read_safetensors

    path = Path(tmp_path) / file_name
    writer = gguf.GGUFWriter(str(path), arch=arch)
    if arch != "llama":
        writer.add_name("not-a-llama")
        writer.add_block_count(1)
        writer.add_context_length(64)
        _write_gguf(writer)
        return path

    source = make_tiny_hf_model(
        tmp_path, "llama", tie_word_embeddings=tie_word_embeddings, add_bos_token=add_bos_token,
        name="hf-source", **model_kwargs,
    )
    hf_config = json.loads((source / "config.json").read_text())
    heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    writer.add_name("tiny llama")
    writer.add_context_length(hf_config["max_position_embeddings"])
    writer.add_embedding_length(hf_config["hidden_size"])
    writer.add_block_count(hf_config["num_hidden_layers"])
    writer.add_feed_forward_length(hf_config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(hf_config["rms_norm_eps"])
    writer.add_rope_freq_base(hf_config["rope_parameters"]["rope_theta"])
    writer.add_rope_dimension_count(hf_config["head_dim"])
    writer.add_vocab_size(hf_config["vocab_size"])
    _add_gguf_tokenizer(writer, source, add_bos_token)

    qtype = gguf.GGMLQuantizationType[quant]
    for hf_name, array in read_safetensors(source / "model.safetensors").items():
        if ".q_proj." in hf_name:
            array = llama_cpp_permute(array, heads)
        elif ".k_proj." in hf_name:
            array = llama_cpp_permute(array, kv_heads)
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(_gguf_name(hf_name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(hf_name), np.ascontiguousarray(array, dtype=np.float32))
    _write_gguf(writer)
    return path


def _add_gguf_tokenizer(writer, source: Path, add_bos_token: bool) -> None:
    """Store the tiny tokenizer as llama.cpp does for a byte-level BPE ("gpt2") vocabulary."""
    spec = json.loads((source / "tokenizer.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in spec["added_tokens"]})
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])  # 3 = control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[BOS_TOKEN])
    writer.add_eos_token_id(vocab[EOS_TOKEN])
    writer.add_add_bos_token(add_bos_token)
    writer.add_chat_template(CHATML_TEMPLATE)


def _write_gguf(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
