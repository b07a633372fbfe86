"""Weight readers: GGUF (dequantised, cached) and Hugging Face safetensors.

Every reader returns a ``ModelConfig`` and a dict of float32, C-contiguous
numpy arrays under the canonical names listed in ``model.config``.
``engine.model_loader.load_model`` is the entry point most code wants.
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
