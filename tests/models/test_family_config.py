"""Each family's config.json (and GGUF metadata) read into the one architecture description, and the errors.

What the readers derive is checked field by field against the transformers
configs that wrote the directories; the errors a user meets (an unsupported
family or class, a missing tensor, a wrong shape, an unknown GGUF
architecture) must be one message naming the file, raised before any tensor
is read.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engine.model_loader import load_model
from model.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from model.weights import hf_reader, safetensors_io
from model.weights.hf_config import model_config_from_hf
from model.weights.safetensors_io import read_safetensors, write_safetensors
from tests.models import FAMILIES, WINDOW, family_dir
from tests.models.gguf_writer import write_gguf

S, F = SLIDING_ATTENTION, FULL_ATTENTION


@pytest.fixture(scope="module")
def dirs():
    return {family: family_dir(family) for family in FAMILIES}


def config_of(path) -> ModelConfig:
    return model_config_from_hf(json.loads((path / "config.json").read_text()), path)[0]


def test_each_family_is_described_by_its_config(dirs):
    qwen3, gemma2, gemma3, phi3 = (config_of(dirs[f]) for f in ("qwen3", "gemma2", "gemma3", "phi3"))
    assert (qwen3.architecture, qwen3.head_dim, qwen3.traits.qk_norm, qwen3.layer_windows) == ("qwen3", 32, True,
                                                                                                (None, None))
    assert gemma2.layer_types == (S, F) and gemma2.layer_windows == (WINDOW, None)
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap, gemma2.attention_scale) == (4.0, 6.0, 0.25)
    assert gemma3.attention_scale == 12 ** -0.5
    assert gemma2.hidden_act == "gelu_tanh" and gemma2.traits.norm_weight_offset == 1.0 and gemma2.embedding_scale == 8
    assert gemma3.layer_windows == (WINDOW, None, WINDOW) and gemma3.attn_logit_softcap is None
    assert gemma3.layer_rope(0) == (10000.0, None)
    assert gemma3.layer_rope(1) == (1e6, {"rope_type": "linear", "factor": 2.0})
    assert phi3.rotary_dim == 8 and phi3.rope_scaling["rope_type"] == "longrope"
    assert phi3.rope_scaling["original_max_position_embeddings"] == 64
    assert config_of(dirs["mistral"]).layer_windows == (WINDOW, WINDOW)


def test_the_expert_shapes(dirs):
    mixtral, qwen3_moe, qwen2_moe = (config_of(dirs[f]) for f in ("mixtral", "qwen3_moe", "qwen2_moe"))
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size) == (4, 2, 64)
    assert mixtral.norm_topk_prob and not mixtral.dense_layers
    assert qwen3_moe.dense_layers == (1,) and qwen3_moe.norm_topk_prob and qwen3_moe.traits.qk_norm
    assert [qwen3_moe.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert qwen2_moe.shared_expert_intermediate_size == 48 and not qwen2_moe.norm_topk_prob
    assert qwen2_moe.attention_bias


def test_fused_and_per_expert_tensors_become_canonical(dirs):
    phi3 = hf_reader.read_hf_dir(dirs["phi3"])
    stored = read_safetensors(dirs["phi3"] / "model.safetensors")
    qkv = stored["model.layers.0.self_attn.qkv_proj.weight"]
    q_rows = 4 * 16
    np.testing.assert_array_equal(phi3.weights["model.layers.0.self_attn.q_proj.weight"], qkv[:q_rows])
    np.testing.assert_array_equal(phi3.weights["model.layers.0.self_attn.v_proj.weight"], qkv[q_rows + 32:])
    gate_up = stored["model.layers.1.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(phi3.weights["model.layers.1.mlp.up_proj.weight"], gate_up[128:])
    mixtral = hf_reader.read_hf_dir(dirs["mixtral"])
    stored = read_safetensors(dirs["mixtral"] / "model.safetensors")
    experts = mixtral.weights["model.layers.1.mlp.experts.up_proj.weight"]                # [E, I, hidden]
    assert experts.shape == (4, 64, 64)
    np.testing.assert_array_equal(experts[2], stored["model.layers.1.block_sparse_moe.experts.2.w3.weight"])


def test_windows_no_longer_cap_max_model_len_and_model_info_is_honest(dirs):
    from engine import LLM

    loaded = load_model(dirs["mistral"])
    assert loaded.max_model_len == 256 and loaded.config.sliding_window == WINDOW
    llm = LLM(str(dirs["gemma3"]), num_kv_blocks=4, block_size=16)
    from engine.model_info import ModelInfo

    from pagedgen_client.types import ModelInfo as ClientModelInfo
    from service import convert

    info = ModelInfo.of(llm.engine)
    assert info.architecture == "gemma3"
    assert info.max_model_len == 64                        # 4 blocks of 16: what one request can hold
    assert ClientModelInfo.from_pb(convert.model_info_to_pb(info)).architecture == "gemma3"   # the ModelInfo rpc


def _copy(src, dst, edit=None, weights=None):
    shutil.copytree(src, dst)
    if edit is not None:
        raw = json.loads((dst / "config.json").read_text())
        edit(raw)
        (dst / "config.json").write_text(json.dumps(raw))
    if weights is not None:
        tensors = read_safetensors(dst / "model.safetensors")
        weights(tensors)
        write_safetensors(dst / "model.safetensors", tensors)
    return dst


def test_unsupported_family_and_class_are_named_with_the_file(dirs, tmp_path):
    gemma3_mm = _copy(dirs["gemma3"], tmp_path / "mm", lambda raw: raw.update(model_type="gemma3"))
    with pytest.raises(ValueError, match=r"mm/config.json: model_type 'gemma3' is not supported \(the multimodal"):
        load_model(gemma3_mm)
    classifier = _copy(dirs["qwen3"], tmp_path / "cls",
                       lambda raw: raw.update(architectures=["Qwen3ForSequenceClassification"]))
    with pytest.raises(ValueError, match=r"cls/config.json: architectures \['Qwen3ForSequenceClassification'\] "
                                         r"is not supported for model_type 'qwen3'"):
        load_model(classifier)


def _no_tensor_reads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a tensor was read before the error")

    monkeypatch.setattr(hf_reader, "read_safetensors", fail)
    monkeypatch.setattr(safetensors_io, "read_safetensors", fail)


def test_missing_tensor_and_wrong_shape_fail_before_any_tensor_is_read(dirs, tmp_path, monkeypatch):
    missing = _copy(dirs["gemma2"], tmp_path / "missing",
                    weights=lambda t: t.pop("model.layers.1.post_feedforward_layernorm.weight"))
    misshapen = _copy(dirs["qwen2_moe"], tmp_path / "misshapen",
                      weights=lambda t: t.update({"model.layers.0.mlp.experts.3.up_proj.weight": np.zeros((16, 64))}))
    _no_tensor_reads(monkeypatch)
    with pytest.raises(ValueError, match=r"missing: the safetensors files lack tensors the config implies: "
                                         r"model.layers.1.post_feedforward_layernorm.weight"):
        load_model(missing)
    with pytest.raises(ValueError, match=r"misshapen/model.safetensors: tensor model.layers.0.mlp.experts.3.up_proj"
                                         r".weight has shape \(16, 64\), the config .* implies \(32, 64\)"):
        load_model(misshapen)


def test_gguf_errors_name_the_file_before_dequantising(dirs, tmp_path, monkeypatch):
    import gguf.quants

    from tests.factories import make_tiny_gguf

    unknown = make_tiny_gguf(tmp_path, arch="falcon", file_name="falcon.gguf")
    monkeypatch.setenv("PAGEDGEN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"falcon.gguf: GGUF architecture 'falcon' is not supported; pagedgen reads "
                                         r"llama, qwen2, qwen3"):
        load_model(unknown)
    wrong = write_gguf(dirs["qwen3"], tmp_path / "wrong.gguf", num_kv_heads=1)
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: pytest.fail("dequantised before the check"))
    with pytest.raises(ValueError, match=r"wrong.gguf: tensor blk.0.attn_k.weight has shape \(64, 64\), "
                                         r"the metadata implies \(32, 64\)"):
        load_model(wrong)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_tensor_parallelism_refuses_experts_and_splits_dense_families(dirs):
    from backends.tp.sharding import check_tp_size, shard_config, valid_tp_sizes

    with pytest.raises(ValueError, match="Mixtral is a mixture of experts, which tensor parallelism does not split"):
        check_tp_size(config_of(dirs["mixtral"]), 2)
    gemma3 = config_of(dirs["gemma3"])
    assert valid_tp_sizes(gemma3) == [1, 2]
    shard = shard_config(gemma3, 2)
    assert (shard.num_attention_heads, shard.attention_scale, shard.layer_windows) == (2, gemma3.attention_scale,
                                                                                      gemma3.layer_windows)
