"""Convert a GGUF once into a safetensors cache, then read only the cache.

Dequantising (or re-laying out) and parsing a GGUF's tokenizer takes many
seconds; the cache turns later starts into one sequential read. A GGUF has
up to two entries: float32 (what the cpu backend and ``--quantization none``
load) and packed (``quantized=True``: the quantized matrices kept as
``QuantizedTensor``, written by ``model.weights.packed_io``, about the GGUF's
size). Caching the packed arrays rather than re-reading the GGUF at every
start: the re-layout takes about 10 s for the default model, the cached read
a fraction of a second, and the tokenizer is cached with it either way.
Layout of one entry::

    $PAGEDGEN_CACHE_DIR/<stem>-<hash>/          (packed: <stem>-packed-<hash>/)
        model.safetensors      float32 or packed, canonical names
        pagedgen_config.json   {"format_version", "name", "source", "max_model_len", "model_config", "weights"}
        tokenizer.json, tokenizer_config.json, ...   (HF tokenizer built from the GGUF)

``<hash>`` covers the GGUF's absolute path, size and mtime (and the cache
format and kind), so a replaced file gets a new entry. An entry is written in a
temporary sibling directory and renamed into place, so it is either complete
or absent; concurrent converters race harmlessly (the first rename wins).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from common import envs
from model.config import ModelConfig
from model.weights import gguf_reader
from model.weights.canonical import check_weights
from model.weights.packed_io import read_packed, write_packed
from model.weights.quant import check_quantized_weights
from model.weights.safetensors_io import read_header, read_safetensors, write_safetensors

logger = structlog.get_logger(__name__)

CACHE_FORMAT_VERSION = 1
CONFIG_FILE = "pagedgen_config.json"
WEIGHTS_FILE = "model.safetensors"
PACKED = "packed"                        # pagedgen_config.json "weights" of an entry kept quantized


@dataclass(frozen=True)
class CacheEntry:
    """A complete cache entry: its metadata now, its weights on ``read_weights()``."""

    path: Path               # the entry directory (also holds the tokenizer files)
    name: str
    config: ModelConfig
    max_model_len: int
    packed: bool = False     # quantized matrices kept as QuantizedTensor (model.weights.packed_io)

    def read_weights(self) -> dict:
        """The canonical weights (one sequential read of model.safetensors): float32, or packed."""
        if self.packed:
            return check_quantized_weights(self.config, read_packed(self.path / WEIGHTS_FILE), str(self.path))
        return check_weights(self.config, read_safetensors(self.path / WEIGHTS_FILE), str(self.path))


def cache_entry_for(gguf_path: Path, root: Path | None = None, quantized: bool = False) -> Path:
    """The cache directory that does or will hold ``gguf_path``'s conversion (float32, or packed)."""
    source = gguf_path.resolve()
    stat = source.stat()
    key = f"{CACHE_FORMAT_VERSION}\0{source}\0{stat.st_size}\0{stat.st_mtime_ns}" + (f"\0{PACKED}" if quantized else "")
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return (root or envs.cache_dir()) / f"{source.stem}-{f'{PACKED}-' if quantized else ''}{digest}"


def open_gguf_cache(gguf_path: Path, name: str, quantized: bool = False) -> CacheEntry:
    """``gguf_path``'s cache entry, converting the GGUF first if there is none (or a broken one).

    ``quantized``: the packed entry, whose quantized matrices stay ``QuantizedTensor``.
    """
    entry = cache_entry_for(gguf_path, quantized=quantized)
    if entry.is_dir():
        try:
            return open_cache_entry(entry)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("gguf_cache_invalid_rebuilding", cache=str(entry), error=str(e))
            shutil.rmtree(entry, ignore_errors=True)
    convert_gguf(gguf_path, entry, name, quantized=quantized)
    return open_cache_entry(entry)


def open_cache_entry(entry: Path) -> CacheEntry:
    """Read and check an entry's metadata; ValueError/OSError if it is not usable."""
    meta = json.loads((entry / CONFIG_FILE).read_text(encoding="utf-8"))
    if meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"cache format {meta.get('format_version')} != {CACHE_FORMAT_VERSION}")
    header, data_start = read_header(entry / WEIGHTS_FILE)
    data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + data_end != (entry / WEIGHTS_FILE).stat().st_size:
        raise ValueError(f"{entry / WEIGHTS_FILE} is truncated")
    if not (entry / "tokenizer.json").is_file():
        raise ValueError(f"{entry} lacks tokenizer.json")
    config = ModelConfig.from_dict(meta["model_config"])
    return CacheEntry(entry, meta["name"], config, int(meta["max_model_len"]), meta.get("weights") == PACKED)


def convert_gguf(gguf_path: Path, entry: Path, name: str, quantized: bool = False) -> None:
    """Dequantise ``gguf_path`` (or, ``quantized``, keep it packed) and write the cache ``entry`` atomically."""
    from engine.tokenizer import hf_tokenizer_from_gguf

    start = time.perf_counter()
    logger.info("gguf_conversion_started", source=str(gguf_path), cache=str(entry), quantized=quantized)
    checkpoint = gguf_reader.read_gguf(gguf_path, keep_quantized=quantized)
    hf_tokenizer = hf_tokenizer_from_gguf(gguf_path)
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(entry)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=entry.parent))
    try:
        if quantized:
            write_packed(staging / WEIGHTS_FILE, checkpoint.weights, metadata={"producer": "pagedgen"})
        else:
            write_safetensors(staging / WEIGHTS_FILE, checkpoint.weights, metadata={"producer": "pagedgen"})
        hf_tokenizer.save_pretrained(str(staging))
        meta = {
            "format_version": CACHE_FORMAT_VERSION,
            "name": name,
            "source": str(gguf_path.resolve()),
            "max_model_len": checkpoint.max_model_len,
            "model_config": checkpoint.config.to_dict(),
            "weights": PACKED if quantized else "float32",
        }
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        _make_readable(staging)
        try:
            os.rename(staging, entry)
        except OSError:
            if not entry.is_dir():
                raise
            logger.info("gguf_cache_written_concurrently", cache=str(entry))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "gguf_converted",
        source=str(gguf_path),
        cache=str(entry),
        seconds=round(time.perf_counter() - start, 2),
    )


def _make_readable(directory: Path) -> None:
    """rwxr-xr-x / rw-r--r--: mkdtemp (and safetensors) create private files, a cache is shared."""
    os.chmod(directory, 0o755)
    for file in directory.iterdir():
        os.chmod(file, 0o644)


def _remove_stale_partials(entry: Path, max_age_s: float = 3600.0) -> None:
    """Delete staging directories of ``entry`` left by a converter killed over an hour ago."""
    now = time.time()
    for partial in entry.parent.glob(f".{entry.name}.*.partial"):
        try:
            if now - partial.stat().st_mtime > max_age_s:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass
