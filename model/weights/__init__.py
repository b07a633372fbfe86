"""Weight readers: GGUF and Hugging Face safetensors (plain, or MLX-quantized).

Every reader returns a ``ModelConfig`` and a dict under the canonical names
(``model.weights.canonical``) of float32, C-contiguous numpy arrays; with
``keep_quantized`` the quantized matrices stay packed instead, as
``model.weights.quant.QuantizedTensor`` (affine groups: ``gguf_quant`` and
``mlx_quant`` say which formats). ``safetensors_io`` and ``packed_io`` write
and read the conversion caches. ``engine.model_loader.load_model`` is the
entry point most code wants: it caches a GGUF's conversion
(``engine.gguf_cache``); the engine sets ``keep_quantized`` from
``--quantization`` and the backend.
"""

from model.weights.canonical import check_weights, expected_shapes
from model.weights.gguf_reader import GGUFCheckpoint, read_gguf
from model.weights.hf_config import model_config_from_hf
from model.weights.hf_reader import HFCheckpoint, read_hf_dir
from model.weights.safetensors_io import read_safetensors, write_safetensors

__all__ = [
    "GGUFCheckpoint",
    "HFCheckpoint",
    "check_weights",
    "expected_shapes",
    "model_config_from_hf",
    "read_gguf",
    "read_hf_dir",
    "read_safetensors",
    "write_safetensors",
]
